"""What a worker generates with: the model (``load_pretrained_model``) behind the continuous-batching engine.

    backend = EngineBackend(BackendConfig(model_path="path/to/llava"))
    backend.load()                                                     # blocking: run it in a thread
    prep = await backend.prepare("req-1", backend.chat_prompt(messages), images, max_tokens=64)
    async for delta in backend.stream(prep):                           # text pieces, then finish_reason
        ...

Prompts are built as ``serve.cli`` builds them: the LLaVA template guessed from the model name (or
``conv_mode``), the checkpoint's chat template when it carries one, ``<image>`` placeholders expanded by
``tokenizer_image_token`` and then by the engine into as many slots as each image yields, so the prompt
length (and ``usage.prompt_tokens``) counts image tokens.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastllava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from fastllava.conversation import SeparatorStyle, apply_chat_template, conv_templates, guess_conv_mode
from fastllava.engine import (
    AsyncLLMEngine,
    EngineConfig,
    EngineImage,
    LLMEngine,
    QueueFullError,
    RequestMetrics,
    RequestTooLargeError,
    SamplingParams,
)
from fastllava.mm_utils import get_model_name_from_path, process_images, tokenizer_image_token
from fastllava.packing import image_token_count

from .protocol import ImageRef, Message, bad_request, overloaded


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


@dataclass
class Prepared:
    """A request ready for the engine."""

    request_id: str
    prompt: str
    prompt_token_ids: list[int]  # with IMAGE_TOKEN_INDEX placeholders
    images: list[EngineImage]
    params: SamplingParams
    prompt_tokens: int  # after image expansion


@dataclass
class Delta:
    """A piece of a streamed answer; the last one has ``finish_reason`` ("stop", "length", "abort")."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    metrics: RequestMetrics | None = None


