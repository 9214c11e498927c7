"""A model worker: one model on the continuous-batching engine, behind LLaVA's worker routes and an
OpenAI-compatible API. Registers with a controller and heartbeats from a background thread.

    python -m serve.worker --controller-address http://127.0.0.1:10000 --port 40000 --model-path DIR
    python -m serve.worker --no-register --port 8000 --model-path DIR        # alone: OpenAI API only

Routes: ``/worker_generate_stream`` and ``/worker_get_status`` (LLaVA's formats), ``/model_details``,
``/v1/chat/completions``, ``/v1/models``, ``/health`` (503 while loading, draining or unhealthy), ``/metrics``.
The model loads in the background after the server is up; the worker registers once it is loaded.
SIGTERM drains: the worker leaves the controller, refuses new requests with 503, finishes those in flight
(up to ``--drain-timeout``), then exits. The registration token comes from ``--worker-token`` or
``FASTLLAVA_WORKER_TOKEN``; with API keys (``--api-key``) both generating routes need a key or that token.

Failures: a request whose generation fails gets a 500 naming its id (or an error event mid-stream) and the
worker goes on serving. If the engine dies (``EngineDeadError``), the worker turns unhealthy (``/health``
503, new requests 503 ``worker_unhealthy``), leaves its controller, and exits with status 3 so that a
supervisor (``fastllava serve``, systemd, Kubernetes) starts a fresh one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import os
import threading
import time
import uuid

import httpx
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from fastllava import envs

from . import protocol as P
from .backend import BackendConfig, Delta, EngineBackend, SamplingArgs
from .http_app import (
    api_keys_from,
    check_api_key,
    http_app,
    make_server,
    parse_body,
    request_id_var,
    setup_logging,
    until_disconnected,
)
from .images import ImagePolicy
from .metrics import WorkerMetrics

logger = setup_logging("fastllava.worker")
WORKER_TOKEN_HEADER = "X-Worker-Token"
RANK_FAILURE_EXIT_S = 5.0  # after a tensor-parallel rank died: seconds until the worker exits regardless
EXIT_ENGINE_DEAD = 3  # the exit status after the engine died (a supervisor restarts the worker)


class Registrar:
    """Registers the worker with its controller and heartbeats, in a thread (never blocks requests)."""

    def __init__(self, controller: str, worker_address: str, token: str | None, interval: float, status) -> None:
        self.controller, self.address, self.interval, self.status = (
            controller.rstrip("/"),
            worker_address,
            interval,
            status,
        )
        self.headers = {WORKER_TOKEN_HEADER: token} if token else {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="registrar", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _post(self, client: httpx.Client, route: str, payload: dict) -> dict:
        r = client.post(self.controller + route, json=payload, headers=self.headers, timeout=5.0)
        if r.status_code != 200:
            raise RuntimeError(f"controller answered {route} with HTTP {r.status_code}: {r.text[:200]}")
        return r.json()

    def _run(self) -> None:
        registered = False
        with httpx.Client() as client:
            while not self._stop.is_set():
                try:
                    if not registered:
                        self._post(client, "/register_worker", {"worker_name": self.address, "check_heart_beat": True,
                                                               "worker_status": self.status()})  # fmt: skip
                        registered = True
                        logger.info("registered with the controller at %s as %s", self.controller, self.address)
                    else:
                        st = self.status()
                        beat = {"worker_name": self.address, "queue_length": st["queue_length"], "worker_status": st}
                        if not self._post(client, "/receive_heart_beat", beat).get("exist", False):
                            registered = False
                            logger.info("the controller forgot this worker; registering again")
                            continue
                except (httpx.HTTPError, RuntimeError, ValueError) as e:
                    registered = False
                    logger.warning("controller at %s unreachable or refusing: %s", self.controller, e)
                self._stop.wait(self.interval)

    def stop(self) -> None:
        """Stop heartbeating and tell the controller to drop this worker now."""
        self._stop.set()
        try:
            with httpx.Client() as client:
                self._post(client, "/unregister_worker", {"worker_name": self.address})
        except (httpx.HTTPError, RuntimeError) as e:
            logger.warning("could not unregister from the controller: %s", e)


class WorkerServer:
    """State shared by the routes: backend, limits, lifecycle (loading -> ready -> draining) and counters."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.backend = EngineBackend(
            BackendConfig(
                model_path=args.model_path,
                model_base=args.model_base,
                model_name=args.model_name,
                device=args.device,
                dtype=args.dtype,
                load_4bit=args.load_4bit,
                load_8bit=args.load_8bit,
                attn_implementation=args.attn_implementation,
                conv_mode=args.conv_mode,
                max_num_seqs=args.max_num_seqs,
                max_waiting_requests=args.max_waiting_requests,
                num_blocks=args.num_blocks,
                max_model_len=args.max_model_len,
                default_max_tokens=args.default_max_tokens,
                preprocess_threads=args.preprocess_threads,
                max_prompt_chars=args.max_prompt_chars,
                tensor_parallel_size=args.tensor_parallel_size,
                max_pixels_in_flight=args.max_pixels_in_flight or args.max_images * args.max_image_pixels,
            ),
            on_dead=self.on_dead,
        )
        self.policy = ImagePolicy(
            max_images=args.max_images,
            max_pixels=args.max_image_pixels,
            max_image_bytes=args.max_image_bytes,
            allow_remote=args.allow_remote_images,
            remote_hosts=tuple(args.allowed_image_hosts or ()),
            allowed_local_dir=args.allowed_local_image_dir,
        )
        self.api_keys = api_keys_from(args.api_key)
        self.token = args.worker_token or envs.FASTLLAVA_WORKER_TOKEN
        self.state = "loading"
        self.in_flight = 0
        self.metrics = WorkerMetrics(self)
        self.registrar: Registrar | None = None
        self.server = None  # the uvicorn server, told to exit when the engine dies

    # ------------------------------------------------------------------------------------------ lifecycle
    def load(self) -> None:
        try:
            t0 = time.perf_counter()
            self.backend.load()
        except Exception:
            self.state = "failed"
            logger.exception("loading %s failed", self.args.model_path)
            return
        self.state = "ready"
        if self.args.tensor_parallel_size > 1:
            self.backend.model.on_failure(self.on_rank_failure)
        logger.info("model %s loaded in %.1fs", self.backend.model_name, time.perf_counter() - t0)
        if not self.args.no_register:
            self.registrar = Registrar(
                self.args.controller_address, self.address, self.token, self.args.heart_beat_interval, self.status
            )
            self.registrar.start()

    def on_dead(self, exc: BaseException) -> None:
        """The engine cannot serve any more: refuse work, leave the controller, exit non-zero (once)."""
        if self.state == "unhealthy":
            return
        self.state = "unhealthy"
        logger.error("the engine has failed (%s: %s): leaving the controller and exiting with status %d",
                     type(exc).__name__, exc, EXIT_ENGINE_DEAD)  # fmt: skip
        if self.registrar is not None:
            threading.Thread(target=self.registrar.stop, name="unregister", daemon=True).start()
        if self.server is not None:  # a moment for the failed streams to send their error events
            threading.Timer(1.0, setattr, (self.server, "should_exit", True)).start()

    def on_rank_failure(self, exc: BaseException) -> None:
        """A tensor-parallel rank died (the model's monitor thread): the steps in flight fail with that error;
        exit as a dead engine does, and for certain (a collective stuck on the dead rank never returns)."""
        self.on_dead(exc)
        threading.Timer(RANK_FAILURE_EXIT_S, os._exit, (EXIT_ENGINE_DEAD,)).start()

    @property
    def address(self) -> str:
        return self.args.worker_address or f"http://{self.args.host}:{self.args.port}"

    async def drain(self) -> None:
        """Leave the controller, refuse new work, and wait (bounded) for in-flight requests to finish."""
        logger.info("draining: %d requests in flight", self.in_flight)
        self.state = "draining"
        if self.registrar is not None:
            await asyncio.to_thread(self.registrar.stop)
        deadline = time.monotonic() + self.args.drain_timeout
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if self.backend.engine is not None:
            await self.backend.engine.shutdown()
        logger.info("drained (%d requests still in flight); exiting", self.in_flight)

    def check_ready(self) -> None:
        if self.state != "ready":
            code = "worker_unhealthy" if self.state == "unhealthy" else "service_unavailable"
            raise P.APIError(503, f"the worker is {self.state}; retry shortly", "server_error", None, code,
                             retry_after=2)  # fmt: skip

    def check_key(self, request: Request) -> None:
        """An API key, or the worker token that the controller sends (keys on both ends then work)."""
        if self.token is not None and self.api_keys:
            given = request.headers.get(WORKER_TOKEN_HEADER, "")
            if hmac.compare_digest(given.encode(), self.token.encode()):
                return
        check_api_key(request, self.api_keys)

    @property
    def limits(self) -> P.Limits:
        return self.backend.limits(self.policy.max_images)

    def status(self) -> dict:
        """LLaVA's worker status (``speed`` is the configured relative speed, as LLaVA uses it for dispatch)."""
        return {
            "model_names": [self.backend.model_name],
            "speed": self.args.speed,
            "queue_length": self.in_flight,
            "throughput": round(self.backend.throughput(), 2),
            "state": self.state,
            "limits": self.limits.as_dict(),
        }

    @contextlib.contextmanager
    def tracking(self):
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1


