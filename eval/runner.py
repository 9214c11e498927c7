"""Answering many questions fast: ``answer_all(questions, backend, params)`` and its backends.

    backend = EngineBackend(model, tokenizer, image_processor, conv_mode="llava_v1", batch_size=64)
    for index, text, metadata in answer_all(questions, backend, GenParams(temperature=0)):
        ...                                   # answers arrive as they finish, in any order

- ``EngineBackend``: the continuous-batching engine (``fastllava.engine.LLMEngine``). Questions are queued as a
  sliding window of ``2 * batch_size`` requests; prompts are tokenized and images loaded and preprocessed one
  question ahead in a background thread, so the model never waits on the disk.
- ``StaticBackend``: ``model.generate`` (the padded API, an adapter over the same engine) on left-padded static
  batches, each run to its longest answer before the next starts; with ``batch_size=1`` it is LLaVA's own loop,
  one ``generate`` per question (the baseline of ``bench/bench_eval.py``).
- ``ServerBackend``: an OpenAI-compatible ``/v1/chat/completions`` server (fastllava's own, or any other),
  ``concurrency`` requests in flight.

Every question gets its own sampling seed, a hash of ``(seed, question key)``; the sampler is counter-based and
batch-invariant, so an answer does not depend on which batch it ran in, at any temperature.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import mimetypes
import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field

import torch

from fastllava.constants import IMAGE_TOKEN_INDEX
from fastllava.image_io import load_image
from fastllava.mm_utils import process_images, tokenizer_image_token
from fastllava.prompting import question_prompt, template_stop

from .questions import Question

log = logging.getLogger(__name__)


@dataclass
class GenParams:
    temperature: float = 0.2
    top_p: float | None = None
    max_new_tokens: int = 128
    num_beams: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_beams != 1:
            raise ValueError("beam search is not supported (LLaVA's benchmarks use --num_beams 1)")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max_new_tokens must be >= 1, got {self.max_new_tokens}")


def question_seed(seed: int, key: tuple) -> int:
    """A 62-bit sampling seed for one question, stable across runs, chunks and batch compositions."""
    digest = hashlib.sha256(repr((seed, key)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2


@dataclass
class Prepared:
    """One question, ready for the model: token ids (image placeholders as ``IMAGE_TOKEN_INDEX``) and pixels."""

    index: int
    input_ids: list[int]
    pixel_values: torch.Tensor | None = None  # (3, h, w) or (tiles, 3, h, w)
    size_hw: tuple[int, int] | None = None
    seed: int = 0
    prompt: str = ""


@dataclass
class Prompter:
    """Builds LLaVA's prompt for a question (``<image>\\n`` + text in one user turn of ``conv_mode``) and
    tokenizes it; loads and preprocesses the image as ``process_images`` does."""

    tokenizer: object
    image_processor: object
    model_config: object
    conv_mode: str
    seed: int = 0

    def prompt(self, q: Question) -> str:
        mm_tags = getattr(self.model_config, "mm_use_im_start_end", False)
        return question_prompt(self.conv_mode, q.text, image=q.image is not None, mm_use_im_start_end=mm_tags)

    def stop_strings(self) -> list[str]:
        stop = template_stop(self.conv_mode)
        return [stop] if stop else []

    def __call__(self, index: int, q: Question) -> Prepared:
        prompt = self.prompt(q)
        ids = tokenizer_image_token(prompt, self.tokenizer, IMAGE_TOKEN_INDEX)
        p = Prepared(index, ids, seed=question_seed(self.seed, q.key), prompt=prompt)
        if q.image is not None:
            image = load_image(q.image)
            p.pixel_values = process_images([image], self.image_processor, self.model_config)[0]
            p.size_hw = (image.size[1], image.size[0])
        return p


def _prefetch(prompter: Prompter, questions: Sequence[Question], ahead: int) -> Iterator[Prepared]:
    """Prepare questions in one background thread, ``ahead`` in advance, yielding them in order.

    One thread: tokenizers are not safe to share across threads, and one is enough to keep ahead of a GPU.
    """
    with ThreadPoolExecutor(max_workers=1) as pool:
        todo = iter(enumerate(questions))
        futures = deque(pool.submit(prompter, i, q) for i, q in _take(todo, ahead))
        while futures:
            p = futures.popleft().result()
            for i, q in _take(todo, 1):
                futures.append(pool.submit(prompter, i, q))
            yield p


def _take(it, n):
    for _ in range(n):
        nxt = next(it, None)
        if nxt is None:
            return
        yield nxt


def _finish_text(text: str, stops: list[str]) -> str:
    """LLaVA's answer text: cut at a stop string, then ``strip()``."""
    cuts = [text.find(s) for s in stops if s in text]
    return (text[: min(cuts)] if cuts else text).strip()


@dataclass
class _LocalBackend:
    model: object
    tokenizer: object
    image_processor: object
    conv_mode: str
    batch_size: int = 16

    def prompter(self, params: GenParams) -> Prompter:
        return Prompter(self.tokenizer, self.image_processor, self.model.config, self.conv_mode, params.seed)


