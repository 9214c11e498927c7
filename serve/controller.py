"""The controller: a registry of model workers and a router in front of them (LLaVA's routes, plus an
OpenAI-compatible ``/v1`` that routes by model name).

    python -m serve.controller --host 127.0.0.1 --port 10000 [--dispatch-method shortest_queue|lottery]

Workers register (``/register_worker``) with the shared token from ``--worker-token`` or
``FASTLLAVA_WORKER_TOKEN`` in the ``X-Worker-Token`` header; with no token configured only loopback
clients may register (LLaVA lets anyone register and then receive users' prompts). Worker statuses are
validated (model names, a finite positive speed, a non-negative queue), and the controller refuses its own
address: every request it forwards carries its id in ``X-Fastllava-Via``, so an address that leads back to
it (itself, or a proxy in front of it) is refused at registration and dropped if it ever loops. A worker
whose heartbeats stop for ``--heart-beat-expiration`` seconds, that refuses connections, or that says it is
unhealthy, is dropped.

Requests are validated with the workers' own schema and limits (``protocol.validate_chat`` /
``validate_llava`` with the limits each worker reports), so the controller refuses exactly what a worker
would. With API keys (``--api-key``) every generating route needs one; the controller forwards the client's
key and the worker token, so keys on both the controller and the workers work.

``/v1/chat/completions`` streams from a worker and, until the worker has produced the first token, a
request that fails on one worker (connection refused, died, draining, overloaded) is retried on another;
after that a failure ends the stream with an error event (or a 502 for a non-streamed request).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import ipaddress
import json
import socket
import time
import uuid

import httpx
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest

from fastllava import envs

from . import protocol as P
from .http_app import (
    api_keys_from,
    check_api_key,
    client_is_loopback,
    http_app,
    parse_body,
    request_id_var,
    run_server,
    setup_logging,
    until_disconnected,
)
from .registry import Registry

logger = setup_logging("fastllava.controller")
WORKER_TOKEN_HEADER = "x-worker-token"
VIA_HEADER = "x-fastllava-via"  # ids of the controllers a request went through (loop detection)
RETRYABLE_STATUS = (429, 503)
LLAVA_NO_WORKER = "**No worker is serving this model right now.** Start a worker or try again shortly."


class Controller:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.registry = Registry(args.dispatch_method, args.heart_beat_expiration)
        self.token = args.worker_token or envs.FASTLLAVA_WORKER_TOKEN
        self.api_keys = api_keys_from(args.api_key)
        self.client: httpx.AsyncClient | None = None
        self.metrics = ControllerMetrics(self.registry)
        self.id = uuid.uuid4().hex[:16]  # in X-Fastllava-Via of everything it forwards

    def authorize_worker(self, request: Request) -> None:
        if self.token is None:
            if not client_is_loopback(request):
                raise P.APIError(403, "worker registration is open to loopback clients only (no token configured)",
                                 "authentication_error", None, "forbidden")  # fmt: skip
            return
        given = request.headers.get(WORKER_TOKEN_HEADER, "")
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            raise P.APIError(401, "worker registration needs the shared token (X-Worker-Token)",
                             "authentication_error", None, "invalid_worker_token")  # fmt: skip

    def check_loop(self, request: Request) -> None:
        """508 for a request this controller already forwarded (an address that leads back to it)."""
        if self.id in request.headers.get(VIA_HEADER, "").split(","):
            raise P.APIError(508, "this request came back to the controller that forwarded it (a worker address "
                             "leads back to the controller)", "server_error", None, "loop_detected")  # fmt: skip

    def forward_headers(self, request: Request | None, rid: str) -> dict[str, str]:
        """Headers for a request to a worker: the request id, our id for loop detection, the client's key
        and the worker token (a worker with keys of its own accepts either)."""
        via = ",".join(v for v in ((request.headers.get(VIA_HEADER) if request else None), self.id) if v)
        headers = {"x-request-id": rid, VIA_HEADER: via}
        if request is not None and request.headers.get("authorization"):
            headers["authorization"] = request.headers["authorization"]
        if self.token is not None:
            headers[WORKER_TOKEN_HEADER] = self.token
        return headers

    async def check_not_self(self, name: str) -> None:
        """Refuse a worker address that is this controller: its own host and port, or any address whose
        ``/worker_get_status`` comes back here (a proxy in front of the controller)."""
        url = httpx.URL(name)
        port = url.port or (443 if url.scheme == "https" else 80)
        if port == self.args.port:
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(url.host, port, type=socket.SOCK_STREAM)
            except OSError:
                infos = []
            own = {self.args.host, "0.0.0.0", "::"}
            for info in infos:
                ip = ipaddress.ip_address(info[4][0].split("%")[0])
                if ip.is_loopback or ip.is_unspecified or str(ip) in own:
                    raise P.bad_request(f"'{name[:200]}' is this controller's own address", "worker_name")
        try:
            r = await self.client.post(name + "/worker_get_status", headers=self.forward_headers(None, "register"),
                                       timeout=3.0)  # fmt: skip
        except httpx.HTTPError:
            return  # not reachable yet: it is dropped at its first failed request or missed heartbeat
        if r.status_code == 508:
            raise P.bad_request(f"'{name[:200]}' leads back to this controller", "worker_name")

    # ---------------------------------------------------------------------------------- OpenAI routing
    async def open_stream(self, model: str, payload: dict, headers: dict[str, str]):
        """Open a worker stream and read its first event, failing over between workers. Returns
        ``(worker, response, line iterator, first event)``; raises ``APIError`` when no worker can serve."""
        tried: set[str] = set()
        last_error: P.APIError | None = None
        while True:
            worker = self.registry.pick(model, tried)
            if worker is None:
                if last_error is not None:
                    raise last_error
                if model not in self.registry.models():
                    if not self.registry.workers:
                        raise P.overloaded("no worker is up yet; retry shortly", 503, retry_after=5)
                    served = ", ".join(self.registry.models())
                    raise P.APIError(404, f"the model {model[:100]!r} does not exist (served: {served})",
                                     param="model", code="model_not_found")  # fmt: skip
                raise P.overloaded(f"no live worker for {model!r}; retry shortly", 503, retry_after=5)
            tried.add(worker)
            if len(tried) > 1:
                self.metrics.retries.inc()
            req = self.client.build_request("POST", worker + "/v1/chat/completions", json=payload, headers=headers)
            try:
                resp = await self.client.send(req, stream=True)
            except httpx.TransportError as e:
                self.registry.remove(worker, f"unreachable ({type(e).__name__})")
                continue
            if resp.status_code != 200:
                body = await resp.aread()
                await resp.aclose()
                err = _worker_error(resp.status_code, body, resp.headers)
                if self.drop_if_broken(worker, resp.status_code, err.code):
                    continue
                if resp.status_code in RETRYABLE_STATUS:
                    last_error = err
                    continue
                raise err
            lines = resp.aiter_lines()
            try:
                first = await _next_event(lines)
            except (httpx.TransportError, StopAsyncIteration):
                await resp.aclose()
                self.registry.remove(worker, "the connection broke before the first token")
                continue
            return worker, resp, lines, first

    def drop_if_broken(self, worker: str, status: int, code: str | None) -> bool:
        """Drop a worker that answered that it cannot serve at all (dead engine, or a loop back to us)."""
        if status == 508 or code == "worker_unhealthy":
            self.registry.remove(worker, "it leads back to this controller" if status == 508 else "it is unhealthy")
            return True
        return False


def _worker_error(status: int, body: bytes, headers) -> P.APIError:
    try:
        e = json.loads(body)["error"]
        err = P.APIError(status, e["message"], e.get("type") or "server_error", e.get("param"), e.get("code"))
    except (ValueError, KeyError, TypeError):
        err = P.APIError(502 if status < 400 else status, f"the worker answered HTTP {status}", "server_error")
    ra = headers.get("retry-after")
    err.retry_after = int(ra) if ra and ra.isdigit() else None
    return err


async def _next_event(lines) -> str:
    while True:
        line = await anext(lines)
        if line.startswith("data:"):
            return line[5:].strip()


def _mid_stream_error(worker: str) -> P.APIError:
    return P.APIError(502, f"the worker serving this request failed mid-generation ({worker}); retry the request",
                      "server_error", None, "worker_failed")  # fmt: skip


def _lifespan(ctl: Controller):
    """The HTTP client to the workers, and the sweep that drops workers whose heartbeats stopped."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        ctl.client = httpx.AsyncClient(
            timeout=httpx.Timeout(None, connect=5.0), limits=httpx.Limits(max_connections=None)
        )

        async def sweep():
            while True:
                await asyncio.sleep(max(1.0, ctl.args.heart_beat_expiration / 3))
                ctl.registry.expire()

        task = asyncio.create_task(sweep())
        yield
        task.cancel()
        await ctl.client.aclose()

    return lifespan


