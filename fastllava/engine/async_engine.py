"""``AsyncLLMEngine``: the asyncio front of ``LLMEngine`` for the servers, with failure isolation.

    engine = AsyncLLMEngine(LLMEngine(model, tokenizer), on_dead=lambda e: sys.exit(1))
    req = engine.engine.make_request(ids, images, SamplingParams(max_tokens=64))  # any thread
    async for out in engine.generate_request(req):
        print(out.delta_text, end="")

A background task runs ``LLMEngine.step`` in a worker thread (the event loop stays free for HTTP while the
device works). New requests and aborts made on the loop are applied between steps, never during one.
Closing the iterator early (client gone) aborts the request.

Failures. ``SamplingParams`` and ``make_request`` check every input at admission, so that no request can
make a step raise. If one still does:

- a step that raises fails the requests it ran (``RequestFailedError`` in their streams, their blocks freed;
  they cannot be retried alone, their K/V may be half written) and the loop goes on with the others; a
  request whose own host-side work raised (detokenization) is failed alone by the engine;
- an error no request can be blamed for (raised before any was scheduled), a device error (CUDA: the context
  is unusable afterwards), or ``max_consecutive_failures`` failed steps in a row make the engine dead:
  ``EngineDeadError`` in every stream and from every later ``generate``, and ``on_dead(error)`` is called
  once, on the event loop (the worker marks itself unhealthy and exits, for its supervisor to restart it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence

import torch

from fastllava.engine.engine import LLMEngine
from fastllava.engine.metrics import EngineMetrics
from fastllava.engine.request import EngineImage, Request, RequestOutput, SamplingParams
from fastllava.engine.scheduler import QueueFullError
from fastllava.packing import ImageInput

log = logging.getLogger(__name__)


class RequestFailedError(RuntimeError):
    """Processing this request raised; it was freed and the engine serves the others."""

    def __init__(self, request_id: str, message: str) -> None:
        super().__init__(message)
        self.request_id = request_id


class EngineDeadError(RuntimeError):
    """The engine cannot serve any more requests (see ``AsyncLLMEngine.dead_error`` for the cause)."""


def is_device_error(error: BaseException) -> bool:
    """Errors after which the device (and so the engine) cannot be trusted: CUDA errors, device asserts, a
    failed collective (a tensor-parallel rank died: ``fastllava.distributed.RankFailedError``)."""
    if isinstance(error, torch.AcceleratorError | MemoryError | torch.distributed.DistError):
        return True
    text = str(error)
    return "CUDA error" in text or "device-side assert" in text or "CUBLAS_STATUS" in text


class AsyncLLMEngine:
    """asyncio front for the servers: ``async for out in engine.generate(...)`` streams a request."""

    def __init__(
        self,
        engine: LLMEngine,
        on_dead: Callable[[BaseException], None] | None = None,
        max_consecutive_failures: int = 3,
    ) -> None:
        self.engine = engine
        self.on_dead = on_dead
        self.max_consecutive_failures = max_consecutive_failures
        self.dead_error: BaseException | None = None
        self.num_failed_steps = 0
        self._consecutive_failures = 0
        self._streams: dict[str, asyncio.Queue] = {}
        self._new: list[Request] = []
        self._aborts: list[str] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    @property
    def is_healthy(self) -> bool:
        return self.dead_error is None

    async def generate(
        self,
        prompt_token_ids: Sequence[int],
        images: Sequence[EngineImage | ImageInput] | None = None,
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """``make_request`` (``max_tokens`` clamped to the context) then ``generate_request``. Images are
        preprocessed on the event loop here: servers call ``make_request`` in a worker thread themselves."""
        self._check_alive()
        req = self.engine.make_request(prompt_token_ids, images, params, request_id, clamp_max_tokens=True)
        async for out in self.generate_request(req):
            yield out

    async def generate_request(self, req: Request) -> AsyncIterator[RequestOutput]:
        """Stream a request made by ``LLMEngine.make_request``; the last output has ``finished=True``.

        Raises ``QueueFullError`` or ``ValueError`` (id in use) at once, ``EngineDeadError`` when the engine
        is dead, and ``RequestFailedError`` mid-stream when processing this request raised.
        """
        self._check_alive()
        rid = req.request_id
        if rid in self._streams or rid in self.engine.scheduler.requests:
            raise ValueError(f"request id {rid!r} is already in use")
        sched = self.engine.scheduler
        if len(sched.waiting) + len(self._new) >= sched.config.max_waiting_requests:
            self.engine.num_rejected += 1
            raise QueueFullError(f"queue full: {sched.config.max_waiting_requests} requests waiting")
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[rid] = queue
        self._new.append(req)
        self._start()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True  # the engine is done with it (failed, dead or refused)
                    raise item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(rid, None)
            if not finished:
                self._aborts.append(rid)
                self._wake.set()

    async def abort(self, request_id: str) -> None:
        self._aborts.append(request_id)
        if self._wake is not None:
            self._wake.set()

    def metrics(self) -> EngineMetrics:
        return self.engine.metrics()

    # ------------------------------------------------------------------------------------ loop
    def _check_alive(self) -> None:
        if self.dead_error is not None:
            raise EngineDeadError(f"the engine is dead: {self.dead_error!r}") from self.dead_error

    def _start(self) -> None:
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop())
        self._wake.set()

    def _apply_pending(self) -> None:
        new, self._new = self._new, []
        for req in new:
            if req.request_id not in self._streams:
                continue  # its client left before it was queued
            try:
                self.engine.enqueue(req)
            except (QueueFullError, ValueError) as e:
                self._streams[req.request_id].put_nowait(e)
        aborts, self._aborts = self._aborts, []
        for rid in aborts:
            out = self.engine.abort_request(rid)
            if out is not None and rid in self._streams:
                self._streams[rid].put_nowait(out)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            q = self._streams.get(out.request_id)
            if q is None:
                continue
            if out.finish_reason == "error":  # failed alone by the engine (its host-side processing raised)
                q.put_nowait(RequestFailedError(out.request_id, f"request {out.request_id} failed: {out.error}"))
            else:
                q.put_nowait(out)

    async def _loop(self) -> None:
        while self.dead_error is None:
            self._apply_pending()
            if not self.engine.has_unfinished_requests():
                self._wake.clear()
                if self._new or self._aborts:
                    continue
                await self._wake.wait()
                continue
            try:
                outputs = await asyncio.to_thread(self.engine.step)
            except Exception as e:
                self._on_step_error(e)
                continue
            self._consecutive_failures = 0
            self._deliver(outputs)

    def _on_step_error(self, error: Exception) -> None:
        self.num_failed_steps += 1
        self._consecutive_failures += 1
        failed = self.engine.fail_step()
        fatal = (
            is_device_error(error)
            or not failed  # nothing to blame: the engine's own state is in doubt
            or self._consecutive_failures >= self.max_consecutive_failures
        )
        if fatal:
            self._die(error)
            return
        log.error("engine step failed; failing its %d requests %s", len(failed), failed, exc_info=error)
        for rid in failed:
            q = self._streams.get(rid)
            if q is not None:
                err = RequestFailedError(rid, f"request {rid} failed: {error!r}")
                err.__cause__ = error
                q.put_nowait(err)

    def _die(self, error: BaseException) -> None:
        log.critical("engine is dead", exc_info=error)
        self.dead_error = error
        dead = EngineDeadError(f"the engine is dead: {error!r}")
        dead.__cause__ = error
        for q in self._streams.values():
            q.put_nowait(dead)
        for rid in list(self.engine.scheduler.requests):
            self.engine.abort_request(rid)
        if self.on_dead is not None:
            self.on_dead(error)

    async def shutdown(self) -> None:
        """Abort everything and stop the background task."""
        for rid in list(self.engine.scheduler.requests):
            self.engine.abort_request(rid)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
