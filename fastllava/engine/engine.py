"""The continuous-batching engine: ``LLMEngine`` (synchronous) and ``AsyncLLMEngine`` (asyncio front).

    engine = LLMEngine(model, tokenizer, EngineConfig(block_size=16))
    engine.add_request("a", tokenizer_image_token(prompt, tokenizer), images=[EngineImage(px, (h, w))],
                       params=SamplingParams(max_tokens=64))
    while engine.has_unfinished_requests():
        for out in engine.step():
            print(out.request_id, out.delta_text)

One step = schedule (``Scheduler``, bookkeeping) -> execute (``ModelRunner``: encoder, one packed prefill,
one batched decode, one sample, one host sync) -> update (tokens, stop checks, incremental detokenization,
metrics; constant host work per token: ``detokenizer.py``). Outputs carry deltas; the whole token list and
text only in a request's final output. The servers use ``AsyncLLMEngine`` (``async_engine.py``).

Overlap scheduling (``EngineConfig.overlap_scheduling``, on for CUDA models): the engine launches step N+1
before it waits for step N's sampled ids, then updates N on the host while N+1 runs (``_step_overlapped``).

CUDA graphs (``EngineConfig.cuda_graphs``, on by default, used only when the model is on CUDA): at construction
the decode step (model forward over the paged KV cache + LM head, one token per sequence) is captured once per
batch-size bucket (1, 2, 4, 8, 16, 24, ... up to ``cuda_graph_max_batch_size``, default ``max_num_seqs``).
Each decode step pads its batch to the next bucket, copies its inputs into the graphs' static buffers and
replays; padding rows use a scratch KV block of their own and their logits are dropped. Sampling stays outside
the graph. Bigger batches, CPU models and ``cuda_graphs=False`` decode eagerly. Capture fixes the attention
backend and kernels in force at construction (see ``decode_graphs.py``). ``static_decode_buffers=True`` runs
the same static-buffer, bucket-padded decode without capture on any device (tests and debugging). Under
tensor parallelism every rank captures its own graphs over its shard, in step with rank 0 (the all-reduces
inside the step are captured on every rank), and replays each step with the inputs rank 0 sends.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fastllava.engine.block_manager import BlockManager
from fastllava.engine.detokenizer import IncrementalDetokenizer
from fastllava.engine.encoder_cache import EncoderCache
from fastllava.engine.metrics import EngineMetrics
from fastllava.engine.request import EngineImage, Request, RequestOutput, RequestStatus, SamplingParams
from fastllava.engine.runner import ModelRunner, StepHandle, kv_heads
from fastllava.engine.scheduler import QueueFullError, Scheduler, SchedulerConfig, SchedulerOutput
from fastllava.packing import ImageInput, expand_image_tokens, image_token_count

log = logging.getLogger(__name__)

__all__ = [
    "EngineConfig",
    "EngineImage",
    "LLMEngine",
    "QueueFullError",
    "RequestOutput",
    "RequestTooLargeError",
    "SamplingParams",
]


class RequestTooLargeError(ValueError):
    """The request can never run: its prompt + max_tokens exceed the KV cache or the model's context.

    ``param`` names the request field to change: ``"max_tokens"`` (the prompt fits, the answer's room does
    not) or ``"messages"`` (the prompt alone does not fit).
    """

    def __init__(self, message: str, param: str = "max_tokens") -> None:
        super().__init__(message)
        self.param = param


@dataclass
class EngineConfig:
    block_size: int = 16  # tokens per KV block
    num_blocks: int | None = None  # None: sized from memory (below)
    gpu_memory_utilization: float = 0.85  # CUDA: fraction of the *free* memory given to the KV cache
    cpu_kv_cache_bytes: int = 1 << 29  # CPU: KV cache size when num_blocks is None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_waiting_requests: int = 1024
    max_waiting_tokens: int = 1 << 20
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    encoder_cache_rows: int = 16384  # image-feature rows kept (576 per LLaVA-1.5 image)
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    kv_dtype: torch.dtype | None = None  # None: the model's dtype
    cuda_graphs: bool = True  # CUDA models: replay decode steps from CUDA graphs, one per batch-size bucket
    cuda_graph_max_batch_size: int | None = None  # largest captured batch (None: max_num_seqs); bigger: eager
    static_decode_buffers: bool = False  # tests/debugging: the graphs' bucketed static-buffer decode, no capture
    # prepare and post-process step N on the host while step N+1 runs on the device (None: on for CUDA models).
    # True on CPU runs the same logic with no real overlap: the tests compare it with the synchronous loop.
    overlap_scheduling: bool | None = None
    # ranks the model is sharded over: a model from load_pretrained_model(tensor_parallel_size=N) brings its
    # own; None takes the model's, a number is checked against it
    tensor_parallel_size: int | None = None


@dataclass
class _Launched:
    """A step the overlapped engine has launched: what ran, its sampled ids, each row's output slot."""

    out: SchedulerOutput
    handle: StepHandle
    slots: list[int]  # index in the row's output_token_ids of the token this step samples


