"""Wire formats: OpenAI chat completions (validation, responses, stream chunks, errors, SSE) and LLaVA's
worker stream (JSON objects each followed by a NUL byte).

Validation is hand-written rather than a pydantic model so that every error names the exact field
(``messages[0].content[1].image_url``) and never echoes the value back: a bad data URL may be megabytes of
base64, and error messages end up in logs.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOP = 4  # OpenAI's limit on `stop` strings


class APIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def overloaded(message: str, status: int = 503, retry_after: int = 1) -> APIError:
    kind = "rate_limit_exceeded" if status == 429 else "service_unavailable"
    return APIError(status, message, "server_error", None, kind, retry_after)


# ------------------------------------------------------------------------------------------------ requests


@dataclass
class ImageRef:
    """An ``image_url`` part: the URL (data:, http(s), file or path) and where it was in the request."""

    url: str
    param: str  # e.g. "messages[0].content[1].image_url"


@dataclass
class Message:
    """One chat message: its role and content as text pieces and ``ImageRef``s, in order."""

    role: str  # "system", "user" or "assistant"
    content: list[str | ImageRef]


@dataclass
class ChatRequest:
    """A validated ``POST /v1/chat/completions`` body (only the fields we act on)."""

    model: str | None
    messages: list[Message]
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # vLLM extension
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False  # vLLM extension (benchmarks, tests)

    @property
    def images(self) -> list[ImageRef]:
        return [p for m in self.messages for p in m.content if isinstance(p, ImageRef)]


def parse_json_body(raw: bytes) -> Any:
    """The request body as JSON, or a 400 that says where it broke (the body itself is not echoed)."""
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        pos = f" at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        raise bad_request(f"request body is not valid JSON{pos}: {getattr(e, 'msg', e)}", code="invalid_json") from e


def _number(body: dict, key: str, lo: float, hi: float, default: float) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise bad_request(f"'{key}' must be a number", key)
    if not lo <= v <= hi:
        raise bad_request(f"'{key}' must be between {lo} and {hi}, got {v}", key)
    return float(v)


def _int(body: dict, key: str, lo: int | None = None) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad_request(f"'{key}' must be an integer", key)
    if lo is not None and v < lo:
        raise bad_request(f"'{key}' must be >= {lo}, got {v}", key)
    return v


def _content(content: Any, where: str) -> list[str | ImageRef]:
    if isinstance(content, str):
        return [content]
    if content is None:
        return []
    if not isinstance(content, list):
        raise bad_request(f"'{where}' must be a string or a list of content parts", where)
    out: list[str | ImageRef] = []
    for j, part in enumerate(content):
        p = f"{where}[{j}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise bad_request(f"'{p}' must be an object with a 'type'", p)
        kind = part["type"]
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise bad_request(f"'{p}.text' must be a string", f"{p}.text")
            out.append(part["text"])
        elif kind == "image_url":
            iu = part.get("image_url")
            if isinstance(iu, str):
                raise bad_request(
                    f"'{p}.image_url' must be an object {{\"url\": ...}}, not a bare string", f"{p}.image_url"
                )
            if not isinstance(iu, dict) or not isinstance(iu.get("url"), str) or not iu["url"]:
                raise bad_request(f"'{p}.image_url' must be an object with a non-empty 'url'", f"{p}.image_url")
            out.append(ImageRef(iu["url"], f"{p}.image_url"))
        else:
            raise bad_request(f"'{p}.type' {kind[:40]!r} is not supported (use 'text' or 'image_url')", f"{p}.type")
    return out


def parse_chat_request(body: Any, max_images: int | None = None) -> ChatRequest:
    """Validate a chat-completions body; raises a 400 ``APIError`` naming the field. The image count is
    checked here, before any image is decoded."""
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request("'model' must be a string", "model")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad_request("'messages' must be a non-empty list", "messages")
    messages = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise bad_request(f"'messages[{i}]' must be an object", f"messages[{i}]")
        role = ROLES.get(m.get("role")) if isinstance(m.get("role"), str) else None
        if role is None:
            raise bad_request(
                f"'messages[{i}].role' must be one of {sorted(ROLES)}, got {str(m.get('role'))[:40]!r}",
                f"messages[{i}].role",
            )
        messages.append(Message(role, _content(m.get("content"), f"messages[{i}].content")))
    if messages[-1].role != "user":
        raise bad_request("the last message must be from the user", f"messages[{len(messages) - 1}].role")
    n = _int(body, "n", 1)
    if n not in (None, 1):
        raise bad_request("only n=1 is supported", "n")
    max_tokens = _int(body, "max_completion_tokens", 1)
    max_tokens = _int(body, "max_tokens", 1) if max_tokens is None else max_tokens
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise bad_request("'stop' must be a string or a list of strings", "stop")
    if len(stop) > MAX_STOP or any(not s for s in stop):
        raise bad_request(f"'stop' takes at most {MAX_STOP} non-empty strings", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean", "stream")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise bad_request("'stream_options' must be an object", "stream_options")
    include_usage = bool((opts or {}).get("include_usage", False))
    if opts and not stream:
        raise bad_request("'stream_options' is only allowed with stream=true", "stream_options")
    req = ChatRequest(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0.0, 2.0, 1.0),
        top_p=_number(body, "top_p", 0.0, 1.0, 1.0),
        top_k=_int(body, "top_k", 0) or 0,
        stop=list(stop),
        seed=_int(body, "seed"),
        stream=stream,
        include_usage=include_usage,
        ignore_eos=bool(body.get("ignore_eos", False)),
    )
    if req.top_p == 0:
        raise bad_request("'top_p' must be > 0", "top_p")
    if max_images is not None and len(req.images) > max_images:
        raise bad_request(
            f"too many images: {len(req.images)} in the request, at most {max_images} allowed",
            "messages",
            "too_many_images",
        )
    return req


# ----------------------------------------------------------------------------------------------- responses


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion(rid: str, model: str, text: str, finish_reason: str | None, use: dict, created: int | None = None):
    """A non-streamed ``chat.completion`` object."""
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created or int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": use,
    }


def chunk(rid: str, model: str, created: int, delta: dict | None, finish_reason: str | None = None, use=None):
    """A ``chat.completion.chunk``: one choice with ``delta``, or (``delta=None``) the usage-only chunk."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": use,
    }


def sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def sse_events(lines: Iterable[str]) -> Iterator[str]:
    """The ``data:`` payloads of SSE lines (``[DONE]`` included); comments and other fields are skipped."""
    for line in lines:
        if line.startswith("data:"):
            yield line[5:].strip()


def assemble(events: Iterable[dict]) -> tuple[str, str | None, dict | None]:
    """Text, finish reason and usage of a finished stream of chunks (how the controller answers a
    non-streamed request that it streamed from a worker)."""
    text, reason, use = [], None, None
    for ev in events:
        for ch in ev.get("choices") or []:
            text.append((ch.get("delta") or {}).get("content") or "")
            reason = ch.get("finish_reason") or reason
        use = ev.get("usage") or use
    return "".join(text), reason, use


# ----------------------------------------------------------------------------------------- LLaVA framing


def llava_frame(obj: dict) -> bytes:
    """One message of LLaVA's ``/worker_generate_stream``: JSON then a NUL byte."""
    return json.dumps(obj).encode() + b"\0"


def llava_frames(buffer: bytes) -> tuple[list[dict], bytes]:
    """Split complete NUL-terminated frames off ``buffer``; returns them and the incomplete rest."""
    *done, rest = buffer.split(b"\0")
    return [json.loads(f) for f in done if f], rest
