"""The scheduler: pure bookkeeping (no tensors) over waiting, running and finished requests.

Each ``schedule()`` spends a token budget (``max_num_batched_tokens``), vLLM-v1 style:

1. running requests first, in arrival order (skipping those whose last allowed token is in flight, which the
   overlapped engine finishes when it sees that token): one token for those decoding, the next chunk for those still
   prefilling (chunked prefill). When the KV cache has no block for one of them, the most recently admitted
   running request is preempted (blocks freed, recomputed later from its prompt + outputs) until it fits;
2. then, if nothing was preempted, waiting requests are admitted in order while budget, sequence slots and
   blocks last; their cached prefix (prefix caching) is skipped.

The output says, per request, which tokens run this step, and which images the vision tower must encode
(those overlapping a scheduled chunk whose features are not in the encoder cache). ``update`` advances the
requests once the runner has sampled.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from fastllava.engine.block_manager import BlockManager
from fastllava.engine.encoder_cache import EncoderCache
from fastllava.engine.request import Request, RequestStatus


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound (requests or prompt tokens); retry later or send elsewhere."""


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64  # running requests at once
    max_num_batched_tokens: int = 2048  # tokens (prefill + decode) per step
    max_waiting_requests: int = 1024
    max_waiting_tokens: int = 1 << 20  # prompt tokens (image slots included) of waiting requests
    enable_chunked_prefill: bool = True  # else a prompt prefills in one step or waits


@dataclass
class ScheduledChunk:
    """Tokens ``[start, start + num_tokens)`` of ``request`` run this step."""

    request: Request
    start: int
    num_tokens: int

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the request's last token, whose logits give the next token."""
        return self.start + self.num_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    prefills: list[ScheduledChunk] = field(default_factory=list)  # one packed prefill forward
    decodes: list[Request] = field(default_factory=list)  # one batched decode forward, one token each
    encoder_inputs: list[tuple[Request, int]] = field(default_factory=list)  # (request, image index)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.prefills) + len(self.decodes)

    @property
    def is_empty(self) -> bool:
        return not self.prefills and not self.decodes


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, encoder_cache: EncoderCache) -> None:
        self.config = config
        self.blocks = block_manager
        self.encoder_cache = encoder_cache
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}  # unfinished requests by id
        self.waiting_tokens = 0
        self.num_preemptions = 0

    # ----------------------------------------------------------------------------- admission
    def add(self, request: Request) -> None:
        """Queue a request; raises ``QueueFullError`` beyond the queue bounds."""
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        cfg = self.config
        if len(self.waiting) >= cfg.max_waiting_requests:
            raise QueueFullError(f"queue full: {len(self.waiting)} requests waiting (max {cfg.max_waiting_requests})")
        if self.waiting_tokens + request.num_tokens > cfg.max_waiting_tokens:
            raise QueueFullError(
                f"queue full: {self.waiting_tokens} prompt tokens waiting, this request adds {request.num_tokens} "
                f"(max {cfg.max_waiting_tokens}, image tokens counted)"
            )
        self.requests[request.request_id] = request
        self.waiting.append(request)
        self.waiting_tokens += request.num_tokens

    # ------------------------------------------------------------------------------ the step
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        encoding: set[str] = set()  # image hashes the encoder runs this step
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if req.num_tokens >= req.max_total_tokens:  # overlapped engine: its last token is in flight
                i += 1
                continue
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.blocks.allocate(req, req.num_computed_tokens + n):
                victim = self.running.pop()  # the latest admitted: only requests after `req` or `req` itself
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            else:
                self._schedule(out, req, n, encoding)
                budget -= n
                i += 1
                continue
            break
        while not out.preempted and self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            prefix, hit = self.blocks.cached_prefix(req)
            remaining = req.num_tokens - hit
            n = min(remaining, budget)
            if n < remaining and not self.config.enable_chunked_prefill:
                break
            if not self.blocks.allocate(req, hit + n, prefix):
                break
            self.waiting.popleft()
            self.waiting_tokens -= req.num_tokens
            self.blocks.record_prefix_lookup(req.num_tokens, hit)
            if req.metrics.first_scheduled_time is None:
                req.metrics.num_cached_tokens = hit
            req.num_computed_tokens = hit
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            self._schedule(out, req, n, encoding)
            budget -= n
        return out

    def _schedule(self, out: SchedulerOutput, req: Request, n: int, encoding: set[str]) -> None:
        start = req.num_computed_tokens
        if n == 1 and start >= req.num_prompt_tokens:
            out.decodes.append(req)
            return
        out.prefills.append(ScheduledChunk(req, start, n))
        for j, _, _ in req.images_in(start, start + n):
            if j in req.encoder_refs:
                continue
            key = req.images[j].content_hash
            if self.encoder_cache.has(key) or key in encoding:  # cached, or encoded this step for another request
                self.encoder_cache.hits += 1
            else:
                encoding.add(key)
                out.encoder_inputs.append((req, j))
            self.encoder_cache.acquire(key, req.request_id)
            req.encoder_refs.add(j)

    def _preempt(self, req: Request) -> None:
        """Free everything ``req`` holds; it recomputes from its prompt + outputs when readmitted."""
        self._release(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        req.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)
        self.waiting_tokens += req.num_tokens

    def _release(self, req: Request) -> None:
        self.blocks.free_request(req.request_id)
        for j in req.encoder_refs:
            self.encoder_cache.release(req.images[j].content_hash, req.request_id)
        req.encoder_refs.clear()

    # ---------------------------------------------------------------------------- after a step
    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Advance the scheduled requests; append the sampled tokens. Returns requests with a new token."""
        produced = []
        for req in self.advance(out):
            token = sampled.get(req.request_id)
            if token is not None:
                req.output_token_ids.append(token)
                produced.append(req)
        self.cache_blocks(out)
        return produced

    def advance(self, out: SchedulerOutput) -> list[Request]:
        """Count the scheduled tokens as computed (their K/V are written, or queued to be); release image refs
        whose slots are all computed. Returns the requests whose last token ran: they sample, in the runner's
        row order (sampling prefill chunks, then decodes)."""
        for req, n in [(c.request, c.num_tokens) for c in out.prefills] + [(r, 1) for r in out.decodes]:
            req.num_computed_tokens += n
            ends = {j: req.image_offsets[j] + req.image_counts[j] for j in req.encoder_refs}
            for j in [j for j, end in ends.items() if end <= req.num_computed_tokens]:  # slots all in the cache
                self.encoder_cache.release(req.images[j].content_hash, req.request_id)
                req.encoder_refs.discard(j)
        return [c.request for c in out.prefills if c.samples] + out.decodes

    def cache_blocks(self, out: SchedulerOutput) -> None:
        """Register the scheduled requests' newly full blocks for prefix caching (their token ids must be known:
        the overlapped engine calls this once the previous step's placeholders are resolved)."""
        for req in [c.request for c in out.prefills] + out.decodes:
            if not req.finished:
                self.blocks.cache_full_blocks(req)

    def finish(self, req: Request, status: RequestStatus) -> None:
        """End a request (stop, length or abort) wherever it is, freeing its blocks and encoder refs."""
        if req.status is RequestStatus.WAITING and req in self.waiting:
            self.waiting.remove(req)
            self.waiting_tokens -= req.num_tokens
        elif req in self.running:
            self.running.remove(req)
        self._release(req)
        req.status = status
        self.requests.pop(req.request_id, None)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)