async def _body_of(request: Request, model_cls):
    return P.validate(model_cls, P.parse_json_body(await request.body()))


def worker_routes(ctl: Controller) -> APIRouter:
    """LLaVA's routes the workers call: register, unregister, heartbeat (each needs the worker token)."""
    router, reg = APIRouter(), ctl.registry

    @router.post("/register_worker")
    async def register_worker(request: Request):
        ctl.authorize_worker(request)
        data = await _body_of(request, P.RegisterWorker)
        name = data.worker_name.rstrip("/")
        await ctl.check_not_self(name)
        status = data.worker_status
        if status is None:
            try:
                r = await ctl.client.post(name + "/worker_get_status", timeout=5.0)
                status = P.validate(P.WorkerStatus, r.json())
            except (httpx.HTTPError, ValueError) as e:
                raise P.bad_request(f"cannot get the status of {name}: {type(e).__name__}", "worker_name") from e
        reg.register(name, status, data.check_heart_beat)
        logger.info("registered worker %s serving %s", name, reg.workers[name].model_names)
        return {"registered": True}

    @router.post("/unregister_worker")
    async def unregister_worker(request: Request):
        ctl.authorize_worker(request)
        data = await _body_of(request, P.WorkerNameBody)
        reg.remove(data.worker_name, "it asked to leave (draining or unhealthy)")
        return {"unregistered": True}

    @router.post("/receive_heart_beat")
    async def receive_heart_beat(request: Request):
        ctl.authorize_worker(request)
        beat = await _body_of(request, P.HeartBeat)
        known = reg.heart_beat(beat.worker_name, beat.queue_length)
        if known and beat.worker_status is not None:
            reg.workers[beat.worker_name].limits = beat.worker_status.worker_limits()
        return {"exist": known}

    return router


