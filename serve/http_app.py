"""HTTP plumbing shared by the controller and the workers (FastAPI/uvicorn live in ``serve/`` only).

- ``LimitsMiddleware``: a request id per request (``X-Request-Id``, echoed back and put in every log line
  through ``request_id_var``) and the body-size cap, enforced from ``Content-Length`` *and* while reading
  (a chunked upload cannot get around it), before any JSON or image is parsed;
- ``install_error_handlers``: ``APIError`` -> OpenAI's error shape; anything unexpected -> a 500 in the same
  shape, logged with its request id, never with the request body;
- ``check_api_key``: optional bearer keys for ``/v1/*``;
- ``until_disconnected``: run a coroutine, cancelling it if the client goes away (aborts the generation);
- ``Server``: uvicorn whose first SIGTERM/SIGINT starts a graceful drain (``on_drain``) instead of exiting.
"""

from __future__ import annotations

import asyncio
import contextvars
import hmac
import logging
import os
import uuid
from collections.abc import Awaitable, Callable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from .protocol import APIError

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024  # a few base64 images of a few MB each


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
    logger.setLevel(level or os.environ.get("FASTLLAVA_LOG_LEVEL", "INFO"))
    logger.propagate = False
    return logger


def _json_error(status: int, err: APIError) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    import json

    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers().items()]
    return status, headers, body


class LimitsMiddleware:
    """Pure ASGI: assigns the request id and caps the body size (413 in OpenAI's shape)."""

    def __init__(self, app, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.app, self.max_body_bytes = app, max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")[:64] or uuid.uuid4().hex[:16]
        token = request_id_var.set(rid)
        scope.setdefault("state", {})["request_id"] = rid
        too_big = APIError(413, f"request body is over the limit of {self.max_body_bytes} bytes", code="body_too_large")
        try:
            length = headers.get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
                return await self._reply(send, too_big, rid)
            seen = 0

            async def limited_receive():
                nonlocal seen
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > self.max_body_bytes:
                        raise APIError(413, too_big.message, code="body_too_large")
                return message

            async def send_with_id(message):
                if message["type"] == "http.response.start":
                    message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
                await send(message)

            await self.app(scope, limited_receive, send_with_id)
        finally:
            request_id_var.reset(token)

    @staticmethod
    async def _reply(send, err: APIError, rid: str) -> None:
        status, headers, body = _json_error(err.status, err)
        await send(
            {"type": "http.response.start", "status": status, "headers": [*headers, (b"x-request-id", rid.encode())]}
        )
        await send({"type": "http.response.body", "body": body})


def install_error_handlers(app: FastAPI, logger: logging.Logger) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        if exc.status >= 500:
            logger.warning("%s %s -> %d %s", request.method, request.url.path, exc.status, exc.message)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, exc: ClientGone):
        logger.info("%s %s: client disconnected, request aborted", request.method, request.url.path)
        return JSONResponse({"error": None}, status_code=499)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        logger.exception("%s %s failed: %s", request.method, request.url.path, type(exc).__name__)
        err = APIError(500, f"internal error ({type(exc).__name__}); see the server log", "server_error")
        return JSONResponse(err.body(), status_code=500)


def api_keys_from(args_keys: list[str] | None) -> list[str]:
    """API keys from ``--api-key`` (repeatable) or ``FASTLLAVA_API_KEYS`` (comma-separated)."""
    keys = list(args_keys or [])
    keys += [k.strip() for k in os.environ.get("FASTLLAVA_API_KEYS", "").split(",") if k.strip()]
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


def run_server(app, host: str, port: int, on_drain=None, log_level: str = "warning") -> None:
    """Serve ``app`` until a signal (with a drain when ``on_drain`` is given)."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=30)
    server = Server(config, on_drain)
    asyncio.run(server.serve())  # our handle_exit records no signal, so uvicorn re-raises none: exit 0