def _openai_stream(server: WorkerServer, rid: str, req: P.ChatRequest, first: Delta, rest, done):
    """SSE body: role + first text, text chunks, one chunk with finish_reason, optional usage, [DONE]."""
    model, created = server.backend.model_name, int(time.time())

    async def gen():
        last = first
        try:
            yield P.sse(P.chunk(rid, model, created, {"role": "assistant", "content": first.text}))
            async for d in rest:
                last = d
                if d.text:
                    yield P.sse(P.chunk(rid, model, created, {"content": d.text}))
            yield P.sse(P.chunk(rid, model, created, {}, last.finish_reason))
            if req.include_usage:
                yield P.sse(P.chunk(rid, model, created, None, use=P.usage(last.prompt_tokens, last.completion_tokens)))
            server.metrics.on_finished(last.prompt_tokens, last.completion_tokens, last.finish_reason, last.metrics)
        except P.APIError as e:  # the request (or the engine) failed mid-stream: say so in the stream
            server.metrics.on_error(e.status)
            yield P.sse(e.body())
        except Exception as e:  # a bug: tell the client, then let LimitsMiddleware log it (once, with the id)
            server.metrics.on_error(500)
            yield P.sse(_internal_error(e, rid).body())
            yield P.SSE_DONE
            raise
        finally:
            await rest.aclose()
            done()
        yield P.SSE_DONE

    return gen()


