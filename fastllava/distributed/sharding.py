"""Megatron-style sharding of the language model, applied from outside (the model file knows nothing of it).

    layout = ShardLayout.for_config(config.text, rank, world)
    shard_model_(model, layout)          # on the meta device, before the rank's slices are assigned
    state[name] = layout.slice(name).take(full_or_safetensors_slice)

Per decoder layer (Shoeybi et al. 2019, "Megatron-LM", section 3):
  * q/k/v and gate/up are column-parallel: each rank holds its heads' rows / its slice of the intermediate
    size, so attention and the SiLU-gated product run on local heads with no communication;
  * o and down are row-parallel: each rank multiplies its columns, and one all-reduce (a forward hook on
    the attention / MLP module, so that quantization's module swaps keep it) sums the partial outputs.
    A row-parallel bias is held by rank 0 only (zeros elsewhere), so the sum adds it once.
  * K/V heads are split like q heads; with more ranks than K/V heads each rank holds the one K/V head its
    q heads read (replicated ``world / num_kv_heads`` times, as vLLM does). The paged KV cache of a rank
    holds its local K/V heads only.
  * the embedding and LM head are vocabulary-parallel: each rank holds ``ceil(V / world)`` rows (the last
    one zero-padded); the embedding masks ids outside its rows and all-reduces, the head all-gathers the
    (few) rows of logits the engine samples from.

Plain sharded ``nn.Linear`` + ``torch.distributed`` collectives rather than DTensor / ``parallelize_module``:
the packed path hands raw ``[T, H, D]`` tensors to our kernels and attention backends (varlen, paged), the
head counts the attention module views with must be the local ones anyway, and DTensor's per-op dispatch
costs host time on every decode step, where the engine is host-bound; the two collectives per layer are
the whole of the communication either way.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fastllava.config import TextConfig


@dataclass(frozen=True)
class Slice:
    """The part of one checkpoint tensor a rank holds: ``[start, stop)`` along ``dim``, zero-padded to
    ``size`` rows (vocabulary), or the whole tensor on rank 0 and zeros elsewhere (``rank0_only``)."""

    dim: int = 0
    start: int = 0
    stop: int = 0
    size: int | None = None
    rank0_only: bool = False
    rank: int = 0

    def take(self, full) -> torch.Tensor:
        """The rank's part of ``full``: a tensor, or a safetensors ``get_slice`` handle (reads only that part)."""
        if self.rank0_only:
            t = full[:]
            return t if self.rank == 0 else torch.zeros_like(t)
        index = (slice(self.start, self.stop),) if self.dim == 0 else (slice(None), slice(self.start, self.stop))
        t = full[index]
        if self.size is not None and t.shape[0] < self.size:
            t = torch.cat([t, t.new_zeros((self.size - t.shape[0], *t.shape[1:]))])
        return t


_LAYER = r"language_model\.layers\.\d+\."
_RULES = [  # (pattern, which range, dim)
    (re.compile(_LAYER + r"self_attn\.q_proj\.(weight|bias)$"), "q", 0),
    (re.compile(_LAYER + r"self_attn\.[kv]_proj\.(weight|bias)$"), "kv", 0),
    (re.compile(_LAYER + r"self_attn\.o_proj\.weight$"), "q", 1),
    (re.compile(_LAYER + r"mlp\.(gate|up)_proj\.(weight|bias)$"), "mlp", 0),
    (re.compile(_LAYER + r"mlp\.down_proj\.weight$"), "mlp", 1),
    (re.compile(_LAYER + r"(self_attn\.o_proj|mlp\.down_proj)\.bias$"), "rank0", 0),
    (re.compile(r"language_model\.(embed_tokens|lm_head)\.weight$"), "vocab", 0),
]