class EngineBackend:
    """Loads the model, builds prompts, and streams generations through ``AsyncLLMEngine``."""

    def __init__(self, config: BackendConfig) -> None:
        self.config = config
        self.model_name = config.model_name or get_model_name_from_path(str(config.model_path))
        self.engine: AsyncLLMEngine | None = None
        self.tokenizer = self.model = self.image_processor = None
        self.context_len = 0
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
        )
        mode = c.conv_mode or guess_conv_mode(self.model_name)
        if mode not in conv_templates:
            raise ValueError(f"conv_mode {mode!r} is unknown; choose from {sorted(conv_templates)}")
        self.conv_mode = mode
        engine = LLMEngine(
            self.model,
            self.tokenizer,
            EngineConfig(
                max_num_seqs=c.max_num_seqs,
                max_waiting_requests=c.max_waiting_requests,
                num_blocks=c.num_blocks,
                max_model_len=c.max_model_len,
            ),
            image_processor=self.image_processor,
        )
        self.context_len = engine.max_model_len
        self.engine = AsyncLLMEngine(engine)

    @property
    def loaded(self) -> bool:
        return self.engine is not None

    # ------------------------------------------------------------------------------------------ prompts
    def _image_tag(self) -> str:
        if getattr(self.model.config, "mm_use_im_start_end", False):
            return DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN
        return DEFAULT_IMAGE_TOKEN

    def chat_prompt(self, messages: list[Message]) -> str:
        """The prompt for OpenAI-style messages: system text replaces the template's system prompt; each
        image part becomes an ``<image>`` where it stands (LLaVA puts it first: "<image>\\ntext")."""
        conv = conv_templates[self.conv_mode].copy()
        system = [p for m in messages if m.role == "system" for p in m.content if isinstance(p, str)]
        if system:
            conv.system = "\n".join(system)
        roles = {"user": conv.roles[0], "assistant": conv.roles[1]}
        turns: list[tuple[str, str]] = []
        for m in messages:
            if m.role == "system":
                continue
            pieces = [self._image_tag() if isinstance(p, ImageRef) else p.strip() for p in m.content]
            text = "\n".join(p for p in pieces if p)
            if turns and turns[-1][0] == roles[m.role]:  # merge consecutive turns of one role
                turns[-1] = (turns[-1][0], turns[-1][1] + "\n" + text)
            else:
                turns.append((roles[m.role], text))
        for role, text in turns:
            conv.append_message(role, text)
        conv.append_message(conv.roles[1], None)
        return apply_chat_template(self.tokenizer, conv) or conv.get_prompt()

    def template_stop(self) -> str | None:
        """The template's end-of-turn separator (what LLaVA's workers stop on)."""
        conv = conv_templates[self.conv_mode]
        stop = conv.sep if conv.sep_style != SeparatorStyle.TWO else conv.sep2
        return stop if stop and stop.strip() else None

    def _engine_images(self, images) -> list[EngineImage]:
        """Preprocess PIL images (CPU work: call in a thread); keyed by a hash of their pixels."""
        out = []
        for im in images:
            px = process_images([im], self.image_processor, self.model.config)[0]
            key = hashlib.sha256(f"{im.size}".encode() + im.tobytes()).hexdigest()
            out.append(EngineImage(px, (im.size[1], im.size[0]), key))
        return out

    async def prepare(
        self,
        request_id: str,
        prompt: str,
        images: list,
        *,
        max_tokens: int | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        stop: list[str] | None = None,
        seed: int | None = None,
        ignore_eos: bool = False,
        clamp_max_tokens: bool = False,
    ) -> Prepared:
        """Tokenize and check a request; a 400 ``APIError`` when it cannot fit the context (or, with
        ``clamp_max_tokens``, as LLaVA's workers do, ``max_tokens`` is cut to the context left)."""
        ids = tokenizer_image_token(prompt, self.tokenizer, IMAGE_TOKEN_INDEX)
        n_placeholders = sum(1 for t in ids if t == IMAGE_TOKEN_INDEX)
        if n_placeholders != len(images):
            raise bad_request(f"the prompt has {n_placeholders} <image> placeholders but {len(images)} images")
        eimgs = await asyncio.to_thread(self._engine_images, images) if images else []
        n_prompt = len(ids) - n_placeholders + sum(image_token_count(self.model.config, e.size_hw) for e in eimgs)
        room = self.context_len - n_prompt
        if room <= 0:
            raise bad_request(
                f"this model's maximum context length is {self.context_len} tokens, but the messages take "
                f"{n_prompt} tokens (image tokens included)",
                "messages",
                "context_length_exceeded",
            )
        if max_tokens is None:
            max_tokens = min(self.config.default_max_tokens, room)
        elif clamp_max_tokens:
            max_tokens = min(max_tokens, room)
        elif max_tokens > room:
            raise bad_request(
                f"this model's maximum context length is {self.context_len} tokens, but {n_prompt + max_tokens} "
                f"were requested ({n_prompt} in the messages, {max_tokens} in the completion)",
                "max_tokens",
                "context_length_exceeded",
            )
        stops = list(stop or [])
        if (t := self.template_stop()) is not None and t not in stops:
            stops.append(t)
        try:
            params = SamplingParams(
                max_tokens=max_tokens,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                seed=seed,
                stop=stops,
                ignore_eos=ignore_eos,
            )
        except ValueError as e:
            raise bad_request(str(e)) from e
        return Prepared(request_id, prompt, ids, eimgs, params, n_prompt)

    # --------------------------------------------------------------------------------------- generation
    async def stream(self, prep: Prepared) -> AsyncIterator[Delta]:
        """Stream one request. Leading whitespace of the answer is dropped (LLaVA strips its answers).
        Closing the iterator early aborts the request in the engine."""
        gen = self.engine.generate(prep.prompt_token_ids, prep.images, prep.params, prep.request_id)
        started = False
        try:
            async for out in gen:
                text = out.delta_text
                if not started:
                    text = text.lstrip()
                    started = bool(text)
                if out.new_token_ids:
                    self._recent.append((time.monotonic(), len(out.new_token_ids)))
                if text or out.finished:
                    yield Delta(text, out.finish_reason, prep.prompt_tokens, len(out.token_ids), out.metrics)
        except RequestTooLargeError as e:
            raise bad_request(str(e), "max_tokens", "context_length_exceeded") from e
        except QueueFullError as e:
            raise overloaded(f"the worker's queue is full ({e}); retry later", status=429) from e
        finally:
            await gen.aclose()

    # ---------------------------------------------------------------------------------------------- status
    def throughput(self, window: float = 10.0) -> float:
        """Generated tokens per second over the last ``window`` seconds."""
        now = time.monotonic()
        return sum(n for t, n in self._recent if now - t <= window) / window

    def engine_metrics(self):
        return self.engine.metrics() if self.engine is not None else None
