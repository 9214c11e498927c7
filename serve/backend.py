"""What a worker generates with: the model (``load_pretrained_model``) behind the continuous-batching engine.

    backend = EngineBackend(BackendConfig(model_path="path/to/llava"))
    backend.load()                                                     # blocking: run it in a thread
    req = await backend.prepare("req-1", messages, image_refs, policy, SamplingArgs(max_tokens=64))
    async for delta in backend.stream(req):                            # text pieces, then finish_reason
        ...

Everything CPU-heavy about a request runs in a small thread pool, never on the event loop: image decoding,
prompt building, tokenization and the engine's ``make_request`` (the one front door, where images are
preprocessed and hashed and the context checked). The pool's size bounds how many requests do that work
at once, and ``PixelBudget`` bounds the image pixels they hold. The engine's errors become HTTP errors
here (``engine_errors``).

Prompts are built by ``fastllava.prompting``, as ``serve.cli`` builds them: the LLaVA template guessed from the
model name (or ``conv_mode``), the checkpoint's chat template when it carries one, ``<image>`` placeholders
expanded by ``tokenizer_image_token`` and then by the engine into as many slots as each image yields, so the
prompt length (and ``usage.prompt_tokens``) counts image tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from fastllava.constants import IMAGE_TOKEN_INDEX
from fastllava.conversation import guess_conv_mode
from fastllava.engine import (
    AsyncLLMEngine,
    EngineConfig,
    EngineDeadError,
    LLMEngine,
    QueueFullError,
    Request,
    RequestFailedError,
    RequestMetrics,
    RequestTooLargeError,
    SamplingParams,
)
from fastllava.mm_utils import get_model_name_from_path, tokenizer_image_token
from fastllava.prompting import messages_prompt, template, template_stop

from . import protocol as P
from .images import ImagePolicy, PixelBudget, decode_sources, image_sources

logger = logging.getLogger("fastllava.worker")
CHARS_PER_TOKEN_CAP = 32  # prompt characters allowed per context token (no tokenizer packs more per token)
ENGINE_FIELDS = ("max_num_seqs", "max_waiting_requests", "num_blocks", "max_model_len")  # BackendConfig -> engine


@dataclass
class BackendConfig:
    model_path: str
    model_base: str | None = None
    model_name: str | None = None  # None: from the path, as LLaVA names workers' models
    device: str = "cpu"
    dtype: str | None = None
    load_4bit: bool = False
    load_8bit: bool = False
    attn_implementation: str | None = None
    conv_mode: str | None = None  # None: guessed from the model name
    max_num_seqs: int = 64
    max_waiting_requests: int = 256
    num_blocks: int | None = None
    max_model_len: int | None = None
    default_max_tokens: int = 512  # when a request names none (capped by the context left)
    preprocess_threads: int = 2  # the pool that decodes, tokenizes and preprocesses requests
    max_prompt_chars: int | None = None  # None: CHARS_PER_TOKEN_CAP x the context length
    max_pixels_in_flight: int = 8 * 4096 * 4096  # image pixels being decoded/preprocessed at once
    tensor_parallel_size: int = 1  # ranks the language model is sharded over (one process per device)


@dataclass
class SamplingArgs:
    """A request's sampling settings as the HTTP routes give them (``max_tokens=None``: up to the default)."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False
    clamp_max_tokens: bool = False  # LLaVA's workers cut max_new_tokens to the context left


