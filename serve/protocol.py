"""Wire formats: the request schema shared by the controller and the workers (pydantic models with a bound
on every field), OpenAI chat-completion responses, stream chunks and errors, SSE, and LLaVA's worker
stream (JSON objects each followed by a NUL byte).

    body = parse_json_body(raw)                          # 400 for bad JSON, over-deep nesting
    req = validate_chat(body, limits)                    # 400 naming the field, e.g. messages[0].content[1].text
    gen = validate_llava(body, limits)                   # LLaVA's /worker_generate_stream body

The controller and the workers call the same two functions with the same ``Limits`` (a worker reports its
own in its status), so whatever a worker would refuse the controller refuses first, with the same message.
Errors name the field and never echo the value back: a bad data URL may be megabytes of base64, and error
messages end up in logs.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOP = 4  # OpenAI's limit on `stop` strings
MAX_STOP_CHARS = 256  # per stop string: the engine searches the new tail plus the longest stop string
MAX_MESSAGES = 1024
MAX_PARTS = 1024  # content parts per message
MAX_INT_DIGITS = 40  # longer integer literals are refused while parsing (int() of 5000 digits raises)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_NEW_TOKENS_LLAVA = 1024  # LLaVA's workers cap max_new_tokens here
LLAVA_ERROR = "**The worker could not answer this request.** "


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
        h = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}
        if self.status in (408, 413):  # the body was not read to its end: the connection cannot be reused
            h["Connection"] = "close"
        return h


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def overloaded(message: str, status: int = 503, retry_after: int = 1) -> APIError:
    kind = "rate_limit_exceeded" if status == 429 else "service_unavailable"
    return APIError(status, message, "server_error", None, kind, retry_after)


# ------------------------------------------------------------------------------------------------- JSON


class _TooLongInt(float):
    """An integer literal of more than ``MAX_INT_DIGITS`` digits: a float (inf) that no field accepts, so
    the error names the field instead of failing the whole parse (``int()`` refuses 4300+ digits)."""


def _parse_int(s: str) -> int | float:
    return int(s) if len(s) <= MAX_INT_DIGITS else _TooLongInt("inf")


def parse_json_body(raw: bytes) -> Any:
    """The request body as JSON, or a 400 that says where it broke (the body itself is not echoed).
    ``NaN``/``Infinity`` parse (the schema refuses them, naming the field); nesting deeper than Python's
    recursion limit is a 400, not a ``RecursionError``."""
    try:
        return json.loads(raw, parse_int=_parse_int)
    except RecursionError as e:
        raise bad_request("request body is nested too deeply", code="invalid_json") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        pos = f" at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        raise bad_request(f"request body is not valid JSON{pos}: {getattr(e, 'msg', e)}", code="invalid_json") from e


# ------------------------------------------------------------------------------------------- field types


def _utf8(s: str) -> str:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON's "\ud800" escape: a lone surrogate, which no tokenizer can take
        raise ValueError(f"contains a lone surrogate at position {e.start} (not valid UTF-8)") from None
    return s


Text = Annotated[str, AfterValidator(_utf8)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
Count = Annotated[int, Field(ge=0, le=INT64_MAX)]


def _one_or_list(v: Any) -> Any:
    return [v] if isinstance(v, str) else v


class _Strict(BaseModel):
    # strict: "5" is not an int and true is not a number (OpenAI refuses both); unknown fields are ignored
    model_config = ConfigDict(strict=True, extra="ignore")


@dataclass
class Limits:
    """What a worker accepts beyond the static bounds: its context, vocabulary and caps (None: unchecked)."""

    context_length: int | None = None
    vocab_size: int | None = None
    max_prompt_chars: int | None = None
    max_images: int | None = None

    def as_dict(self) -> dict[str, int | None]:
        return dict(self.__dict__)

    @classmethod
    def loosest(cls, many: Iterable[Limits]) -> Limits:
        """The limits of a model served by several workers: a request any of them accepts passes."""
        many = list(many)
        out = cls()
        for k in out.__dict__:
            vals = [getattr(m, k) for m in many]
            setattr(out, k, None if not vals or None in vals else max(vals))
        return out


# ----------------------------------------------------------------------------------------------- requests


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


def _image_url_object(v: Any) -> Any:
    if isinstance(v, str):
        raise ValueError('must be an object {"url": ...}, not a bare string')
    return v


class ImageURL(_Strict):
    url: Annotated[Text, Field(min_length=1)]
    detail: Literal["auto", "low", "high"] | None = None


class ContentPart(_Strict):
    type: Literal["text", "image_url"]
    text: Text | None = None
    image_url: Annotated[ImageURL | None, BeforeValidator(_image_url_object)] = None


def _content_parts(v: Any) -> Any:
    return [{"type": "text", "text": v}] if isinstance(v, str) else v


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[
        Annotated[list[ContentPart], Field(max_length=MAX_PARTS)] | None, BeforeValidator(_content_parts)
    ] = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatRequest(_Strict):
    """A ``POST /v1/chat/completions`` body (the fields we act on; others are ignored, as OpenAI's are)."""

    model: Text | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_tokens: Annotated[int, Field(ge=1, le=INT64_MAX)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1, le=INT64_MAX)] | None = None
    temperature: Annotated[Finite, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[Finite, Field(gt=0.0, le=1.0)] = 1.0
    top_k: Count = 0  # vLLM extension; 0 = off
    stop: Annotated[
        Annotated[list[Annotated[Text, Field(min_length=1, max_length=MAX_STOP_CHARS)]], Field(max_length=MAX_STOP)]
        | None,
        BeforeValidator(_one_or_list),
    ] = None
    seed: Int64 | None = None
    n: Annotated[int, Field(ge=1, le=INT64_MAX)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM extension (benchmarks, tests)

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def to_messages(self) -> list[Message]:
        """The messages as text pieces and ``ImageRef``s, roles normalised (developer -> system)."""
        out = []
        for i, m in enumerate(self.messages):
            pieces: list[str | ImageRef] = []
            for j, p in enumerate(m.content or []):
                if p.type == "text":
                    pieces.append(p.text)
                else:
                    pieces.append(ImageRef(p.image_url.url, f"messages[{i}].content[{j}].image_url"))
            out.append(Message(ROLES[m.role], pieces))
        return out

    @property
    def images(self) -> list[ImageRef]:
        return [p for m in self.to_messages() for p in m.content if isinstance(p, ImageRef)]

    def prompt_chars(self) -> int:
        return sum(len(p.text or "") for m in self.messages for p in m.content or [])


class LlavaGenerateRequest(_Strict):
    """LLaVA's ``/worker_generate_stream`` body (what its web UI and CLI send)."""

    model: Text | None = None
    prompt: Text
    images: Annotated[list[Annotated[Text, Field(min_length=1)]], Field(max_length=MAX_PARTS)] | None = None
    temperature: Annotated[Finite, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[Finite, Field(gt=0.0, le=1.0)] = 1.0
    max_new_tokens: Annotated[int, Field(ge=1, le=INT64_MAX)] = 256
    stop: Annotated[Text, Field(max_length=MAX_STOP_CHARS)] | None = None


class WorkerStatus(_Strict):
    """What a worker reports about itself (registration, heartbeats, ``/worker_get_status``)."""

    model_names: Annotated[list[Annotated[Text, Field(min_length=1, max_length=256)]], Field(max_length=64)]
    speed: Annotated[Finite, Field(gt=0.0, le=1e9)] = 1.0
    queue_length: Annotated[int, Field(ge=0, le=10**9)] = 0
    limits: dict[str, Annotated[int, Field(ge=0, le=INT64_MAX)] | None] | None = None

    def worker_limits(self) -> Limits:
        known = Limits().__dict__
        return Limits(**{k: v for k, v in (self.limits or {}).items() if k in known})


WorkerName = Annotated[Text, Field(max_length=2048, pattern=r"^https?://[^\s/?#@]+/?$")]


class RegisterWorker(_Strict):
    worker_name: WorkerName
    check_heart_beat: bool = True
    worker_status: WorkerStatus | None = None


class HeartBeat(_Strict):
    worker_name: Annotated[Text, Field(max_length=2048)]
    queue_length: Annotated[int, Field(ge=0, le=10**9)] = 0
    worker_status: WorkerStatus | None = None


class WorkerNameBody(_Strict):
    worker_name: Annotated[Text, Field(max_length=2048)]


class ModelBody(_Strict):
    model: Annotated[Text, Field(max_length=1024)]


def _param(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def validate(model: type[BaseModel], body: Any):
    """``model`` validated from a parsed body; a 400 naming the first bad field (never its value)."""
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        err = e.errors(include_url=False, include_input=False)[0]
        param = _param(err["loc"]) or None
        msg = err["msg"].removeprefix("Value error, ")
        raise bad_request(f"'{param}': {msg}" if param else msg, param) from None


def _check_context(max_tokens: int | None, top_k: int, limits: Limits, name: str = "max_tokens") -> None:
    if max_tokens is not None and limits.context_length is not None and max_tokens > limits.context_length:
        raise bad_request(
            f"'{name}' is {max_tokens}, over this model's maximum context length of {limits.context_length} tokens",
            name,
            "context_length_exceeded",
        )
    if limits.vocab_size is not None and top_k > limits.vocab_size:
        raise bad_request(f"'top_k' must be at most the vocabulary size {limits.vocab_size}", "top_k")


def _check_prompt(chars: int, n_images: int, limits: Limits, param: str, images_param: str) -> None:
    # checked before anything is tokenized or decoded: tokenizing 10 MB of text takes seconds
    if limits.max_prompt_chars is not None and chars > limits.max_prompt_chars:
        raise bad_request(
            f"the prompt has {chars} characters, over this server's limit of {limits.max_prompt_chars}",
            param,
            "context_length_exceeded",
        )
    if limits.max_images is not None and n_images > limits.max_images:
        raise bad_request(
            f"too many images: {n_images} in the request, at most {limits.max_images} allowed",
            images_param,
            "too_many_images",
        )


def validate_chat(body: Any, limits: Limits | None = None) -> ChatRequest:
    """Validate a chat-completions body; raises a 400 ``APIError`` naming the field. Counts (images, prompt
    characters) are checked here, before any image is decoded or text tokenized."""
    limits = limits or Limits()
    req = validate(ChatRequest, body)
    last = len(req.messages) - 1
    if ROLES[req.messages[last].role] != "user":
        raise bad_request("the last message must be from the user", f"messages[{last}].role")
    if req.n not in (None, 1):
        raise bad_request("only n=1 is supported", "n")
    if req.stream_options is not None and not req.stream:
        raise bad_request("'stream_options' is only allowed with stream=true", "stream_options")
    for i, m in enumerate(req.messages):
        for j, p in enumerate(m.content or []):
            if getattr(p, p.type) is None:
                raise bad_request(f"a '{p.type}' part needs a '{p.type}' field", f"messages[{i}].content[{j}].{p.type}")
    name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    _check_context(req.max_new_tokens, req.top_k, limits, name)
    _check_prompt(req.prompt_chars(), len(req.images), limits, "messages", "messages")
    return req


def validate_llava(body: Any, limits: Limits | None = None) -> LlavaGenerateRequest:
    """Validate LLaVA's ``/worker_generate_stream`` body (same limits as the chat route)."""
    limits = limits or Limits()
    req = validate(LlavaGenerateRequest, body)
    _check_prompt(len(req.prompt), len(req.images or []), limits, "prompt", "images")
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


def llava_error_frame(err: APIError) -> bytes:
    """An error as a LLaVA frame: LLaVA's clients show ``text`` when ``error_code`` is not 0; ``error`` is
    the same object an OpenAI route answers (its status goes in the HTTP status)."""
    return llava_frame({"text": LLAVA_ERROR + err.message, "error_code": 1, **err.body()})


def llava_frames(buffer: bytes) -> tuple[list[dict], bytes]:
    """Split complete NUL-terminated frames off ``buffer``; returns them and the incomplete rest."""
    *done, rest = buffer.split(b"\0")
    return [json.loads(f) for f in done if f], rest