def llava_routes(ctl: Controller) -> APIRouter:
    """LLaVA's client routes: models, worker addresses, the aggregated status, the generate proxy."""
    router, reg = APIRouter(), ctl.registry

    @router.post("/refresh_all_workers")
    async def refresh_all_workers():
        for name in list(reg.workers):
            try:
                r = await ctl.client.post(name + "/worker_get_status", timeout=5.0)
                reg.register(name, r.json(), reg.workers[name].check_heart_beat)
            except (httpx.HTTPError, ValueError, P.APIError, KeyError):
                reg.remove(name, "status check failed")
        return {}

    @router.post("/list_models")
    async def list_models():
        return {"models": reg.models()}

    @router.post("/get_worker_address")
    async def get_worker_address(request: Request):
        data = await _body_of(request, P.ModelBody)
        return {"address": reg.pick(data.model) or ""}

    @router.post("/worker_get_status")
    async def worker_get_status(request: Request):
        ctl.check_loop(request)
        models, speed, queue = set(), 0.0, 0
        for name in list(reg.workers):
            try:
                r = await ctl.client.post(name + "/worker_get_status", timeout=5.0,
                                          headers=ctl.forward_headers(request, request_id_var.get()))  # fmt: skip
                st = P.validate(P.WorkerStatus, r.json())
            except (httpx.HTTPError, ValueError, P.APIError):
                reg.remove(name, "status check failed")
                continue
            models.update(st.model_names)
            speed += st.speed
            queue += st.queue_length
        return {"model_names": sorted(models), "speed": speed, "queue_length": queue}

    @router.post("/worker_generate_stream")
    async def worker_generate_stream(request: Request):
        """LLaVA's proxy route: NUL-separated JSON frames from the worker serving ``params["model"]``.
        Errors are LLaVA frames too (``error_code`` != 0), with the HTTP status of the error."""
        try:
            check_api_key(request, ctl.api_keys)
            ctl.check_loop(request)
            raw = await parse_body(request, lambda body: body)
            model = raw.get("model") if isinstance(raw, dict) else None
            params = P.validate_llava(raw, reg.limits(model) if isinstance(model, str) else None)
        except P.APIError as e:
            return Response(P.llava_error_frame(e), status_code=e.status, headers=e.headers())
        return await _proxy_llava_stream(ctl, params, ctl.forward_headers(request, request_id_var.get()))

    return router