def _internal_error(e: Exception, rid: str) -> P.APIError:
    return P.APIError(500, f"internal error ({type(e).__name__}) while streaming request {rid}; see the server log",
                      "server_error")  # fmt: skip


async def _first(stream) -> Delta:
    return await anext(stream)


async def _collect(stream) -> tuple[str, Delta]:
    parts, last = [], None
    async for d in stream:
        parts.append(d.text)
        last = d
    return "".join(parts), last


def _lifespan(server: WorkerServer):
    """The model loads on startup, in a thread (``/health`` says 503 until it is ready)."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=server.load, name="model-loader", daemon=True).start()
        yield
        server.backend.pool.shutdown(wait=False, cancel_futures=True)

    return lifespan


def ops_routes(server: WorkerServer) -> APIRouter:
    """``/health``, ``/metrics`` and LLaVA's status routes."""
    router, backend = APIRouter(), server.backend

    @router.get("/health")
    async def health():
        ok = server.state == "ready"
        return JSONResponse({"status": server.state}, status_code=200 if ok else 503,
                            headers={} if ok else {"Retry-After": "2"})  # fmt: skip

    @router.get("/metrics")
    async def metrics():
        body, ctype = server.metrics.render()
        return Response(body, media_type=ctype)

    @router.post("/worker_get_status")
    async def worker_get_status():
        return server.status()

    @router.post("/model_details")
    async def model_details():
        return {"context_length": backend.context_len}

    return router


