"""CUDA graphs for the batched decode step (vLLM style), and the static buffers they replay from.

A decode step runs one token per sequence: a few small kernels per layer, so at small batch sizes the GPU
waits on the host's launches. Capturing the step (embedding, every layer over the paged KV cache, final norm,
LM head) once per batch-size bucket and replaying it makes those launches one.

- buckets: 1, 2, 4, then every multiple of 8 below ``max_batch``, then ``max_batch``. A batch of B runs as
  the smallest bucket >= B; ``run`` returns None for a bigger one (the caller runs it eagerly).
- static inputs, the addresses the graphs read: ``rows [4, max_batch]`` (token ids, positions, KV slots,
  context lengths) and ``block_tables [max_batch, max_blocks]``, ``max_blocks = ceil(max_model_len /
  block_size)``, entries past a sequence's blocks zero (masked: context lengths bound every key).
  Each step fills pinned host staging buffers (two sets, in turn) and makes two host->device copies; no sync.
- padding rows B..bucket-1: token 0 at position 0, context length 1, block table ``[scratch, 0, ...]`` and
  slot 0 of the *scratch block*, one KV block past the block manager's (it never hands it out). Their K/V go
  there and they attend only to it, so they never touch a real block; their logits are dropped.
- output: logits ``[bucket, V]`` in the graph's memory; ``run`` returns the first B rows, valid until the
  next ``run``.

The graphs are captured at construction (largest bucket first; all share one memory pool) over the model as
it is then: the attention backend, ``set_kernels`` and module swaps chosen later do not reach them.
``capture=False`` runs the same bucketed forward eagerly on any device; the CPU tests check the padding and
bucketing through it.

Tensor parallelism: every rank holds a ``DecodeGraphs`` of the same buckets over its own shard and K/V cache
(``TensorParallelModel.decode_graphs``). They are built (and captured, largest bucket first) at the same time
on every rank, so the all-reduces and all-gathers inside the step are captured in the same order everywhere;
each step rank 0 sends its bucket's static inputs (``send_step``) and every rank copies them into its buffers
and replays (``run_rows`` on the followers).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

import torch

from fastllava.engine.request import Request
from fastllava.model.language import AttnMetadata, KVCache
from fastllava.packing import PackedBatch

IDS, POS, SLOT, CTX = range(4)  # the rows of DecodeGraphs.rows


def decode_rows(reqs: list[Request], tables: dict[str, list[int]], block_size: int) -> list[list[int]]:
    """The host inputs of one decode token per request: ``[ids, positions, KV slots, context lengths]``, each
    ``(B,)``; a request's token is its ``num_computed_tokens``-th, written to that position's slot of its table."""
    pos = [r.num_computed_tokens for r in reqs]
    ids = [r.token_ids(p, p + 1)[0] for r, p in zip(reqs, pos, strict=True)]
    bs = block_size
    slots = [tables[r.request_id][p // bs] * bs + p % bs for r, p in zip(reqs, pos, strict=True)]
    return [ids, pos, slots, [p + 1 for p in pos]]


def decode_forward(
    model,
    kv: KVCache,
    rows: torch.Tensor,  # (4, B) on the device: ids, positions, slots, context lengths (the order of IDS..CTX)
    block_tables: torch.Tensor,  # (B, width) int32 on the device
    cu_seqlens: torch.Tensor,  # (B + 1,) int32 on the device: one token per sequence
    max_position: int,
) -> torch.Tensor:
    """The decode forward, one token per sequence through paged attention; returns hidden ``(B, D)``.
    The one place decode inputs become a ``PackedBatch`` and ``AttnMetadata`` (eager and graphed decode alike)."""
    n = rows.shape[1]
    batch = PackedBatch(
        input_ids=rows[IDS], position_ids=rows[POS], cu_seqlens=cu_seqlens, max_seqlen=1, seq_lens=[1] * n
    )
    meta = AttnMetadata(
        cu_seqlens=cu_seqlens,
        max_seqlen=1,
        slot_mapping=rows[SLOT],
        block_tables=block_tables,
        context_lens=rows[CTX],
        decode=True,
    )
    return model.forward_packed(batch, meta, kv, max_position=max_position)


def _block_tables(reqs: list[Request], tables: dict[str, list[int]]) -> torch.Tensor:
    rows = [tables[r.request_id] for r in reqs]
    width = max(len(t) for t in rows)
    return torch.tensor([t + [0] * (width - len(t)) for t in rows], dtype=torch.int32)  # (B, width)


def decode_buckets(max_batch: int) -> list[int]:
    """Batch sizes with a graph: 1, 2, 4, the multiples of 8 below ``max_batch``, and ``max_batch``."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    return [b for b in (1, 2, 4) if b < max_batch] + list(range(8, max_batch, 8)) + [max_batch]