@dataclass
class EngineBackend(_LocalBackend):
    """Answers through ``LLMEngine``: ``batch_size`` is the engine's ``max_num_seqs``."""

    engine_config: object = None
    engine: object = field(init=False, default=None)

    def _engine(self):
        if self.engine is None:
            from fastllava.engine import EngineConfig, LLMEngine

            cfg = self.engine_config or EngineConfig(max_num_seqs=self.batch_size)
            self.engine = LLMEngine(self.model, self.tokenizer, cfg)
        return self.engine

    def run(self, questions: Sequence[Question], params: GenParams) -> Iterator[tuple[int, str, dict]]:
        from fastllava.engine import EngineImage, RequestTooLargeError, SamplingParams

        engine = self._engine()
        prompter = self.prompter(params)
        stops = prompter.stop_strings()
        window = 2 * self.batch_size
        pending = _prefetch(prompter, questions, ahead=window)
        inflight: dict[str, int] = {}
        exhausted = False
        while True:
            while not exhausted and len(inflight) < window:
                p = next(pending, None)
                if p is None:
                    exhausted = True
                    break
                images = [EngineImage(p.pixel_values, p.size_hw)] if p.pixel_values is not None else None
                sp = SamplingParams(
                    max_tokens=params.max_new_tokens,
                    temperature=params.temperature,
                    top_p=params.top_p if params.top_p is not None else 1.0,
                    seed=p.seed,
                    stop=stops,
                )
                rid = f"eval-{p.index}"
                try:
                    engine.add_request(rid, p.input_ids, images, sp)
                except RequestTooLargeError as e:
                    log.warning("question %d skipped: %s", p.index, e)
                    yield p.index, "", {"error": str(e)}
                    continue
                inflight[rid] = p.index
            if not engine.has_unfinished_requests():
                if exhausted:
                    return
                continue
            for out in engine.step():
                if out.finished and out.request_id in inflight:
                    yield inflight.pop(out.request_id), _finish_text(out.text, stops), {}


@dataclass
class StaticBackend(_LocalBackend):
    """``model.generate`` on left-padded static batches of ``batch_size`` (1: LLaVA's one-at-a-time loop); the decode
    is the engine's (``fastllava.generation``), the batching LLaVA's."""

    def run(self, questions: Sequence[Question], params: GenParams) -> Iterator[tuple[int, str, dict]]:
        prompter = self.prompter(params)
        stops = prompter.stop_strings()
        batch: list[Prepared] = []
        for p in _prefetch(prompter, questions, ahead=2 * self.batch_size):
            batch.append(p)
            if len(batch) == self.batch_size:
                yield from self._generate(batch, params, stops)
                batch = []
        if batch:
            yield from self._generate(batch, params, stops)

    @torch.inference_mode()
    def _generate(self, batch: list[Prepared], params: GenParams, stops: list[str]):
        model, tok = self.model, self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        width = max(len(p.input_ids) for p in batch)
        ids = torch.tensor([[pad] * (width - len(p.input_ids)) + p.input_ids for p in batch])
        mask = torch.tensor([[0] * (width - len(p.input_ids)) + [1] * len(p.input_ids) for p in batch])
        with_images = [p for p in batch if p.pixel_values is not None]
        images = [p.pixel_values.to(model.device, model.dtype) for p in with_images] or None
        sizes = [p.size_hw for p in with_images] or None
        out = model.generate(
            ids.to(model.device),
            attention_mask=mask.to(model.device),
            pixel_values=images,  # transformers' argument: image_sizes as (H, W)
            image_sizes=sizes,
            do_sample=params.temperature > 0,
            temperature=params.temperature,
            top_p=params.top_p,
            max_new_tokens=params.max_new_tokens,
            stop_strings=stops or None,
            tokenizer=tok,
            seed=batch[0].seed,  # one seed per call: exact per-question seeds only with batch_size 1
        )
        for p, row in zip(batch, out.tolist(), strict=True):
            yield p.index, _finish_text(tok.decode(row, skip_special_tokens=True), stops), {}


def image_url_of(image: str) -> str:
    """A data URL for a local image path or raw base64 image data (MMBench)."""
    if os.path.isfile(image):
        mime = mimetypes.guess_type(image)[0] or "image/png"
        with open(image, "rb") as f:
            return f"data:{mime};base64," + base64.b64encode(f.read()).decode()
    return "data:image/png;base64," + image  # the server sniffs the real format from the bytes


@dataclass
class ServerBackend:
    """Answers through an OpenAI-compatible server; the server applies its own conversation template."""

    base_url: str
    model: str | None = None  # None: the first model the server lists at /v1/models
    api_key: str = "EMPTY"
    concurrency: int = 16
    timeout: float = 300.0
    max_retries: int = 2

    def client(self):
        from .gpt_review import openai_client

        return openai_client(self.base_url, self.api_key, self.timeout, self.max_retries)

    def resolve_model(self) -> str:
        """The model to ask for: the one given, else the first the server lists."""
        if self.model is None:
            self.model = self.client().models.list().data[0].id
        return self.model

    def run(self, questions: Sequence[Question], params: GenParams) -> Iterator[tuple[int, str, dict]]:
        client = self.client()
        self.resolve_model()

        def ask(i: int, q: Question) -> tuple[int, str, dict]:
            content: list[dict] = [{"type": "text", "text": q.text}]
            if q.image is not None:
                content.insert(0, {"type": "image_url", "image_url": {"url": image_url_of(q.image)}})
            resp = client.chat.completions.create(
                model=self.model,
                messages=[{"role": "user", "content": content}],
                temperature=params.temperature,
                top_p=params.top_p if params.top_p is not None else 1.0,
                max_tokens=params.max_new_tokens,
                seed=question_seed(params.seed, q.key) % (1 << 31),
            )
            return i, (resp.choices[0].message.content or "").strip(), {}

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futures = [pool.submit(ask, i, q) for i, q in enumerate(questions)]
            for fut in as_completed(futures):
                yield fut.result()


def answer_all(questions: Sequence[Question], backend, params: GenParams) -> Iterator[tuple[int, str, dict]]:
    """Answer every question through ``backend``: yields ``(index into questions, answer text, metadata)`` as
    answers finish (in any order). The one place the eval scripts call a model."""
    yield from backend.run(questions, params)