def openai_routes(server: WorkerServer) -> APIRouter:
    """``/v1/models`` and ``/v1/chat/completions`` (OpenAI-compatible, streamed or not)."""
    router, backend = APIRouter(), server.backend

    @router.get("/v1/models")
    async def models(request: Request):
        server.check_key(request)
        card = {"id": backend.model_name, "object": "model", "created": int(time.time()), "owned_by": "fastllava"}
        return {"object": "list", "data": [card]}

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        server.check_key(request)
        server.check_ready()
        req = await parse_body(request, lambda body: P.validate_chat(body, server.limits), backend.pool)
        if req.model is not None and req.model != backend.model_name:
            raise P.APIError(404, f"the model {req.model[:100]!r} does not exist on this worker (it serves "
                             f"{backend.model_name!r})", param="model", code="model_not_found")  # fmt: skip
        rid = P.completion_id()
        images = req.images
        logger.info("chat %s: %d messages, %d images, stream=%s", rid, len(req.messages), len(images), req.stream)
        tracker = server.tracking()
        tracker.__enter__()
        handed_off = False
        try:
            args = SamplingArgs(req.max_new_tokens, req.temperature, req.top_p, req.top_k, req.stop or [], req.seed,
                                req.ignore_eos)  # fmt: skip
            prep = await until_disconnected(request, backend.prepare(rid, req.to_messages(), images, server.policy,
                                                                     args))  # fmt: skip
            stream = backend.stream(prep)
            if req.stream:
                first = await until_disconnected(request, _first(stream))
                body = _openai_stream(server, rid, req, first, stream, lambda: tracker.__exit__(None, None, None))
                handed_off = True
                return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            text, last = await until_disconnected(request, _collect(stream))
            server.metrics.on_finished(last.prompt_tokens, last.completion_tokens, last.finish_reason, last.metrics)
            use = P.usage(last.prompt_tokens, last.completion_tokens)
            return P.completion(rid, backend.model_name, text, last.finish_reason, use)
        except P.APIError as e:
            server.metrics.on_error(e.status)
            logger.info("chat %s refused: %d %s", rid, e.status, e.message[:300])
            raise
        finally:
            if not handed_off:
                tracker.__exit__(None, None, None)

    return router


def llava_routes(server: WorkerServer) -> APIRouter:
    """LLaVA's ``/worker_generate_stream``."""
    router, backend = APIRouter(), server.backend

    @router.post("/worker_generate_stream")
    async def worker_generate_stream(request: Request):
        """LLaVA's worker stream: ``{"text": prompt + answer so far, "error_code": 0}`` frames; errors are
        frames with ``error_code`` 1 and the error's HTTP status."""
        rid = "llava-" + uuid.uuid4().hex[:16]
        try:
            server.check_key(request)
            server.check_ready()
            params = await parse_body(request, lambda body: P.validate_llava(body, server.limits), backend.pool)
            refs = [P.ImageRef(x if x.startswith("data:") else "data:image/png;base64," + x, f"images[{i}]")
                    for i, x in enumerate(params.images or [])]  # fmt: skip
            args = SamplingArgs(min(params.max_new_tokens, P.MAX_NEW_TOKENS_LLAVA), params.temperature, params.top_p,
                                stop=[params.stop] if params.stop else [], clamp_max_tokens=True)  # fmt: skip
            prep = await until_disconnected(request, backend.prepare(rid, params.prompt, refs, server.policy, args))
        except P.APIError as e:
            server.metrics.on_error(e.status)
            return Response(P.llava_error_frame(e), status_code=e.status, headers=e.headers())
        logger.info("llava stream %s: %d images (request %s)", rid, len(refs), request_id_var.get())

        async def frames():
            with server.tracking():
                text = ""
                stream = backend.stream(prep)
                try:
                    async for d in stream:
                        text += d.text
                        yield P.llava_frame({"text": params.prompt + text, "error_code": 0})
                        if d.finish_reason is not None:
                            server.metrics.on_finished(d.prompt_tokens, d.completion_tokens, d.finish_reason, d.metrics)
                except P.APIError as e:
                    server.metrics.on_error(e.status)
                    yield P.llava_error_frame(e)
                except Exception as e:  # a bug: tell the client, then let LimitsMiddleware log it once
                    server.metrics.on_error(500)
                    yield P.llava_error_frame(_internal_error(e, rid))
                    raise
                finally:
                    await stream.aclose()

        return StreamingResponse(frames())

    return router