class DecodeGraphs:
    def __init__(
        self,
        model,
        kv: KVCache,
        scratch_block: int,
        max_batch: int,
        max_model_len: int,
        capture: bool,
        block_tables: Callable[[list[Request], dict[str, list[int]]], torch.Tensor] | None = None,
    ) -> None:
        """``block_tables(reqs, tables)``: the batch's block tables ``(B, width)`` int32 (the runner's
        ``BlockTables``, which keeps rows between steps); by default built from the lists."""
        if capture and model.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA model, this one is on {model.device}")
        if not 0 <= scratch_block < kv.num_blocks:
            raise ValueError(f"scratch block {scratch_block} is not in the cache's {kv.num_blocks} blocks")
        self.model = model
        self.kv = kv
        self.block_tables_of = block_tables or _block_tables
        self.buckets = decode_buckets(max_batch)
        self.max_batch = max_batch
        self.block_size = kv.block_size
        self.max_blocks = -(-max_model_len // kv.block_size)
        self.max_position = max_model_len  # host bound on positions + 1: sizes the rope tables once, statically
        self.scratch_block = scratch_block
        dev, pin = model.device, model.device.type == "cuda"
        # host staging, pinned on CUDA, two sets used in turn. A step's asynchronous copies out of its set may
        # still be queued when the host prepares the next step (the overlapped engine runs one step ahead); they
        # have run before the step after that is prepared, since the engine waits for each step's sampled ids
        # (copied after its inputs) before preparing the step two launches later.
        self._staging = [
            (
                torch.zeros(4, max_batch, dtype=torch.long, pin_memory=pin),
                torch.zeros(max_batch, self.max_blocks, dtype=torch.int32, pin_memory=pin),
            )
            for _ in range(2)
        ]
        self._turn = 0
        self._host_rows, self._host_tables = self._staging[0]
        self._pad(0, max_batch)
        self.rows = self._host_rows.to(dev)  # (4, max_batch)
        self.block_tables = self._host_tables.to(dev)  # (max_batch, max_blocks)
        self.cu_seqlens = torch.arange(max_batch + 1, dtype=torch.int32, device=dev)  # one token per sequence
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}  # bucket -> the graph's output, (bucket, V)
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None
        self.num_replays = self.num_padded_rows = 0
        # set by the runner: maps the input ids on the device before a replay (the overlapped engine's placeholders)
        self.fill_ids: Callable[[torch.Tensor], torch.Tensor] | None = None
        # set by a tensor-parallel model: ``send_step(rows, block_tables, launch)`` sends the bucket's inputs to
        # the follower ranks (which replay their own graphs with them, ``run_rows``), then calls ``launch``
        self.send_step: Callable[[torch.Tensor, torch.Tensor, Callable[[], torch.Tensor]], torch.Tensor] | None = None
        if capture:
            self._capture()

    # ---------------------------------------------------------------------------------- inputs
    def _pad(self, lo: int, hi: int) -> None:
        """Host rows ``lo..hi-1`` become padding rows: they read and write only the scratch block."""
        r = self._host_rows
        r[IDS, lo:hi] = 0
        r[POS, lo:hi] = 0
        r[SLOT, lo:hi] = self.scratch_block * self.block_size
        r[CTX, lo:hi] = 1
        self._host_tables[lo:hi] = 0
        self._host_tables[lo:hi, 0] = self.scratch_block

    def _forward(self, n: int) -> torch.Tensor:
        """The bucketed step over the first ``n`` static rows: logits ``(n, V)``. What the graphs capture."""
        rows, tables, cu = self.rows[:, :n], self.block_tables[:n], self.cu_seqlens[: n + 1]
        hidden = decode_forward(self.model, self.kv, rows, tables, cu, self.max_position)  # (n, D)
        return self.model.logits(hidden)  # (n, V)

    # ------------------------------------------------------------------------------------ step
    def run(self, reqs: list[Request], tables: dict[str, list[int]]) -> torch.Tensor | None:
        """Logits ``(B, V)`` of one decode token per request; None when the batch does not fit a bucket."""
        B = len(reqs)
        if B > self.max_batch:
            return None
        block_tables = [tables[r.request_id] for r in reqs]
        width = max(len(t) for t in block_tables)
        if width > self.max_blocks:  # cannot happen within max_model_len
            return None
        self._turn ^= 1
        self._host_rows, self._host_tables = self._staging[self._turn]
        n = self.buckets[bisect.bisect_left(self.buckets, B)]
        self._host_rows[:, :B] = torch.tensor(decode_rows(reqs, tables, self.block_size), dtype=torch.long)
        ht = self._host_tables
        ht[:B, :width] = self.block_tables_of(reqs, tables)
        ht[:B, width:] = 0
        self._pad(B, n)
        self.rows.copy_(self._host_rows, non_blocking=True)  # (4, max_batch): a few KiB, whole
        self.block_tables[:n].copy_(ht[:n], non_blocking=True)
        if self.fill_ids is not None:
            self.rows[IDS, :B] = self.fill_ids(self.rows[IDS, :B])
        self.num_padded_rows += n - B
        if self.send_step is not None:
            return self.send_step(self.rows[:, :n], self.block_tables[:n], lambda: self.launch(n))[:B]
        return self.launch(n)[:B]

    def launch(self, n: int) -> torch.Tensor:
        """The step of bucket ``n`` over the static buffers as they are: logits ``(n, V)`` (the graph's output)."""
        if n in self.graphs:
            self.graphs[n].replay()
            self.num_replays += 1
            return self.logits[n]
        return self._forward(n)

    def run_rows(self, rows: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
        """A tensor-parallel follower's step: another rank's bucket inputs (``rows (4, n)``, ``block_tables
        (n, max_blocks)``, padding rows included) into the static buffers, then ``launch(n)``."""
        n = rows.shape[1]
        if n not in self.buckets or tuple(block_tables.shape) != (n, self.max_blocks):
            raise ValueError(f"decode inputs {tuple(rows.shape)}, {tuple(block_tables.shape)} fit no bucket")
        self.rows[:, :n].copy_(rows, non_blocking=True)
        self.block_tables[:n].copy_(block_tables, non_blocking=True)
        return self.launch(n)

    # --------------------------------------------------------------------------------- capture
    @torch.inference_mode()
    def _capture(self) -> None:
        dev = self.model.device
        # the graphs read the rope tables' memory: size them for every position now, and keep them alive
        # even if the model later grows (replaces) its own
        self._rope = self.model.language_model.rope_tables(dev, self.max_position)
        torch.cuda.synchronize(dev)
        pool = None
        for n in reversed(self.buckets):  # largest first: the smaller graphs fit in its memory pool
            # warm up on a side stream (Triton compiles, lazy inits), as torch.cuda.graphs' docs do
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._forward(n)
            torch.cuda.current_stream(dev).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[n] = self._forward(n)
            pool = graph.pool()
            self.graphs[n] = graph
        torch.cuda.synchronize(dev)
