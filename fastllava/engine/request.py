"""What the engine knows about one request: sampling parameters, images, tokens, status and outputs.

A request's prompt is stored *expanded*: every image placeholder already replaced by as many slots as the
image yields (slot ids are 0), so the scheduler counts tokens exactly. ``num_computed_tokens`` is how many
of its tokens (prompt, then output) have their K/V in the cache; everything the scheduler decides is a
number of tokens past that point.
"""

from __future__ import annotations

import enum
import hashlib
import math
import struct
from dataclasses import dataclass, field

import torch

from fastllava.engine.detokenizer import IncrementalDetokenizer
from fastllava.engine.metrics import RequestMetrics


@dataclass
class SamplingParams:
    """Per-request decoding settings (vLLM's names). ``temperature == 0`` is greedy."""

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None  # None: a random seed (only matters when sampling)
    stop: list[str] = field(default_factory=list)  # stop strings (need the engine's tokenizer)
    stop_token_ids: list[int] | None = None  # None: the model's / tokenizer's EOS
    ignore_eos: bool = False
    full_outputs: bool = False  # every RequestOutput carries token_ids/text so far (O(n) per step: tests, debug)

    def __post_init__(self) -> None:
        # every bound is checked here, at admission: a value that passes can never raise inside an engine step
        # (the batched sampling tensors are int64/float32), so one request cannot take the others down
        _check_int("max_tokens", self.max_tokens, 1, _INT64_MAX)
        _check_float("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        _check_float("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        _check_int("top_k", self.top_k, 0, _INT64_MAX)  # <= the vocabulary: LLMEngine.make_request
        if self.seed is not None:
            _check_int("seed", self.seed, _INT64_MIN, _INT64_MAX)
        if not isinstance(self.stop, list | tuple) or not all(isinstance(s, str) for s in self.stop):
            raise ValueError(f"stop must be a list of str, got {self.stop!r}")
        self.stop = list(self.stop)
        if self.stop_token_ids is not None:
            if not isinstance(self.stop_token_ids, list | tuple):
                raise ValueError(f"stop_token_ids must be a list of int, got {self.stop_token_ids!r}")
            for t in self.stop_token_ids:
                _check_int("stop_token_ids", t, 0, _INT64_MAX)
            self.stop_token_ids = list(self.stop_token_ids)


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _check_int(name: str, value, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")


def _check_float(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


@dataclass
class EngineImage:
    """One image of a request: preprocessed tiles, original size (H, W), and a content hash.

    The hash keys the encoder cache and is mixed into the prefix-cache hash of every KV block whose slots
    the image fills, so identical images share features and blocks and different ones never do. When not
    given it is the sha256 of the pixel tensor (dtype, shape and bytes) and the size.
    """

    pixel_values: torch.Tensor  # (tiles, 3, h, w) or (3, h, w)
    size_hw: tuple[int, int]
    content_hash: str | None = None

    def __post_init__(self) -> None:
        if self.pixel_values.dim() == 3:
            self.pixel_values = self.pixel_values.unsqueeze(0)
        self.size_hw = (int(self.size_hw[0]), int(self.size_hw[1]))
        if self.content_hash is None:
            px = self.pixel_values.detach().contiguous().cpu()
            h = hashlib.sha256(f"{px.dtype}{tuple(px.shape)}{self.size_hw}".encode())
            h.update(px.flatten().view(torch.uint8).numpy().tobytes())  # raw bytes, any dtype (bf16 too)
            self.content_hash = h.hexdigest()


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"  # EOS or a stop string
    FINISHED_LENGTH = "length"  # max_tokens or the model's context length
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"  # processing it raised (AsyncLLMEngine: RequestFailedError)

    @property
    def finished(self) -> bool:
        return self not in (RequestStatus.WAITING, RequestStatus.RUNNING)


class Request:
    """Mutable engine-side state of one request."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        images: list[EngineImage],
        image_offsets: list[int],
        image_counts: list[int],
        params: SamplingParams,
        arrival_time: float,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids  # expanded: image slots hold 0
        self.images = images
        self.image_offsets = image_offsets  # first slot of each image in the prompt
        self.image_counts = image_counts  # slots per image
        self.params = params
        self.max_total_tokens = len(prompt_token_ids) + params.max_tokens  # the engine caps it at the context
        self.output_token_ids: list[int] = []  # the overlapped engine's in-flight token is a placeholder (< 0)
        self.num_computed_tokens = 0
        self.status = RequestStatus.WAITING
        self.encoder_refs: set[int] = set()  # images whose encoder-cache entry this request holds
        self.detokenizer: IncrementalDetokenizer | None = None  # set by the engine when it has a tokenizer
        self.metrics = RequestMetrics(arrival_time=arrival_time, num_prompt_tokens=len(prompt_token_ids))
        self._block_hashes: list[bytes] = []

    # ------------------------------------------------------------------------------------ tokens
    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens ``[start, end)`` of prompt + output."""
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p : end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]

    def images_in(self, start: int, end: int) -> list[tuple[int, int, int]]:
        """Images whose slots overlap ``[start, end)``: (image index, first row, end row) of the overlap."""
        out = []
        for j, (off, cnt) in enumerate(zip(self.image_offsets, self.image_counts, strict=True)):
            lo, hi = max(off, start), min(off + cnt, end)
            if lo < hi:
                out.append((j, lo - off, hi - off))
        return out

    # ------------------------------------------------------------------------------ prefix hashes
    def block_hashes(self, block_size: int, num_blocks: int) -> list[bytes]:
        """Chained sha256 of the first ``num_blocks`` full blocks: hash(parent, token ids, images in it).

        An image slot's token id is 0, so each overlapping image contributes its content hash and the
        first row of it the block holds: two blocks match only if every slot holds the same thing.
        """
        while len(self._block_hashes) < num_blocks:
            i = len(self._block_hashes)
            start, end = i * block_size, (i + 1) * block_size
            h = hashlib.sha256(self._block_hashes[-1] if self._block_hashes else b"root")
            toks = self.token_ids(start, end)
            h.update(struct.pack(f"<{len(toks)}q", *toks))
            for j, row, _ in self.images_in(start, end):
                h.update(self.images[j].content_hash.encode() + struct.pack("<q", row))
            self._block_hashes.append(h.digest())
        return self._block_hashes[:num_blocks]

    @property
    def finished(self) -> bool:
        return self.status.finished

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, {self.status.value}, prompt={self.num_prompt_tokens}, "
            f"out={len(self.output_token_ids)}, computed={self.num_computed_tokens})"
        )


@dataclass
class RequestOutput:
    """What one step produced for one request (streamed deltas), and its whole output once ``finished``.

    ``token_ids``/``text`` are None while the request runs (copying them every step would cost O(answer
    length) per token), unless its ``SamplingParams.full_outputs`` asked for them.
    """

    request_id: str
    new_token_ids: list[int]  # the tokens this step added
    delta_text: str  # the text this step added (may lag the tokens: partial characters, possible stop strings)
    finished: bool
    finish_reason: str | None  # "stop", "length", "abort", "error"
    metrics: RequestMetrics
    num_output_tokens: int  # output tokens so far (usage.completion_tokens)
    token_ids: list[int] | None = None  # every output token: set when finished
    text: str | None = None  # the whole output text (stop string cut off; "" without a tokenizer): when finished
    error: str | None = None  # finish_reason "error": what was raised