@dataclass
class Delta:
    """A piece of a streamed answer; the last one has ``finish_reason`` ("stop", "length", "abort")."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    metrics: RequestMetrics | None = None


@contextlib.contextmanager
def engine_errors(
    request_id: str, on_dead: Callable[[BaseException], None] | None = None, context_len: int | None = None
) -> Iterator[None]:
    """The engine's exceptions as HTTP errors: bad input 400 (naming the field), a full queue 429, a failed
    request 500 with its id, a dead engine 503 (and ``on_dead``, which takes the worker out of service)."""
    try:
        yield
    except RequestTooLargeError as e:
        param = getattr(e, "param", None) or "messages"
        what = f"this model's maximum context length is {context_len} tokens: " if context_len else ""
        raise P.bad_request(what + str(e), param, "context_length_exceeded") from e
    except QueueFullError as e:
        raise P.overloaded(f"the worker's queue is full ({e}); retry later", status=429) from e
    except RequestFailedError as e:
        logger.error("request %s failed in the engine: %s", request_id, e.__cause__ or e)
        raise P.APIError(500, f"the generation of request {request_id} failed; the worker keeps serving, retry it",
                         "server_error", None, "request_failed") from e  # fmt: skip
    except EngineDeadError as e:
        if on_dead is not None:
            on_dead(e)
        raise P.APIError(503, "the worker's engine has failed; the worker is restarting", "server_error", None,
                         "worker_unhealthy", retry_after=5) from e  # fmt: skip
    except (ValueError, TypeError) as e:  # SamplingParams / make_request: the message starts with the field
        first = str(e).split(" ", 1)[0]
        param = first if first.isidentifier() and first in SamplingParams.__dataclass_fields__ else None
        raise P.bad_request(str(e), param) from e


class EngineBackend:
    """Loads the model, builds requests in a bounded pool, and streams them through ``AsyncLLMEngine``."""

    def __init__(self, config: BackendConfig, on_dead: Callable[[BaseException], None] | None = None) -> None:
        self.config = config
        self.on_dead = on_dead
        self.model_name = config.model_name or get_model_name_from_path(str(config.model_path))
        self.engine: AsyncLLMEngine | None = None
        self.tokenizer = self.model = self.image_processor = None
        self.context_len = 0
        self.vocab_size: int | None = None
        self.pool = ThreadPoolExecutor(config.preprocess_threads, thread_name_prefix="preprocess")
        self.pixels = PixelBudget(config.max_pixels_in_flight)
        self._recent: deque[tuple[float, int]] = deque(maxlen=4096)  # (time, tokens) for the throughput

    # ------------------------------------------------------------------------------------------ loading
    def load(self) -> None:
        """Load the checkpoint and build the engine (blocking, seconds to minutes)."""
        from fastllava.model.builder import load_pretrained_model

        c = self.config
        self.tokenizer, self.model, self.image_processor, self.context_len = load_pretrained_model(
            c.model_path,
            c.model_base,
            self.model_name,
            c.load_8bit,
            c.load_4bit,
            device=c.device,
            dtype=c.dtype,
            attn_implementation=c.attn_implementation,
            tensor_parallel_size=c.tensor_parallel_size,
        )
        self.conv_mode = c.conv_mode or guess_conv_mode(self.model_name)
        template(self.conv_mode)  # an unknown one is a ValueError naming the known ones
        engine = LLMEngine(
            self.model,
            self.tokenizer,
            EngineConfig(**{k: getattr(c, k) for k in ENGINE_FIELDS}),
            image_processor=self.image_processor,
        )
        self.context_len = engine.max_model_len
        self.vocab_size = int(self.model.config.text.vocab_size)
        self.engine = AsyncLLMEngine(engine, on_dead=self.on_dead)

    @property
    def loaded(self) -> bool:
        return self.engine is not None

    def limits(self, max_images: int | None) -> P.Limits:
        """What this worker accepts (validated before any work, by the worker and by its controller)."""
        if not self.loaded:
            return P.Limits(max_images=max_images)
        chars = self.config.max_prompt_chars or CHARS_PER_TOKEN_CAP * self.context_len
        return P.Limits(self.context_len, self.vocab_size, chars, max_images)

    # ------------------------------------------------------------------------------------------ prompts
    def chat_prompt(self, messages: list[P.Message]) -> str:
        """The prompt for OpenAI-style messages (``fastllava.prompting.messages_prompt``): each image part becomes
        the image tag where it stands, system text replaces the template's system prompt."""
        turns = [(m.role, m.content) for m in messages]  # content parts: text, or a P.ImageRef for an image
        mm_tags = getattr(self.model.config, "mm_use_im_start_end", False)
        return messages_prompt(self.conv_mode, turns, self.tokenizer, mm_tags)

    # ---------------------------------------------------------------------------------------- requests
    async def prepare(
        self,
        request_id: str,
        prompt: str | list[P.Message],
        image_refs: list,
        policy: ImagePolicy,
        args: SamplingArgs,
    ) -> Request:
        """Fetch, decode, tokenize and make an engine request (a prompt string as LLaVA sends it, or chat
        messages). Raises ``APIError``: 400 for bad input, 429 when the pixel budget is full."""
        sources = await image_sources(image_refs, policy)
        pixels = sum(s.pixels for s in sources)
        self.pixels.take(pixels)

        def job() -> Request:  # the pixels are given back when the work is done, even if the client left
            try:
                return self._make(request_id, prompt, sources, policy, args)
            finally:
                self.pixels.give(pixels)

        return await asyncio.get_running_loop().run_in_executor(self.pool, job)

    def _make(self, request_id: str, prompt, sources, policy: ImagePolicy, args: SamplingArgs) -> Request:
        """The blocking half of ``prepare`` (in the pool)."""
        images = decode_sources(sources, policy)
        text = prompt if isinstance(prompt, str) else self.chat_prompt(prompt)
        ids = tokenizer_image_token(text, self.tokenizer, IMAGE_TOKEN_INDEX)
        n_placeholders = sum(1 for t in ids if t == IMAGE_TOKEN_INDEX)
        if n_placeholders != len(images):
            param = "prompt" if isinstance(prompt, str) else "messages"
            raise P.bad_request(f"the prompt has {n_placeholders} <image> placeholders but {len(images)} images", param)
        stops = list(args.stop)
        if (t := template_stop(self.conv_mode)) is not None and t not in stops:
            stops.append(t)
        clamp = args.clamp_max_tokens or args.max_tokens is None
        with engine_errors(request_id, context_len=self.context_len):
            params = SamplingParams(
                max_tokens=args.max_tokens or self.config.default_max_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                top_k=args.top_k,
                seed=args.seed,
                stop=stops,
                ignore_eos=args.ignore_eos,
            )
            return self.engine.engine.make_request(ids, images, params, request_id, clamp_max_tokens=clamp)

    # --------------------------------------------------------------------------------------- generation
    async def stream(self, req: Request) -> AsyncIterator[Delta]:
        """Stream one request. Leading whitespace of the answer is dropped (LLaVA strips its answers).
        Closing the iterator early aborts the request in the engine."""
        gen = self.engine.generate_request(req)
        started = False
        try:
            with engine_errors(req.request_id, self.on_dead):
                async for out in gen:
                    text = out.delta_text
                    if not started:
                        text = text.lstrip()
                        started = bool(text)
                    if out.new_token_ids:
                        self._recent.append((time.monotonic(), len(out.new_token_ids)))
                    if text or out.finished:
                        yield Delta(text, out.finish_reason, req.num_prompt_tokens, out.num_output_tokens, out.metrics)
        finally:
            await gen.aclose()

    # ---------------------------------------------------------------------------------------------- status
    def throughput(self, window: float = 10.0) -> float:
        """Generated tokens per second over the last ``window`` seconds."""
        now = time.monotonic()
        return sum(n for t, n in self._recent if now - t <= window) / window

    def engine_metrics(self):
        return self.engine.metrics() if self.engine is not None else None