@dataclass(frozen=True)
class ShardLayout:
    """Which heads, intermediate columns and vocabulary rows rank ``rank`` of ``world`` holds."""

    rank: int
    world: int
    head_dim: int
    num_heads: int  # local q heads
    num_kv_heads: int  # local K/V heads (1 when replicated)
    kv_head_start: int
    intermediate: int  # local intermediate size
    vocab_size: int  # the model's (unpadded) vocabulary
    vocab_per_rank: int

    @classmethod
    def for_config(cls, cfg: TextConfig, rank: int, world: int) -> ShardLayout:
        """The layout, or a ValueError naming the size that does not split over ``world`` ranks."""
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank {rank} of tensor-parallel size {world} is out of range")
        hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
        if hq % world:
            raise ValueError(f"num_attention_heads={hq} does not split over tensor_parallel_size={world}")
        if hkv % world and world % hkv:
            raise ValueError(
                f"num_key_value_heads={hkv} and tensor_parallel_size={world}: one must divide the other "
                "(K/V heads are split, or replicated when there are fewer than ranks)"
            )
        if cfg.intermediate_size % world:
            raise ValueError(f"intermediate_size={cfg.intermediate_size} does not split over {world} ranks")
        local_kv = max(1, hkv // world)
        # rank r's q heads [r*hq/world, ...) read K/V head (first q head) // (hq / hkv)
        kv_start = (rank * (hq // world)) // (hq // hkv)
        return cls(
            rank=rank,
            world=world,
            head_dim=cfg.head_dim,
            num_heads=hq // world,
            num_kv_heads=local_kv,
            kv_head_start=kv_start,
            intermediate=cfg.intermediate_size // world,
            vocab_size=cfg.vocab_size,
            vocab_per_rank=math.ceil(cfg.vocab_size / world),
        )

    @property
    def vocab_start(self) -> int:
        return self.rank * self.vocab_per_rank

    def slice(self, name: str) -> Slice | None:
        """The rank's part of fastllava parameter ``name``; None when every rank holds it whole."""
        rule = next(((kind, dim) for pattern, kind, dim in _RULES if pattern.search(name)), None)
        if rule is None:
            return None
        kind, dim = rule
        D = self.head_dim
        if kind == "rank0":
            return Slice(rank0_only=True, rank=self.rank)
        if kind == "q":
            start, n = self.rank * self.num_heads * D, self.num_heads * D
        elif kind == "kv":
            start, n = self.kv_head_start * D, self.num_kv_heads * D
        elif kind == "mlp":
            start, n = self.rank * self.intermediate, self.intermediate
        else:
            start = self.vocab_start
            stop = min(self.vocab_size, start + self.vocab_per_rank)
            return Slice(0, start, stop, size=self.vocab_per_rank, rank=self.rank)
        return Slice(dim, start, start + n, rank=self.rank)


# --------------------------------------------------------------------------------------- modules


def _all_reduce_output(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    """Forward hook of a row-parallel block (attention, MLP): sum the ranks' partial outputs (sync point)."""
    dist.all_reduce(output)
    return output


class VocabParallelEmbedding(nn.Embedding):
    """The rows ``[start, start + num_embeddings)`` of the vocabulary; ids outside give zeros, summed over ranks."""

    def __init__(self, num_embeddings: int, embedding_dim: int, start: int, **kw) -> None:
        super().__init__(num_embeddings, embedding_dim, **kw)
        self.start = start

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.num_embeddings)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)  # (T, D)
        out = out.masked_fill(outside[:, None], 0)
        dist.all_reduce(out)
        return out


class VocabParallelHead(nn.Linear):
    """The LM head's rows of this rank's vocabulary; gathers every rank's logits ``[B, V]`` on every rank."""

    def __init__(self, in_features: int, out_features: int, vocab_size: int, world: int, **kw) -> None:
        super().__init__(in_features, out_features, bias=False, **kw)
        self.vocab_size, self.world = vocab_size, world

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        local = F.linear(hidden, self.weight).contiguous()  # (B, V / world)
        parts = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(parts, local)
        return torch.cat(parts, dim=-1)[..., : self.vocab_size]


class NoVisionTower(nn.Module):
    """What a follower rank holds in place of the vision tower: rank 0 encodes every image."""

    def set_attn_implementation(self, name: str | None) -> None:
        pass

    def forward(self, *args, **kwargs):
        raise RuntimeError("this tensor-parallel rank holds no vision tower: rank 0 encodes the images")


def _linear(in_features: int, out_features: int, like: nn.Linear) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=like.bias is not None, device="meta")


def shard_model_(model: nn.Module, layout: ShardLayout, keep_vision: bool = True) -> nn.Module:
    """Swap the language model's modules (in place, on the meta device) for this rank's shards.

    ``keep_vision=False`` drops the vision tower, projector and image newline (the follower ranks: rank 0
    encodes images and sends their features with the step)."""
    lm = model.language_model
    D, hidden = layout.head_dim, lm.cfg.hidden_size
    q, kv, inter = layout.num_heads * D, layout.num_kv_heads * D, layout.intermediate
    for layer in lm.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.q_proj = _linear(hidden, q, attn.q_proj)
        attn.k_proj = _linear(hidden, kv, attn.k_proj)
        attn.v_proj = _linear(hidden, kv, attn.v_proj)
        attn.o_proj = _linear(q, hidden, attn.o_proj)
        attn.n_heads, attn.n_kv = layout.num_heads, layout.num_kv_heads
        mlp.gate_proj = _linear(hidden, inter, mlp.gate_proj)
        mlp.up_proj = _linear(hidden, inter, mlp.up_proj)
        mlp.down_proj = _linear(inter, hidden, mlp.down_proj)
        attn.register_forward_hook(_all_reduce_output)
        mlp.register_forward_hook(_all_reduce_output)
    lm.embed_tokens = VocabParallelEmbedding(layout.vocab_per_rank, hidden, layout.vocab_start, device="meta")
    lm.lm_head = VocabParallelHead(hidden, layout.vocab_per_rank, layout.vocab_size, layout.world, device="meta")
    if not keep_vision:
        model.vision_tower = NoVisionTower()
        model.multi_modal_projector = None
        if getattr(model, "image_newline", None) is not None:
            model.image_newline = None
    return model
