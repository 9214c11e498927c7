"""Decoder-only language model (Llama, Mistral, Qwen2) over packed token streams.

Reads top to bottom: attention metadata, the paged KV cache view, attention, MLP, block, model.
Every forward takes a flat stream ``[T, D]`` plus an ``AttnMetadata`` saying how tokens group into
sequences and where their K/V live in the cache. Norms, rotary and attention go through the kernel ops and
the attention registry; nothing here branches on a backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastllava.attention import paged_attention, varlen_attention
from fastllava.config import TextConfig
from fastllava.kernels import apply_rotary, rms_norm, rotary_cos_sin


@dataclass
class AttnMetadata:
    """How the T tokens of one forward group into sequences, and where their keys and values go.

    Training / plain prefill: ``cu_seqlens``/``max_seqlen`` only (no cache).
    Prefill into a cache: also ``slot_mapping [T]`` (flat cache slot of each token's K/V).
    Prefill over a cached prefix (chunked prefill, prefix caching): also ``kv_slots [Tk]`` (flat slots of
    each sequence's whole context, prefix then new tokens, packed) and ``cu_seqlens_k``/``max_seqlen_k``.
    Decode: one token per sequence; ``block_tables [B, max_blocks]`` and ``context_lens [B]``.
    """

    cu_seqlens: torch.Tensor  # [B+1] int32
    max_seqlen: int
    slot_mapping: torch.Tensor | None = None
    kv_slots: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    max_seqlen_k: int | None = None
    block_tables: torch.Tensor | None = None
    context_lens: torch.Tensor | None = None
    decode: bool = False


class KVCache:
    """Paged K/V storage for every layer: ``[num_blocks, block_size, Hk, D]`` each for K and V."""

    def __init__(
        self,
        cfg: TextConfig,
        num_blocks: int,
        block_size: int,
        device: torch.device,
        dtype: torch.dtype,
        num_kv_heads: int | None = None,  # a tensor-parallel rank's share (LanguageModel.num_kv_heads)
    ) -> None:
        shape = (num_blocks, block_size, num_kv_heads or cfg.num_key_value_heads, cfg.head_dim)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.window = cfg.sliding_window
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.attention_bias)
        # Qwen2 puts biases on q/k/v only; Llama/Mistral have none
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.backend = "auto"  # set by LanguageModel.set_attn_implementation

    def forward(self, x, cos, sin, position_ids, meta: AttnMetadata, cache: KVCache | None):
        T = x.shape[0]
        q = self.q_proj(x).view(T, self.n_heads, self.head_dim)  # (T, Hq, D)
        k = self.k_proj(x).view(T, self.n_kv, self.head_dim)  # (T, Hk, D)
        v = self.v_proj(x).view(T, self.n_kv, self.head_dim)
        q, k = apply_rotary(q, k, cos, sin, position_ids)
        if cache is not None and meta.slot_mapping is not None:
            kc, vc = cache.k[self.layer_idx], cache.v[self.layer_idx]
            kc.view(-1, self.n_kv, self.head_dim).index_copy_(0, meta.slot_mapping, k.to(kc.dtype))
            vc.view(-1, self.n_kv, self.head_dim).index_copy_(0, meta.slot_mapping, v.to(vc.dtype))
        if meta.decode:
            out = paged_attention(
                q, cache.k[self.layer_idx], cache.v[self.layer_idx], meta.block_tables, meta.context_lens,
                backend=self.backend, window=self.window,
            )  # fmt: skip
        elif meta.kv_slots is not None:
            k_all = cache.k[self.layer_idx].view(-1, self.n_kv, self.head_dim)[meta.kv_slots]  # (Tk, Hk, D)
            v_all = cache.v[self.layer_idx].view(-1, self.n_kv, self.head_dim)[meta.kv_slots]
            out = varlen_attention(
                q, k_all.to(q.dtype), v_all.to(q.dtype), meta.cu_seqlens, meta.max_seqlen, causal=True,
                backend=self.backend, window=self.window,
                cu_seqlens_k=meta.cu_seqlens_k, max_seqlen_k=meta.max_seqlen_k,
            )  # fmt: skip
        else:
            out = varlen_attention(
                q, k, v, meta.cu_seqlens, meta.max_seqlen, causal=True, backend=self.backend, window=self.window
            )
        return self.o_proj(out.reshape(T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        if cfg.hidden_act != "silu":
            raise ValueError(f"hidden_act={cfg.hidden_act!r} is not supported (Llama/Mistral/Qwen2 use silu)")
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x, residual=None):
        return rms_norm(x, self.weight, self.eps, residual=residual)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, residual, cos, sin, position_ids, meta, cache):
        # pre-norm block; the residual add is fused into the next norm: h = norm(x + residual)
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        x = self.self_attn(h, cos, sin, position_ids, meta, cache)
        h, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(h), residual


class LanguageModel(nn.Module):
    """Embeddings, decoder layers, final norm and LM head. Works on one packed stream ``[T, D]``."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.gradient_checkpointing = False
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def num_kv_heads(self) -> int:
        """K/V heads the attention layers hold: the config's, or a tensor-parallel rank's share of them."""
        return self.layers[0].self_attn.n_kv

    def set_attn_implementation(self, name: str) -> None:
        for layer in self.layers:
            layer.self_attn.backend = name

    def rope_tables(self, device: torch.device, max_position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``[P, head_dim]`` in fp32, grown on demand (cached on the module, not in the state dict)."""
        size = max(self.cfg.max_position_embeddings, max_position)
        if self._rope is None or self._rope[0].shape[0] < size or self._rope[0].device != device:
            self._rope = rotary_cos_sin(
                self.cfg.head_dim, size, base=self.cfg.rope_theta, device=device, scaling=self.cfg.rope_scaling
            )
        return self._rope

    def forward(
        self,
        inputs_embeds: torch.Tensor,  # (T, D)
        position_ids: torch.Tensor,  # (T,)
        meta: AttnMetadata,
        cache: KVCache | None = None,
        max_position: int | None = None,
    ) -> torch.Tensor:
        """Final hidden states ``[T, D]`` (normed); apply ``lm_head`` only where logits are needed."""
        # max_position: a host-side bound on position_ids, so no sync is needed to size the rope tables
        cos, sin = self.rope_tables(inputs_embeds.device, max_position or self.cfg.max_position_embeddings)
        cos, sin = cos.to(inputs_embeds.dtype), sin.to(inputs_embeds.dtype)
        x, residual = inputs_embeds, None
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x, residual = torch.utils.checkpoint.checkpoint(
                    layer, x, residual, cos, sin, position_ids, meta, cache, use_reentrant=False
                )
            else:
                x, residual = layer(x, residual, cos, sin, position_ids, meta, cache)
        h, _ = self.norm(x, residual)
        return h
