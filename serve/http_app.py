"""HTTP plumbing shared by the controller and the workers (FastAPI/uvicorn live in ``serve/`` only).

- ``LimitsMiddleware``: a request id per request (``X-Request-Id``, echoed back and put in every log line
  through ``request_id_var``); the body-size cap, enforced from ``Content-Length`` *and* while reading (a
  chunked upload cannot get around it), and a deadline for reading the whole body (a client sending a byte a
  second gets a 408 and its connection closed), before any JSON or image is parsed; and the one path for
  unexpected errors: one traceback in the log with the request id, a 500 in OpenAI's shape naming the id;
- ``install_error_handlers``: ``APIError`` -> OpenAI's error shape;
- ``check_api_key``: optional bearer keys, on every route that generates;
- ``until_disconnected``: run a coroutine, cancelling it if the client goes away (aborts the generation);
- ``Server``: uvicorn whose first SIGTERM/SIGINT starts a graceful drain (``on_drain``) instead of exiting.
"""

from __future__ import annotations

import asyncio
import contextvars
import hmac
import logging
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import Any

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse

from fastllava import envs

from .protocol import APIError, parse_json_body

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024  # a few base64 images of a few MB each
DEFAULT_BODY_TIMEOUT = 60.0  # seconds to receive a whole request body (32 MB at ~0.5 MB/s)


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