def build_app(server: WorkerServer) -> FastAPI:
    """The worker's FastAPI app: middleware, error handlers and the route groups above."""
    routes = [ops_routes(server), openai_routes(server), llava_routes(server)]
    return http_app("fastllava worker", _lifespan(server), server.args, logger, routes)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=40000)
    p.add_argument("--worker-address", default=None, help="how the controller reaches us (default http://host:port)")
    p.add_argument("--controller-address", default="http://127.0.0.1:10000")
    p.add_argument("--no-register", action="store_true", help="serve alone, without a controller")
    p.add_argument("--worker-token", default=None, help="registration token (else $FASTLLAVA_WORKER_TOKEN)")
    p.add_argument("--heart-beat-interval", type=float, default=15.0)
    p.add_argument("--model-path", required=True)
    p.add_argument("--model-base", default=None)
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="shard the language model over N ranks, one process per device (NCCL / gloo)")  # fmt: skip
    p.add_argument("--model-name", default=None)
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--load-4bit", action="store_true")
    p.add_argument("--load-8bit", action="store_true")
    p.add_argument("--attn-implementation", default=None)
    p.add_argument("--conv-mode", default=None)
    p.add_argument("--max-num-seqs", type=int, default=64, help="engine batch size")
    p.add_argument("--max-waiting-requests", type=int, default=256, help="queue cap; beyond it: 429")
    p.add_argument("--num-blocks", type=int, default=None, help="KV-cache blocks (default: sized from memory)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--default-max-tokens", type=int, default=512)
    p.add_argument("--speed", type=float, default=1.0, help="relative speed reported for dispatch (LLaVA's)")
    p.add_argument("--limit-model-concurrency", type=int, default=None, help="LLaVA's flag: same as --max-num-seqs")
    p.add_argument("--stream-interval", type=int, default=1, help="accepted for LLaVA compatibility")
    p.add_argument("--api-key", action="append", help="require this bearer key on /v1 (repeatable)")
    p.add_argument("--max-body-bytes", type=int, default=32 * 1024 * 1024)
    p.add_argument("--body-timeout", type=float, default=60.0, help="seconds to receive a request body (then 408)")
    p.add_argument(
        "--max-prompt-chars",
        type=int,
        default=None,
        help="prompt characters per request, checked before tokenizing (default: 32 x the context)",
    )
    p.add_argument(
        "--preprocess-threads",
        type=int,
        default=2,
        help="threads that decode images, tokenize and preprocess (off the event loop)",
    )
    p.add_argument("--max-pixels-in-flight", type=int, default=None,
                   help="image pixels decoded at once across requests; beyond: 429 (default: max-images x "
                        "max-image-pixels)")  # fmt: skip
    p.add_argument("--max-images", type=int, default=8, help="images per request")
    p.add_argument("--max-image-pixels", type=int, default=4096 * 4096)
    p.add_argument("--max-image-bytes", type=int, default=10 * 1024 * 1024)
    p.add_argument("--allow-remote-images", action="store_true", help="fetch http(s) image URLs")
    p.add_argument("--allowed-image-hosts", nargs="*", default=None, help="allow-list for remote image hosts")
    p.add_argument("--allowed-local-image-dir", default=None, help="serve local image paths under this folder")
    p.add_argument("--drain-timeout", type=float, default=60.0)
    args = p.parse_args(argv)
    if args.limit_model_concurrency:
        args.max_num_seqs = args.limit_model_concurrency
    return args


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    server = WorkerServer(args)
    logger.info("worker on http://%s:%d, model %s (loading in the background)", args.host, args.port, args.model_path)
    server.server = make_server(build_app(server), args.host, args.port, on_drain=server.drain)
    asyncio.run(server.server.serve())
    return {"failed": 1, "unhealthy": EXIT_ENGINE_DEAD}.get(server.state, 0)


if __name__ == "__main__":
    raise SystemExit(main())