async def _proxy_llava_stream(ctl: Controller, params, headers: dict[str, str]) -> Response:
    """Send a validated LLaVA generate request to a worker serving its model, failing over while none has
    answered; relay the worker's frames (a LLaVA error frame if the worker dies mid-stream)."""
    reg, payload = ctl.registry, params.model_dump(exclude_unset=True)
    tried: set[str] = set()
    last: tuple[int, bytes, dict] | None = None
    while (worker := reg.pick(str(params.model), tried)) is not None:
        tried.add(worker)
        req = ctl.client.build_request("POST", worker + "/worker_generate_stream", json=payload, headers=headers)
        try:
            resp = await ctl.client.send(req, stream=True)
        except httpx.TransportError as e:
            reg.remove(worker, f"unreachable ({type(e).__name__})")
            continue
        if resp.status_code != 200:
            body = await resp.aread()
            await resp.aclose()
            code = _llava_error_code(body)
            if ctl.drop_if_broken(worker, resp.status_code, code) or resp.status_code in RETRYABLE_STATUS:
                last = (resp.status_code, body, {k: v for k, v in resp.headers.items() if k == "retry-after"})
                continue
            return Response(body, status_code=resp.status_code)

        async def relay(resp=resp, worker=worker):
            try:
                async for piece in resp.aiter_raw():
                    yield piece
            except httpx.TransportError:
                yield P.llava_frame({"text": str(_mid_stream_error(worker)), "error_code": 3})
            finally:
                await resp.aclose()

        return StreamingResponse(relay())
    if last is not None:
        return Response(last[1], status_code=last[0], headers=last[2])
    return Response(P.llava_frame({"text": LLAVA_NO_WORKER, "error_code": 2}))


def openai_routes(ctl: Controller) -> APIRouter:
    """``/v1/models`` and ``/v1/chat/completions``, routed by model name."""
    router, reg = APIRouter(), ctl.registry

    @router.get("/v1/models")
    async def v1_models(request: Request):
        check_api_key(request, ctl.api_keys)
        now = int(time.time())
        return {"object": "list", "data": [{"id": m, "object": "model", "created": now, "owned_by": "fastllava"}
                                           for m in reg.models()]}  # fmt: skip

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_api_key(request, ctl.api_keys)
        ctl.check_loop(request)
        raw = await parse_body(request, lambda body: body)  # a large body is parsed off the event loop
        model = raw.get("model") if isinstance(raw, dict) else None
        if model is None and len(reg.models()) == 1:
            model = reg.models()[0]
        # the workers' own schema and limits: whatever a worker would refuse is refused here, the same way
        body = P.validate_chat({**raw, "model": model} if isinstance(raw, dict) else raw,
                               reg.limits(model) if isinstance(model, str) else None)  # fmt: skip
        if body.model is None:
            raise P.bad_request("'model' (a string) is required", "model")
        # always stream from the worker: the first event tells us it has started, so retries are safe before it
        payload = {**body.model_dump(exclude_unset=True), "stream": True, "stream_options": {"include_usage": True}}
        ctl.metrics.requests.inc()
        opened = ctl.open_stream(body.model, payload, ctl.forward_headers(request, request_id_var.get()))
        worker, resp, lines, first = await until_disconnected(request, opened)
        logger.info("routed a chat request for %s to %s", body.model, worker)
        events = _worker_events(ctl, worker, resp, lines)
        if body.stream:
            relay = _relay_events(first, events, resp, body.include_usage)
            headers = {"Cache-Control": "no-cache", "X-Fastllava-Worker": worker}
            return StreamingResponse(relay, media_type="text/event-stream", headers=headers)
        evs = await until_disconnected(request, _collect_events(first, events))
        if "error" in evs[-1]:
            e = evs[-1]["error"]
            raise P.APIError(502 if e.get("code") == "worker_failed" else 500, e["message"], e.get("type"),
                             e.get("param"), e.get("code"))  # fmt: skip
        text, reason, use = P.assemble(evs)
        answer = P.completion(evs[0]["id"], body.model, text, reason, use, evs[0].get("created"))
        return JSONResponse(answer, headers={"X-Fastllava-Worker": worker})

    return router