def setup_logging(name: str, level: str | None = None) -> logging.Logger:
    """A logger whose lines carry the request id: ``... [req=<id>] message``."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [req=%(request_id)s] %(message)s"))
    handler.addFilter(_RequestIdFilter())
    logger = logging.getLogger(name)
    logger.handlers[:] = [handler]
    logger.setLevel(level or envs.FASTLLAVA_LOG_LEVEL)
    logger.propagate = False
    return logger


def _json_error(status: int, err: APIError) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    import json

    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers().items()]
    return status, headers, body


class LimitsMiddleware:
    """Pure ASGI: assigns the request id, caps the body size (413) and the time to read it (408), and turns
    any exception no handler took into one logged traceback and a 500 (all in OpenAI's shape)."""

    def __init__(
        self,
        app,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        body_timeout: float = DEFAULT_BODY_TIMEOUT,
        logger: logging.Logger | None = None,
    ) -> None:
        self.app, self.max_body_bytes, self.body_timeout = app, max_body_bytes, body_timeout
        self.logger = logger or logging.getLogger("fastllava.http")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")[:64] or uuid.uuid4().hex[:16]
        token = request_id_var.set(rid)
        scope.setdefault("state", {})["request_id"] = rid
        too_big = APIError(413, f"request body is over the limit of {self.max_body_bytes} bytes", code="body_too_large")
        started = finished = False
        try:
            length = headers.get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
                return await self._reply(send, too_big, rid)
            seen, body_done = 0, False
            deadline = asyncio.get_running_loop().time() + self.body_timeout

            async def limited_receive():
                nonlocal seen, body_done
                if body_done:  # after the body only a disconnect can come: no deadline on waiting for it
                    return await receive()
                try:
                    message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
                except TimeoutError:
                    raise APIError(408, f"the request body was not received within {self.body_timeout:g}s",
                                   code="request_timeout") from None  # fmt: skip
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    body_done = not message.get("more_body", False)
                    if seen > self.max_body_bytes:
                        raise APIError(413, too_big.message, code="body_too_large")
                else:
                    body_done = True
                return message

            async def send_with_id(message):
                nonlocal started, finished
                if message["type"] == "http.response.start":
                    started = True
                    message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
                elif message["type"] == "http.response.body" and not message.get("more_body", False):
                    finished = True
                await send(message)

            await self.app(scope, limited_receive, send_with_id)
        except Exception as exc:  # noqa: BLE001 -- the one place unexpected errors are logged and answered
            path = scope.get("path", "")
            self.logger.exception("%s %s failed: %s", scope.get("method"), path, type(exc).__name__)
            if not started:
                err = APIError(500, f"internal error ({type(exc).__name__}); request id {rid}, see the server log",
                               "server_error")  # fmt: skip
                await self._reply(send, err, rid)
            elif not finished:  # mid-stream: end the body cleanly (the stream's own handler said why)
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            request_id_var.reset(token)

    @staticmethod
    async def _reply(send, err: APIError, rid: str) -> None:
        status, headers, body = _json_error(err.status, err)
        await send(
            {"type": "http.response.start", "status": status, "headers": [*headers, (b"x-request-id", rid.encode())]}
        )
        await send({"type": "http.response.body", "body": body})


def http_app(title: str, lifespan: Callable, limits: Any, logger: logging.Logger, routers: list[APIRouter]) -> FastAPI:
    """A server's FastAPI app: ``LimitsMiddleware`` (``limits.max_body_bytes`` / ``limits.body_timeout``, the
    parsed CLI arguments), the error handlers, and its route groups."""
    app = FastAPI(title=title, lifespan=lifespan)
    app.add_middleware(LimitsMiddleware, max_body_bytes=limits.max_body_bytes, body_timeout=limits.body_timeout,
                       logger=logger)  # fmt: skip
    install_error_handlers(app, logger)
    for router in routers:
        app.include_router(router)
    return app


def install_error_handlers(app: FastAPI, logger: logging.Logger) -> None:
    """``APIError`` and ``ClientGone`` as responses; anything else is ``LimitsMiddleware``'s (one traceback)."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        if exc.status >= 500:
            logger.warning("%s %s -> %d %s", request.method, request.url.path, exc.status, exc.message)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, exc: ClientGone):
        logger.info("%s %s: client disconnected, request aborted", request.method, request.url.path)
        return JSONResponse({"error": None}, status_code=499)


def api_keys_from(args_keys: list[str] | None) -> list[str]:
    """API keys from ``--api-key`` (repeatable) or ``FASTLLAVA_API_KEYS`` (comma-separated)."""
    keys = list(args_keys or [])
    keys += envs.FASTLLAVA_API_KEYS
    return keys


def check_api_key(request: Request, keys: list[str]) -> None:
    """401 unless ``Authorization: Bearer <key>`` matches one of ``keys`` (no keys: open)."""
    if not keys:
        return
    auth = request.headers.get("authorization", "")
    given = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
    if not any(hmac.compare_digest(given.encode(), k.encode()) for k in keys):
        raise APIError(401, "invalid or missing API key (Authorization: Bearer ...)", "authentication_error",
                       None, "invalid_api_key")  # fmt: skip


PARSE_INLINE_BYTES = 64 * 1024  # bodies up to this size are parsed on the event loop (microseconds)


async def parse_body(request: Request, validate: Callable[[Any], Any], pool: Executor | None = None) -> Any:
    """Read, parse and validate a JSON body; a large one (up to the body cap: tens of MB of JSON, seconds of
    work) in ``pool`` so that the event loop keeps serving."""
    raw = await request.body()
    work = lambda: validate(parse_json_body(raw))
    if len(raw) <= PARSE_INLINE_BYTES:
        return work()
    return await asyncio.get_running_loop().run_in_executor(pool, work)


class ClientGone(Exception):
    """The client disconnected before the answer was ready."""


async def until_disconnected(request: Request, coro: Awaitable):
    """Await ``coro``; if the client disconnects first, cancel it (which aborts its generation) and raise
    ``ClientGone``. Call after the body has been read."""
    task = asyncio.ensure_future(coro)

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, Exception):  # the answer is moot: the client is gone
        pass
    raise ClientGone()


def client_is_loopback(request: Request) -> bool:
    import ipaddress

    host = request.client.host if request.client else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class Server(uvicorn.Server):
    """uvicorn with a graceful drain: the first SIGTERM/SIGINT calls ``on_drain`` (a coroutine that returns
    when in-flight work is done) and exits after it; a second signal exits at once."""

    def __init__(self, config: uvicorn.Config, on_drain: Callable[[], Awaitable[None]] | None = None) -> None:
        super().__init__(config)
        self.on_drain = on_drain
        self._draining = False

    def handle_exit(self, sig: int, frame) -> None:
        if self._draining or self.should_exit:  # a second signal: stop now
            self.should_exit = self.force_exit = True
            return
        if self.on_drain is None:
            self.should_exit = True
            return
        self._draining = True
        loop = self._loop

        async def drain() -> None:
            try:
                await self.on_drain()
            finally:
                self.should_exit = True

        loop.call_soon_threadsafe(lambda: loop.create_task(drain()))

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)


def make_server(app, host: str, port: int, on_drain=None, log_level: str = "warning") -> Server:
    """A ``Server`` for ``app`` (``asyncio.run(server.serve())``; ``server.should_exit = True`` stops it)."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=30)
    return Server(config, on_drain)


def run_server(app, host: str, port: int, on_drain=None, log_level: str = "warning") -> None:
    """Serve ``app`` until a signal (with a drain when ``on_drain`` is given)."""
    # our handle_exit records no signal, so uvicorn re-raises none: exit 0
    asyncio.run(make_server(app, host, port, on_drain, log_level).serve())
