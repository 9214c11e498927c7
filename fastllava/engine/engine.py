"""The continuous-batching engine: ``LLMEngine`` (synchronous) and ``AsyncLLMEngine`` (asyncio front).

    engine = LLMEngine(model, tokenizer, EngineConfig(block_size=16))
    engine.add_request("a", tokenizer_image_token(prompt, tokenizer), images=[EngineImage(px, (h, w))],
                       params=SamplingParams(max_tokens=64))
    while engine.has_unfinished_requests():
        for out in engine.step():
            print(out.request_id, out.delta_text)

One step = schedule (``Scheduler``, bookkeeping) -> execute (``ModelRunner``: encoder, one packed prefill,
one batched decode, one sample, one host sync) -> update (tokens, stop checks, detokenization, metrics).
The servers use ``AsyncLLMEngine.generate``, an async iterator of ``RequestOutput``.

CUDA graphs (``EngineConfig.cuda_graphs``, on by default, used only when the model is on CUDA): at construction
the decode step (model forward over the paged KV cache + LM head, one token per sequence) is captured once per
batch-size bucket (1, 2, 4, 8, 16, 24, ... up to ``cuda_graph_max_batch_size``, default ``max_num_seqs``).
Each decode step pads its batch to the next bucket, copies its inputs into the graphs' static buffers and
replays; padding rows use a scratch KV block of their own and their logits are dropped. Sampling stays outside
the graph. Bigger batches, CPU models and ``cuda_graphs=False`` decode eagerly. Capture fixes the attention
backend and kernels in force at construction (see ``decode_graphs.py``). ``static_decode_buffers=True`` runs
the same static-buffer, bucket-padded decode without capture on any device (tests and debugging).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import random
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import torch

from fastllava.engine.block_manager import BlockManager
from fastllava.engine.encoder_cache import EncoderCache
from fastllava.engine.metrics import EngineMetrics
from fastllava.engine.request import EngineImage, Request, RequestOutput, RequestStatus, SamplingParams
from fastllava.engine.runner import ModelRunner
from fastllava.engine.scheduler import QueueFullError, Scheduler, SchedulerConfig
from fastllava.packing import ImageInput, expand_image_tokens, image_token_count

__all__ = [
    "AsyncLLMEngine",
    "EngineConfig",
    "EngineImage",
    "LLMEngine",
    "QueueFullError",
    "RequestOutput",
    "RequestTooLargeError",
    "SamplingParams",
]


class RequestTooLargeError(ValueError):
    """The request can never run: its prompt + max_tokens exceed the KV cache or the model's context."""


@dataclass
class EngineConfig:
    block_size: int = 16  # tokens per KV block
    num_blocks: int | None = None  # None: sized from memory (below)
    gpu_memory_utilization: float = 0.85  # CUDA: fraction of the *free* memory given to the KV cache
    cpu_kv_cache_bytes: int = 1 << 29  # CPU: KV cache size when num_blocks is None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_waiting_requests: int = 1024
    max_waiting_tokens: int = 1 << 20
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    encoder_cache_rows: int = 16384  # image-feature rows kept (576 per LLaVA-1.5 image)
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    kv_dtype: torch.dtype | None = None  # None: the model's dtype
    cuda_graphs: bool = True  # CUDA models: replay decode steps from CUDA graphs, one per batch-size bucket
    cuda_graph_max_batch_size: int | None = None  # largest captured batch (None: max_num_seqs); bigger: eager
    static_decode_buffers: bool = False  # tests/debugging: the graphs' bucketed static-buffer decode, no capture