async def _worker_events(ctl: Controller, worker: str, resp: httpx.Response, lines):
    """A worker's events after the first, as raw payloads; an error event if the worker dies."""
    try:
        while True:
            ev = await _next_event(lines)
            yield ev
            if ev == "[DONE]":
                return
    except StopAsyncIteration:
        ctl.metrics.failed_mid_stream.inc()
        yield json.dumps(_mid_stream_error(worker).body())
    except httpx.TransportError:
        ctl.metrics.failed_mid_stream.inc()
        ctl.registry.remove(worker, "the connection broke mid-stream")
        yield json.dumps(_mid_stream_error(worker).body())
    finally:
        await resp.aclose()


async def _relay_events(first: str, events, resp: httpx.Response, include_usage: bool):
    """The client's SSE stream: the first event, then the worker's, ending at [DONE] or after an error event."""
    try:
        yield _sse_raw(first, include_usage)
        async with contextlib.aclosing(events) as evs:
            async for ev in evs:
                out = _sse_raw(ev, include_usage)
                if out:
                    yield out
                if ev.startswith('{"error"'):
                    yield P.SSE_DONE
                    return
    finally:
        await resp.aclose()  # also when the client left: the worker sees it and aborts


async def _collect_events(first: str, events) -> list[dict]:
    evs = [json.loads(first)]
    async for ev in events:
        if ev == "[DONE]":
            break
        evs.append(json.loads(ev))
    return evs


class ControllerMetrics:
    """The controller's Prometheus registry (``GET /metrics``, through prometheus_client as the worker's):
    registered workers, read at scrape time, and counters of routed, retried and mid-stream-failed requests."""

    def __init__(self, registry: Registry) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        workers = Gauge("fastllava_controller_workers", "Workers registered with the controller", registry=r)
        workers.set_function(lambda: len(registry.workers))
        self.requests = Counter("fastllava_controller_requests", "Chat requests routed to a worker", registry=r)
        self.retries = Counter(
            "fastllava_controller_retries", "Worker attempts after a request's first (failover)", registry=r
        )
        self.failed_mid_stream = Counter(
            "fastllava_controller_failed_mid_stream", "Requests whose worker failed after the first token", registry=r
        )

    def response(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


def ops_routes(ctl: Controller) -> APIRouter:
    """``/health`` and ``/metrics``."""
    router = APIRouter()

    @router.get("/health")
    async def health():
        n = len(ctl.registry.models())
        return JSONResponse({"status": "ok" if n else "no_workers", "models": ctl.registry.models(),
                             "workers": len(ctl.registry.workers)})  # fmt: skip

    @router.get("/metrics")
    async def metrics():
        return ctl.metrics.response()

    return router


def build_app(ctl: Controller) -> FastAPI:
    routes = [worker_routes(ctl), llava_routes(ctl), openai_routes(ctl), ops_routes(ctl)]
    return http_app("fastllava controller", _lifespan(ctl), ctl.args, logger, routes)


def _llava_error_code(body: bytes) -> str | None:
    try:
        return json.loads(body.rstrip(b"\0"))["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


def _sse_raw(ev: str, include_usage: bool) -> bytes:
    """Re-frame a worker event for the client, dropping the usage chunk unless the client asked for it."""
    if ev == "[DONE]":
        return P.SSE_DONE
    if not include_usage:
        obj = json.loads(ev)
        if obj.get("object") == "chat.completion.chunk" and not obj.get("choices"):
            return b""
    return b"data: " + ev.encode() + b"\n\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=10000)
    p.add_argument("--dispatch-method", choices=["shortest_queue", "lottery"], default="shortest_queue")
    p.add_argument("--heart-beat-expiration", type=float, default=90.0, help="seconds without heartbeat (LLaVA's 90)")
    p.add_argument("--worker-token", default=None, help="shared worker token (else $FASTLLAVA_WORKER_TOKEN)")
    p.add_argument("--api-key", action="append", help="require this bearer key on /v1 (repeatable)")
    p.add_argument("--max-body-bytes", type=int, default=32 * 1024 * 1024)
    p.add_argument("--body-timeout", type=float, default=60.0, help="seconds to receive a request body (then 408)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ctl = Controller(args)
    if ctl.token is None:
        logger.warning("no worker token configured (--worker-token / FASTLLAVA_WORKER_TOKEN): accepting worker "
                       "registrations from loopback clients only")  # fmt: skip
    logger.info("controller on http://%s:%d, dispatch %s", args.host, args.port, args.dispatch_method)
    run_server(build_app(ctl), args.host, args.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
