"""The model runner: turns a ``SchedulerOutput`` into tensors, runs the model, samples.

Per step: the vision tower on the images the scheduler listed (all tiles in one batch, features into the
encoder cache); one packed prefill forward over every scheduled chunk, attending over each request's whole
cached context (``kv_slots``/``cu_seqlens_k``: prefix-cache hits and earlier chunks included); one batched
decode forward through paged attention (replayed from a CUDA graph when ``decode_graphs`` has a bucket for the
batch, see ``decode_graphs.py``); one ``sample`` call over the rows that produce a token (``BatchSampler``:
the settings' tensors are rebuilt only when the batch changes), and one host sync for the sampled ids.
``launch`` enqueues a step and ``collect`` waits for its ids, so that the overlapped engine can prepare the
next step in between (``overlap=True``: input ids may then name the previous launch's ids by placeholder).

Image slots inside a chunk: the chunk's rows of each overlapping image's features (from the encoder cache)
go in ``image_features``, with chunk-local ``image_offsets``/``image_counts``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence

from fastllava.engine.decode_graphs import CTX, IDS, DecodeGraphs, decode_forward, decode_rows
from fastllava.engine.encoder_cache import EncoderCache
from fastllava.engine.request import Request
from fastllava.engine.sampling import BatchSampler
from fastllava.engine.scheduler import SchedulerOutput
from fastllava.model.language import AttnMetadata, KVCache
from fastllava.packing import PackedBatch, batch_feature_index, image_feature_index, used_tiles

log = logging.getLogger(__name__)


def kv_heads(model) -> int:
    """The K/V heads this process caches: a tensor-parallel rank's share (``language_model.num_kv_heads``), or
    the config's count for a model without a language-model module of ours (e.g. the benchmarks' null model)."""
    lm = getattr(model, "language_model", None)
    return lm.num_kv_heads if lm is not None else model.config.text.num_key_value_heads


class BlockTables:
    """Decode block tables ``(B, width)`` int32 on the host, without an O(context) Python loop per row per step.

    Each running request's row is kept as a tensor and rebuilt only when its table grew (once per block of
    tokens); a step stacks the rows (one C++ call).
    """

    def __init__(self) -> None:
        self._rows: dict[str, tuple[list[int], torch.Tensor]] = {}

    def __call__(self, reqs: list[Request], tables: dict[str, list[int]]) -> torch.Tensor:
        rows: dict[str, tuple[list[int], torch.Tensor]] = {}
        for r in reqs:
            table = tables[r.request_id]
            row = self._rows.get(r.request_id)
            # the block manager appends to a request's table in place; a new list means a new admission
            if row is None or row[0] is not table or row[1].numel() != len(table):
                row = (table, torch.tensor(table, dtype=torch.int32))
            rows[r.request_id] = row
        self._rows = rows  # only this step's requests: finished ones are dropped
        return pad_sequence([rows[r.request_id][1] for r in reqs], batch_first=True)


@dataclass
class StepHandle:
    """A launched step: its sampling rows, and their ids on the host once ``done`` (a CUDA event) has fired."""

    requests: list[Request]
    tokens: torch.Tensor | None  # (B,) int64: pinned host memory on CUDA (filled asynchronously), else final
    done: torch.cuda.Event | None


class ModelRunner:
    def __init__(
        self,
        model,
        num_blocks: int,
        block_size: int,
        encoder_cache: EncoderCache,
        kv_dtype: torch.dtype | None = None,
        *,
        decode_max_batch: int = 0,
        capture_graphs: bool = False,
        max_model_len: int | None = None,
    ) -> None:
        """``decode_max_batch > 0``: decode batches up to that size run bucketed from static buffers
        (``DecodeGraphs``), replayed from CUDA graphs when ``capture_graphs``; bigger ones run eagerly."""
        self.model = model
        self.cfg = model.config
        self.device = model.device
        self.block_size = block_size
        bucketed = decode_max_batch > 0
        # the bucketed decode's padding rows write one scratch block past the block manager's (index num_blocks)
        kv_blocks = num_blocks + 1 if bucketed else num_blocks
        self.kv = KVCache(
            self.cfg.text, kv_blocks, block_size, self.device, kv_dtype or model.dtype,
            num_kv_heads=kv_heads(model),
        )  # fmt: skip
        self.encoder_cache = encoder_cache
        self.images_encoded = 0
        self.vision_batches = 0
        self._feature_index: dict[tuple[int, int], torch.Tensor] = {}
        self.sampler = BatchSampler(self.device)
        self.block_tables = BlockTables()
        self.overlap = False  # set by the engine: input ids may hold placeholders for the last launch's ids
        self._prev_sampled: torch.Tensor | None = None  # the last launch's sampled ids (device), for placeholders
        self.keep_logits = False  # set by model.generate for transformers' stopping_criteria, which read logits
        self.last_logits: tuple[list[Request], torch.Tensor] | None = None  # the last launch's rows and (B, V)
        self.decode_graphs: DecodeGraphs | None = None
        if bucketed:
            try:
                kwargs = dict(
                    scratch_block=num_blocks,
                    max_batch=decode_max_batch,
                    max_model_len=max_model_len or self.cfg.text.max_position_embeddings,
                    capture=capture_graphs,
                )
                # a tensor-parallel model builds them on every rank, over each rank's shard
                build = getattr(model, "decode_graphs", None) or (lambda kv, **kw: DecodeGraphs(model, kv, **kw))
                self.decode_graphs = build(self.kv, block_tables=self.block_tables, **kwargs)
                self.decode_graphs.fill_ids = self._fill_placeholders
            except RuntimeError as exc:
                if not capture_graphs:
                    raise
                # an op that cannot be captured (a backend or kernel we have not run under capture): serve
                # with eager decode rather than not at all
                log.warning("CUDA graph capture of the decode step failed, decoding eagerly: %s", exc)
                self.decode_graphs = None

    # ------------------------------------------------------------------------------------ step
    def execute(self, out: SchedulerOutput, tables: dict[str, list[int]]) -> dict[str, int]:
        """Run one step; returns the sampled token of every request whose row produced one."""
        return self.collect(self.launch(out, tables))

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput, tables: dict[str, list[int]]) -> StepHandle:
        """Enqueue one step (encoder, prefill, decode, sample) and a copy of its sampled ids to the host; no sync.

        Input ids may hold placeholders ``-(1 + row)`` for tokens the previous launch sampled that the host
        has not seen yet (the overlapped engine): they are read from that launch's sampled ids on the device.
        """
        if out.encoder_inputs:
            self._encode(out.encoder_inputs)
        logits: list[torch.Tensor] = []
        sampling: list[Request] = []
        if out.prefills:
            hidden, last = self._prefill(out, tables)
            idx = [k for k, c in enumerate(out.prefills) if c.samples]
            if idx:
                logits.append(self.model.logits(hidden[last[idx]]))
                sampling += [out.prefills[k].request for k in idx]
        if out.decodes:
            logits.append(self._decode(out.decodes, tables))
            sampling += out.decodes
        if not sampling:
            self._prev_sampled = None
            return StepHandle([], None, None)
        rows = torch.cat(logits) if len(logits) > 1 else logits[0]  # (B, V)
        if self.keep_logits:
            self.last_logits = (sampling, rows)
        sampled = self.sampler(rows, sampling)  # (B,) on the device
        self._prev_sampled = sampled
        if sampled.device.type != "cuda":
            return StepHandle(sampling, sampled, None)
        host = torch.empty(sampled.shape, dtype=sampled.dtype, pin_memory=True)
        host.copy_(sampled, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return StepHandle(sampling, host, done)

    def collect(self, handle: StepHandle) -> dict[str, int]:
        """Wait for a launched step's sampled ids (only for that step, not for any launched after it)."""
        if not handle.requests:
            return {}
        if handle.done is not None:
            handle.done.synchronize()
        tokens = handle.tokens.tolist()  # the step's one host sync
        return {r.request_id: t for r, t in zip(handle.requests, tokens, strict=True)}

    def reset(self) -> None:
        """Forget the last launch (after a failed step): no placeholders refer to it, the sampler rebuilds."""
        self._prev_sampled = None
        self.sampler = BatchSampler(self.device)

    def _fill_placeholders(self, ids: torch.Tensor) -> torch.Tensor:
        """Input ids with the previous launch's placeholders ``-(1 + row)`` replaced by its sampled ids."""
        prev = self._prev_sampled
        if prev is None or not self.overlap:
            return ids
        rows = (-ids - 1).clamp(0, prev.numel() - 1)
        return torch.where(ids < 0, prev[rows], ids)

    # --------------------------------------------------------------------------------- encoder
    def _index(self, size_hw: tuple[int, int]) -> torch.Tensor:
        if size_hw not in self._feature_index:
            self._feature_index[size_hw] = image_feature_index(self.cfg, size_hw)
        return self._feature_index[size_hw]

    def _encode(self, items: list[tuple[Request, int]]) -> None:
        """All listed images through the vision tower + projector at once; features into the encoder cache."""
        tiles, counts = [], []
        for req, j in items:
            img = req.images[j]
            tiles.append(used_tiles(self.cfg, img.pixel_values, img.size_hw))
            counts.append(self._index(img.size_hw).numel())
        index_t = batch_feature_index(self.cfg, [req.images[j].size_hw for req, j in items], self._index)
        pixels = torch.cat(tiles).to(self.device, self.model.dtype, non_blocking=True)
        feats = self.model.encode_images(pixels, index_t.to(self.device))  # (sum counts, D)
        for (req, j), f in zip(items, feats.split(counts), strict=True):
            self.encoder_cache.put(req.images[j].content_hash, f)
        self.encoder_cache.misses += len(items)
        self.images_encoded += len(items)
        self.vision_batches += 1

    # --------------------------------------------------------------------------------- prefill
    def _prefill(self, out: SchedulerOutput, tables: dict[str, list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """One packed forward over every chunk; returns hidden ``[T, D]`` and each chunk's last row."""
        bs = self.block_size
        ids, pos, slots, kv_slots, lens, lens_k = [], [], [], [], [], []
        feats, img_off, img_cnt = [], [], []
        base = 0
        for c in out.prefills:
            req, s, n = c.request, c.start, c.num_tokens
            table = torch.tensor(tables[req.request_id], dtype=torch.long)
            ctx = torch.arange(s + n)  # the whole context: cached prefix + this chunk
            ctx_slots = table[ctx // bs] * bs + ctx % bs
            ids.extend(req.token_ids(s, s + n))
            pos.append(ctx[s:])
            slots.append(ctx_slots[s:])
            kv_slots.append(ctx_slots)
            lens.append(n)
            lens_k.append(s + n)
            for j, lo, hi in req.images_in(s, s + n):
                feats.append(self.encoder_cache.get(req.images[j].content_hash)[lo:hi])
                img_off.append(base + req.image_offsets[j] + lo - s)
                img_cnt.append(hi - lo)
            base += n
        dev = self.device
        cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(lens).cumsum(0)
        cu_k = torch.zeros(len(lens) + 1, dtype=torch.int32)
        cu_k[1:] = torch.tensor(lens_k).cumsum(0)
        batch = PackedBatch(
            input_ids=self._fill_placeholders(torch.tensor(ids, dtype=torch.long).to(dev, non_blocking=True)),
            position_ids=torch.cat(pos).to(dev, non_blocking=True),
            cu_seqlens=cu.to(dev, non_blocking=True),
            max_seqlen=max(lens),
            seq_lens=lens,
        )
        image_features = None
        if feats:
            batch.image_offsets = torch.tensor(img_off, dtype=torch.long).to(dev, non_blocking=True)
            batch.image_counts = torch.tensor(img_cnt, dtype=torch.long).to(dev, non_blocking=True)
            batch.image_counts_host = img_cnt
            image_features = torch.cat(feats)
        meta = AttnMetadata(
            cu_seqlens=batch.cu_seqlens,
            max_seqlen=batch.max_seqlen,
            slot_mapping=torch.cat(slots).to(dev, non_blocking=True),
            kv_slots=torch.cat(kv_slots).to(dev, non_blocking=True),
            cu_seqlens_k=cu_k.to(dev, non_blocking=True),
            max_seqlen_k=max(lens_k),
        )
        hidden = self.model.forward_packed(batch, meta, self.kv, image_features, max_position=max(lens_k))
        return hidden, (cu[1:] - 1).long().to(dev, non_blocking=True)

    # ---------------------------------------------------------------------------------- decode
    def _decode(self, reqs: list[Request], tables: dict[str, list[int]]) -> torch.Tensor:
        """One token per request at position ``num_computed_tokens``; returns logits ``[B, V]``."""
        if self.decode_graphs is not None:
            # None: the batch is bigger than every bucket
            logits = self.decode_graphs.run(reqs, tables)
            if logits is not None:
                return logits
        return self.model.logits(self._decode_eager(reqs, tables))

    def _decode_eager(self, reqs: list[Request], tables: dict[str, list[int]]) -> torch.Tensor:
        """The decode forward at the batch's own size; returns hidden ``[B, D]``."""
        dev = self.device
        host = torch.tensor(decode_rows(reqs, tables, self.block_size), dtype=torch.long)  # (4, B)
        rows = host.to(dev, non_blocking=True)
        rows[IDS] = self._fill_placeholders(rows[IDS])
        block_tables = self.block_tables(reqs, tables).to(dev, non_blocking=True)  # (B, width)
        cu = torch.arange(len(reqs) + 1, dtype=torch.int32).to(dev, non_blocking=True)
        return decode_forward(self.model, self.kv, rows, block_tables, cu, max_position=int(host[CTX].max()))