class LLMEngine:
    def __init__(self, model, tokenizer=None, config: EngineConfig | None = None, image_processor=None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.config = config = config or EngineConfig()
        self.cfg = model.config
        self.max_model_len = config.max_model_len or self.cfg.text.max_position_embeddings
        num_blocks = config.num_blocks or self._auto_num_blocks()
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.encoder_cache = EncoderCache(config.encoder_cache_rows)
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_waiting_requests=config.max_waiting_requests,
                max_waiting_tokens=config.max_waiting_tokens,
                enable_chunked_prefill=config.enable_chunked_prefill,
            ),
            self.block_manager,
            self.encoder_cache,
        )
        graphs = config.cuda_graphs and model.device.type == "cuda" and not config.static_decode_buffers
        bucketed = graphs or config.static_decode_buffers
        self.runner = ModelRunner(
            model,
            num_blocks,
            config.block_size,
            self.encoder_cache,
            config.kv_dtype,
            decode_max_batch=(config.cuda_graph_max_batch_size or config.max_num_seqs) if bucketed else 0,
            capture_graphs=graphs,
            max_model_len=self.max_model_len,
        )
        eos = self.cfg.text.eos_token_id
        self.eos_token_ids = set([eos] if isinstance(eos, int) else (eos or []))
        if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
            self.eos_token_ids.add(tokenizer.eos_token_id)
        self._ids = itertools.count()
        self.num_steps = self.num_generated = self.num_prefill_tokens = 0
        self.num_finished = self.num_aborted = self.num_rejected = 0

    def _auto_num_blocks(self) -> int:
        t = self.cfg.text
        dtype = self.config.kv_dtype or self.model.dtype
        per_block = 2 * t.num_hidden_layers * self.config.block_size * t.num_key_value_heads * t.head_dim
        per_block *= torch.empty((), dtype=dtype).element_size()
        if self.model.device.type == "cuda":
            budget = int(torch.cuda.mem_get_info(self.model.device)[0] * self.config.gpu_memory_utilization)
        else:
            budget = self.config.cpu_kv_cache_bytes
        enough = self.config.max_num_seqs * -(-self.max_model_len // self.config.block_size)
        return max(1, min(budget // per_block, enough))

    # --------------------------------------------------------------------------------- requests
    def make_request(
        self,
        prompt_token_ids: Sequence[int],
        images: Sequence[EngineImage | ImageInput] | None = None,
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> Request:
        """Validate and expand a prompt (``IMAGE_TOKEN_INDEX`` placeholders or llava-hf image-token runs) into a
        ``Request``; raises ``RequestTooLargeError``/``ValueError``. Touches no engine state."""
        params = params or SamplingParams()
        if params.seed is None and params.temperature > 0:
            params.seed = random.getrandbits(62)
        imgs = [self._image(im) for im in images or []]
        counts = [image_token_count(self.cfg, im.size_hw) for im in imgs]
        ids, offsets = expand_image_tokens(list(prompt_token_ids), counts, self.cfg.image_token_index)
        if not ids:
            raise ValueError("empty prompt")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need the engine's tokenizer")
        if len(ids) >= self.max_model_len:
            raise RequestTooLargeError(
                f"prompt of {len(ids)} tokens (image tokens included) does not fit the model's context of "
                f"{self.max_model_len} tokens"
            )
        total = min(len(ids) + params.max_tokens, self.max_model_len)
        bm = self.block_manager
        if bm.blocks_needed(total) > bm.num_blocks:
            raise RequestTooLargeError(
                f"request needs {total} tokens of KV cache ({len(ids)} prompt incl. image tokens + "
                f"{params.max_tokens} max_tokens) = {bm.blocks_needed(total)} blocks, but the cache holds only "
                f"{bm.num_blocks} blocks of {bm.block_size} tokens; lower max_tokens or grow the cache"
            )
        if not self.config.enable_chunked_prefill and len(ids) > self.config.max_num_batched_tokens:
            raise RequestTooLargeError(
                f"prompt of {len(ids)} tokens exceeds max_num_batched_tokens={self.config.max_num_batched_tokens} "
                "and chunked prefill is off"
            )
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        return Request(rid, ids, imgs, offsets, counts, params, time.perf_counter())

    def _image(self, im) -> EngineImage:
        if isinstance(im, EngineImage):
            return im
        if isinstance(im, ImageInput):
            return EngineImage(im.pixel_values, im.size_hw)
        if hasattr(im, "convert") and hasattr(im, "size"):  # a PIL image: preprocess, hash its pixels
            if self.image_processor is None:
                raise ValueError("PIL images need the engine's image_processor")
            from fastllava.mm_utils import process_images

            im = im.convert("RGB")
            key = hashlib.sha256(f"{im.size}".encode() + im.tobytes()).hexdigest()
            px = process_images([im], self.image_processor, self.cfg)[0]
            return EngineImage(px, (im.size[1], im.size[0]), key)
        raise TypeError(f"an image must be an EngineImage, ImageInput or PIL image, got {type(im).__name__}")

    def add_request(
        self,
        request_id: str | None,
        prompt_token_ids: Sequence[int],
        images: Sequence[EngineImage | ImageInput] | None = None,
        params: SamplingParams | None = None,
    ) -> Request:
        """Queue a request; raises ``RequestTooLargeError`` or ``QueueFullError`` (a clear rejection)."""
        req = self.make_request(prompt_token_ids, images, params, request_id)
        self.enqueue(req)
        return req

    def enqueue(self, req: Request) -> None:
        try:
            self.scheduler.add(req)
        except QueueFullError:
            self.num_rejected += 1
            raise

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request wherever it is; frees its blocks and encoder-cache references."""
        req = self.scheduler.requests.get(request_id)
        if req is None:
            return None
        self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)
        self.num_aborted += 1
        req.metrics.finished_time = time.perf_counter()
        return self._output(req, [])

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished

    # ------------------------------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        """Schedule, execute, update: one forward of every scheduled request. Returns the outputs produced."""
        out = self.scheduler.schedule()
        if out.is_empty:
            if self.scheduler.waiting and not self.scheduler.running:  # make_request's checks rule this out
                raise RuntimeError(f"cannot admit {self.scheduler.waiting[0]}: the KV cache is too small for it")
            return []
        sampled = self.runner.execute(out, self.block_manager.tables)
        now = time.perf_counter()
        for r in [c.request for c in out.prefills] + out.decodes:
            if r.metrics.first_scheduled_time is None:
                r.metrics.first_scheduled_time = now
        self.num_steps += 1
        self.num_prefill_tokens += sum(c.num_tokens for c in out.prefills)
        self.num_generated += len(sampled)
        return [self._process(req, now) for req in self.scheduler.update(out, sampled)]

    def _process(self, req: Request, now: float) -> RequestOutput:
        """Stop checks and detokenization for a request that just got a token."""
        req.metrics.on_token(now)
        p, token = req.params, req.output_token_ids[-1]
        status = None
        stop_ids = self.eos_token_ids if p.stop_token_ids is None else set(p.stop_token_ids)
        if not p.ignore_eos and token in stop_ids:
            status = RequestStatus.FINISHED_STOPPED
        elif len(req.output_token_ids) >= p.max_tokens or req.num_tokens >= self.max_model_len:
            status = RequestStatus.FINISHED_LENGTH
        if self.tokenizer is not None:
            req.text = self.tokenizer.decode(req.output_token_ids, skip_special_tokens=True)
            cuts = [req.text.find(s) for s in p.stop if s in req.text]
            if cuts:
                req.text = req.text[: min(cuts)]
                status = RequestStatus.FINISHED_STOPPED
        if status is not None:
            self.scheduler.finish(req, status)
            req.metrics.finished_time = now
            self.num_finished += 1
        return self._output(req, req.output_token_ids[req.sent_tokens :])

    def _output(self, req: Request, new_tokens: list[int]) -> RequestOutput:
        req.sent_tokens = len(req.output_token_ids)
        end = len(req.text)
        if not req.finished:
            # hold back what may still become a stop string, and a trailing partial UTF-8 character
            end -= max((len(s) for s in req.params.stop), default=1) - 1
            while end > req.sent_text_len and req.text[end - 1] == "\ufffd":
                end -= 1
        end = max(end, req.sent_text_len)
        delta, req.sent_text_len = req.text[req.sent_text_len : end], end
        return RequestOutput(
            request_id=req.request_id,
            new_token_ids=list(new_tokens),
            token_ids=list(req.output_token_ids),
            text=req.text,
            delta_text=delta,
            finished=req.finished,
            finish_reason=req.status.value if req.finished else None,
            metrics=req.metrics,
        )

    # -------------------------------------------------------------------------------- helpers
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        images: Sequence[Sequence[EngineImage | ImageInput] | None] | None = None,
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run a list of prompts to completion (all queued at once); final outputs in prompt order."""
        images = images if images is not None else [None] * len(prompts)
        plist = params if isinstance(params, Sequence) else [params] * len(prompts)
        ids = [
            self.add_request(None, p, im, SamplingParams(**vars(sp)) if sp else None).request_id
            for p, im, sp in zip(prompts, images, plist, strict=True)
        ]
        final: dict[str, RequestOutput] = {}
        while self.has_unfinished_requests():
            for out in self.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[i] for i in ids]

    def metrics(self) -> EngineMetrics:
        bm, ec = self.block_manager, self.encoder_cache
        return EngineMetrics(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_blocks_total=bm.num_blocks,
            kv_blocks_used=bm.num_used_blocks,
            kv_usage=bm.usage,
            prefix_cache_queries=bm.prefix_queries,
            prefix_cache_hits=bm.prefix_hits,
            encoder_images_run=self.runner.images_encoded,
            encoder_cache_hits=ec.hits,
            encoder_cache_entries=ec.num_entries,
            num_preemptions=self.scheduler.num_preemptions,
            num_steps=self.num_steps,
            num_prompt_tokens_computed=self.num_prefill_tokens,
            num_generated_tokens=self.num_generated,
            num_finished=self.num_finished,
            num_aborted=self.num_aborted,
            num_rejected=self.num_rejected,
        )


class AsyncLLMEngine:
    """asyncio front for the servers: ``async for out in engine.generate(...)`` streams a request.

    A background task runs ``LLMEngine.step`` in a worker thread (the event loop stays free for HTTP while
    the GPU works). New requests and aborts made on the loop are applied between steps, never during one.
    Closing the iterator early (client gone) aborts the request.
    """

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._streams: dict[str, asyncio.Queue] = {}
        self._new: list[Request] = []
        self._aborts: list[str] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._error: BaseException | None = None

    async def generate(
        self,
        prompt_token_ids: Sequence[int],
        images: Sequence[EngineImage | ImageInput] | None = None,
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; the last has ``finished=True``. Raises ``RequestTooLargeError`` /
        ``QueueFullError`` at once for a request that is rejected."""
        if self._error is not None:
            raise RuntimeError("the engine loop has failed") from self._error
        if request_id is not None and (request_id in self._streams or request_id in self.engine.scheduler.requests):
            raise ValueError(f"request id {request_id!r} is already in use")
        req = self.engine.make_request(prompt_token_ids, images, params, request_id)
        sched = self.engine.scheduler
        if len(sched.waiting) + len(self._new) >= sched.config.max_waiting_requests:
            self.engine.num_rejected += 1
            raise QueueFullError(f"queue full: {sched.config.max_waiting_requests} requests waiting")
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[req.request_id] = queue
        self._new.append(req)
        self._start()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(req.request_id, None)
            if not finished:
                self._aborts.append(req.request_id)
                self._wake.set()

    async def abort(self, request_id: str) -> None:
        self._aborts.append(request_id)
        if self._wake is not None:
            self._wake.set()

    def metrics(self) -> EngineMetrics:
        return self.engine.metrics()

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

    async def _loop(self) -> None:
        while True:
            self._apply_pending()
            if not self.engine.has_unfinished_requests():
                self._wake.clear()
                if self._new or self._aborts:
                    continue
                await self._wake.wait()
                continue
            try:
                outputs = await asyncio.to_thread(self.engine.step)
            except Exception as e:  # deliver to every stream, then stop: the engine state is unknown
                self._error = e
                for q in self._streams.values():
                    q.put_nowait(e)
                raise
            for out in outputs:
                q = self._streams.get(out.request_id)
                if q is not None:
                    q.put_nowait(out)

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