class LLMEngine:
    def __init__(self, model, tokenizer=None, config: EngineConfig | None = None, image_processor=None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.config = config = config or EngineConfig()
        self.cfg = model.config
        self.max_model_len = config.max_model_len or self.cfg.text.max_position_embeddings
        tp = getattr(model, "tensor_parallel_size", 1)
        if config.tensor_parallel_size not in (None, tp):
            raise ValueError(
                f"EngineConfig.tensor_parallel_size={config.tensor_parallel_size} but the model is sharded over "
                f"{tp} rank(s): load it with load_pretrained_model(..., tensor_parallel_size=N)"
            )
        num_blocks = config.num_blocks or self._auto_num_blocks()
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.encoder_cache = EncoderCache(config.encoder_cache_rows)
        # the scheduler's settings are the engine config's fields of the same names
        sched = SchedulerConfig(**{f.name: getattr(config, f.name) for f in dataclasses.fields(SchedulerConfig)})
        self.scheduler = Scheduler(sched, self.block_manager, self.encoder_cache)
        graphs = config.cuda_graphs and model.device.type == "cuda" and not config.static_decode_buffers
        bucketed = graphs or config.static_decode_buffers
        self.runner = ModelRunner(
            model,
            num_blocks,
            config.block_size,
            self.encoder_cache,
            config.kv_dtype,
            decode_max_batch=(config.cuda_graph_max_batch_size or config.max_num_seqs) if bucketed else 0,
            capture_graphs=graphs,
            max_model_len=self.max_model_len,
        )
        eos = self.cfg.text.eos_token_id
        self.eos_token_ids = set([eos] if isinstance(eos, int) else (eos or []))
        if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
            self.eos_token_ids.add(tokenizer.eos_token_id)
        self.overlap = model.device.type == "cuda" if config.overlap_scheduling is None else config.overlap_scheduling
        self.runner.overlap = self.overlap
        self._inflight: _Launched | None = None  # the overlapped engine's launched, not yet collected step
        self._current: SchedulerOutput | None = None  # the step being run (failure attribution)
        self._collecting: _Launched | None = None  # the overlapped engine's step being collected (the same)
        self._ids = itertools.count()
        self.num_steps = self.num_generated = self.num_prefill_tokens = 0
        self.num_finished = self.num_aborted = self.num_rejected = self.num_failed = 0

    def _auto_num_blocks(self) -> int:
        t = self.cfg.text
        dtype = self.config.kv_dtype or self.model.dtype
        per_block = 2 * t.num_hidden_layers * self.config.block_size * kv_heads(self.model) * t.head_dim
        per_block *= torch.empty((), dtype=dtype).element_size()
        if self.model.device.type == "cuda":
            budget = int(torch.cuda.mem_get_info(self.model.device)[0] * self.config.gpu_memory_utilization)
        else:
            budget = self.config.cpu_kv_cache_bytes
        enough = self.config.max_num_seqs * -(-self.max_model_len // self.config.block_size)
        return max(1, min(budget // per_block, enough))

    # --------------------------------------------------------------------------------- requests
    def make_request(
        self,
        prompt_token_ids: Sequence[int],
        images: Sequence[EngineImage | ImageInput] | None = None,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        *,
        clamp_max_tokens: bool = False,
    ) -> Request:
        """The front door: preprocess and hash images, expand the prompt (``IMAGE_TOKEN_INDEX`` placeholders or
        llava-hf image-token runs), check it against the context and the KV cache; returns a ``Request``.

        Raises ``RequestTooLargeError`` (``param`` names the field) or ``ValueError``. ``clamp_max_tokens``:
        lower ``max_tokens`` to the context left after the prompt instead of refusing (LLaVA's workers do, and
        ``add_request``/``generate``: the request then ends by length at the end of the context).
        Touches no engine state (safe from a worker thread); ``params`` is copied, never changed.
        """
        params = dataclasses.replace(params) if params is not None else SamplingParams()
        if params.top_k > self.cfg.text.vocab_size:
            raise ValueError(f"top_k must be <= the vocabulary size {self.cfg.text.vocab_size}, got {params.top_k}")
        if params.seed is None and params.temperature > 0:
            params.seed = random.getrandbits(62)
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need the engine's tokenizer")
        imgs = [self._image(im) for im in images or []]
        counts = [image_token_count(self.cfg, im.size_hw) for im in imgs]
        ids, offsets = expand_image_tokens(list(prompt_token_ids), counts, self.cfg.image_token_index)
        if not ids:
            raise ValueError("empty prompt")
        if len(ids) >= self.max_model_len:
            raise RequestTooLargeError(
                f"prompt of {len(ids)} tokens (image tokens included) does not fit the model's context of "
                f"{self.max_model_len} tokens",
                param="messages",
            )
        if len(ids) + params.max_tokens > self.max_model_len:
            if not clamp_max_tokens:
                raise RequestTooLargeError(
                    f"prompt of {len(ids)} tokens (image tokens included) + max_tokens {params.max_tokens} exceed "
                    f"the model's context of {self.max_model_len} tokens",
                    param="max_tokens",
                )
            params.max_tokens = self.max_model_len - len(ids)
        total = len(ids) + params.max_tokens
        bm = self.block_manager
        if bm.blocks_needed(total) > bm.num_blocks:
            raise RequestTooLargeError(
                f"request needs {total} tokens of KV cache ({len(ids)} prompt incl. image tokens + "
                f"{params.max_tokens} max_tokens) = {bm.blocks_needed(total)} blocks, but the cache holds only "
                f"{bm.num_blocks} blocks of {bm.block_size} tokens; lower max_tokens or grow the cache",
                param="messages" if bm.blocks_needed(len(ids) + 1) > bm.num_blocks else "max_tokens",
            )
        if not self.config.enable_chunked_prefill and len(ids) > self.config.max_num_batched_tokens:
            raise RequestTooLargeError(
                f"prompt of {len(ids)} tokens exceeds max_num_batched_tokens={self.config.max_num_batched_tokens} "
                "and chunked prefill is off",
                param="messages",
            )
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        req = Request(rid, ids, imgs, offsets, counts, params, time.perf_counter())
        req.max_total_tokens = total
        if self.tokenizer is not None:
            req.detokenizer = IncrementalDetokenizer(self.tokenizer, req.output_token_ids, params.stop)
        return req

    def _image(self, im) -> EngineImage:
        if isinstance(im, EngineImage):
            return im
        if isinstance(im, ImageInput):
            return EngineImage(im.pixel_values, im.size_hw)
        if hasattr(im, "convert") and hasattr(im, "size"):  # a PIL image: preprocess, hash its pixels
            if self.image_processor is None:
                raise ValueError("PIL images need the engine's image_processor")
            from fastllava.mm_utils import process_images

            im = im.convert("RGB")
            key = hashlib.sha256(f"{im.size}".encode() + im.tobytes()).hexdigest()
            px = process_images([im], self.image_processor, self.cfg)[0]
            return EngineImage(px, (im.size[1], im.size[0]), key)
        raise TypeError(f"an image must be an EngineImage, ImageInput or PIL image, got {type(im).__name__}")

    def add_request(
        self,
        request_id: str | None,
        prompt_token_ids: Sequence[int],
        images: Sequence[EngineImage | ImageInput] | None = None,
        params: SamplingParams | None = None,
    ) -> Request:
        """Queue a request; raises ``RequestTooLargeError`` or ``QueueFullError`` (a clear rejection)."""
        req = self.make_request(prompt_token_ids, images, params, request_id, clamp_max_tokens=True)
        self.enqueue(req)
        return req

    def enqueue(self, req: Request) -> None:
        try:
            self.scheduler.add(req)
        except QueueFullError:
            self.num_rejected += 1
            raise

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request wherever it is; frees its blocks and encoder-cache references."""
        req = self.scheduler.requests.get(request_id)
        if req is None:
            return None
        self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)
        self.num_aborted += 1
        req.metrics.finished_time = time.perf_counter()
        ids = req.output_token_ids
        while ids and ids[-1] < 0:  # the overlapped engine's tokens still in flight: never seen, dropped
            ids.pop()
        return self._output(req, [], len(ids))

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished or self._inflight is not None

    # ------------------------------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        """Schedule, execute, update: one forward of every scheduled request. Returns the outputs produced."""
        if self.overlap:
            return self._step_overlapped()
        out = self._schedule()
        if out.is_empty:
            return []
        sampled = self.runner.execute(out, self.block_manager.tables)
        now = self._account(out, len(sampled))
        produced = self.scheduler.update(out, sampled)
        outputs = [self._process(req, req.output_token_ids[-1], len(req.output_token_ids), now) for req in produced]
        self._current = None
        return outputs

    def _step_overlapped(self) -> list[RequestOutput]:
        """Launch step N+1, then finish step N on the host while N+1 runs; returns step N's outputs.

        Step N+1 is scheduled before N's tokens are known: each request that sampled in N holds a placeholder
        (``-(1 + row)``) that N+1's inputs read from N's sampled ids on the device, and a request whose N token
        reaches its length limit is not scheduled again. A request that N's token finishes (EOS, stop string)
        ran one token too many in N+1: that token is dropped and its K/V land in blocks freed at once (the
        device runs the steps in order, so a later step reusing them writes after). Outputs are token for token
        the synchronous loop's.
        """
        out = self._schedule()
        launched = None
        if not out.is_empty:
            handle = self.runner.launch(out, self.block_manager.tables)
            rows = self.scheduler.advance(out)
            slots = [len(r.output_token_ids) for r in rows]
            for i, r in enumerate(rows):
                r.output_token_ids.append(-1 - i)
            launched = _Launched(out, handle, slots)
        prev, self._inflight = self._inflight, launched
        self._collecting = prev
        outputs = []
        if prev is not None:
            sampled = self.runner.collect(prev.handle)
            now = self._account(prev.out, len(sampled))
            for req, slot in zip(prev.handle.requests, prev.slots, strict=True):
                if req.finished:  # finished (or aborted) by the step before: this token is the extra one
                    continue
                token = sampled[req.request_id]
                req.output_token_ids[slot] = token
                outputs.append(self._process(req, token, slot + 1, now))
        if launched is not None:
            self.scheduler.cache_blocks(launched.out)  # every computed token id is known now
        self._current = self._collecting = None
        return outputs

    def _schedule(self) -> SchedulerOutput:
        self._current = None
        out = self._current = self.scheduler.schedule()
        if out.is_empty and self.scheduler.waiting and not self.scheduler.running and self._inflight is None:
            # make_request's checks rule this out
            raise RuntimeError(f"cannot admit {self.scheduler.waiting[0]}: the KV cache is too small for it")
        return out

    def _account(self, out: SchedulerOutput, num_sampled: int) -> float:
        now = time.perf_counter()
        for c in out.prefills:
            if c.request.metrics.first_scheduled_time is None:
                c.request.metrics.first_scheduled_time = now
        for r in out.decodes:
            if r.metrics.first_scheduled_time is None:
                r.metrics.first_scheduled_time = now
        self.num_steps += 1
        self.num_prefill_tokens += sum(c.num_tokens for c in out.prefills)
        self.num_generated += num_sampled
        return now

    def fail_step(self) -> list[str]:
        """After ``step`` raised: fail (free) the requests of the failed step, and of the overlapped engine's step
        in flight; returns their ids. Empty: the step had scheduled nothing yet, no request is to blame."""
        if self._current is None:  # the scheduler itself raised: its bookkeeping is in doubt, blame no request
            return []
        outs = [self._current] + [x.out for x in (self._inflight, self._collecting) if x is not None]
        failed: dict[str, Request] = {}
        for out in outs:
            failed.update((r.request_id, r) for r in [c.request for c in out.prefills] + out.decodes)
        for req in failed.values():
            if not req.finished:
                self._fail(req)
        self._current = self._inflight = self._collecting = None
        self.runner.reset()
        return list(failed)

    def _fail(self, req: Request) -> None:
        self.scheduler.finish(req, RequestStatus.FINISHED_ERROR)
        ids = req.output_token_ids
        while ids and ids[-1] < 0:  # placeholders of steps that will never be collected
            ids.pop()
        req.metrics.finished_time = time.perf_counter()
        self.num_failed += 1

    def _process(self, req: Request, token: int, n: int, now: float) -> RequestOutput:
        """``_update`` one request; if that raises (host work on this request alone: stop checks,
        detokenization), the request fails alone (``finish_reason="error"``) and the step goes on."""
        try:
            return self._update(req, token, n, now)
        except Exception as e:
            log.exception("request %s failed in post-processing", req.request_id)
            if not req.finished:
                self._fail(req)
            req.status = RequestStatus.FINISHED_ERROR
            del req.output_token_ids[n:]
            return RequestOutput(
                req.request_id, [token], "", True, "error", req.metrics, n, list(req.output_token_ids), None, repr(e)
            )

    def _update(self, req: Request, token: int, n: int, now: float) -> RequestOutput:
        """Stop checks and detokenization for a request whose ``n``-th output token, ``token``, just arrived."""
        req.metrics.on_token(now)
        p = req.params
        status = None
        stop_ids = self.eos_token_ids if p.stop_token_ids is None else p.stop_token_ids
        if not p.ignore_eos and token in stop_ids:
            status = RequestStatus.FINISHED_STOPPED
        elif req.num_prompt_tokens + n >= req.max_total_tokens:  # max_tokens or the model's context
            status = RequestStatus.FINISHED_LENGTH
        if req.detokenizer is not None and req.detokenizer.add(n) is not None:
            status = RequestStatus.FINISHED_STOPPED
        if status is not None:
            self.scheduler.finish(req, status)
            del req.output_token_ids[n:]  # the overlapped engine's token in flight past the end
            req.metrics.finished_time = now
            self.num_finished += 1
        return self._output(req, [token], n)

    def _output(self, req: Request, new_tokens: list[int], n: int) -> RequestOutput:
        """The step's delta for ``req`` (``n`` output tokens known); its whole output too when it finished."""
        d, finished = req.detokenizer, req.finished
        delta = "" if d is None else d.finish() if finished else d.stream()
        full = finished or req.params.full_outputs
        return RequestOutput(
            request_id=req.request_id,
            new_token_ids=new_tokens,
            delta_text=delta,
            finished=finished,
            finish_reason=req.status.value if finished else None,
            metrics=req.metrics,
            num_output_tokens=n,
            token_ids=req.output_token_ids[:n] if full else None,
            text=(d.text() if d is not None else "") if full else None,
        )

    # -------------------------------------------------------------------------------- helpers
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        images: Sequence[Sequence[EngineImage | ImageInput] | None] | None = None,
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run a list of prompts to completion (all queued at once); final outputs in prompt order."""
        images = images if images is not None else [None] * len(prompts)
        plist = params if isinstance(params, Sequence) else [params] * len(prompts)
        ids = [
            self.add_request(None, p, im, SamplingParams(**vars(sp)) if sp else None).request_id
            for p, im, sp in zip(prompts, images, plist, strict=True)
        ]
        final: dict[str, RequestOutput] = {}
        while self.has_unfinished_requests():
            for out in self.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[i] for i in ids]

    def metrics(self) -> EngineMetrics:
        bm, ec = self.block_manager, self.encoder_cache
        return EngineMetrics(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_blocks_total=bm.num_blocks,
            kv_blocks_used=bm.num_used_blocks,
            kv_usage=bm.usage,
            prefix_cache_queries=bm.prefix_queries,
            prefix_cache_hits=bm.prefix_hits,
            encoder_images_run=self.runner.images_encoded,
            encoder_cache_hits=ec.hits,
            encoder_cache_entries=ec.num_entries,
            num_preemptions=self.scheduler.num_preemptions,
            num_steps=self.num_steps,
            num_prompt_tokens_computed=self.num_prefill_tokens,
            num_generated_tokens=self.num_generated,
            num_finished=self.num_finished,
            num_aborted=self.num_aborted,
            num_rejected=self.num_rejected,
        )
