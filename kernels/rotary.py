"""Fused rotary position embedding (Llama "rotate half") for q and k of a packed batch, in one launch.

    q_rot, k_rot = apply_rotary(q, k, cos, sin, position_ids)   # q [T, Hq, D], k [T, Hk, D], cos/sin [P, D]
    apply_rotary_(q, k, cos, sin, position_ids)                  # in place (inference)
    cos, sin = rotary_cos_sin(head_dim, max_positions, base, device=..., scaling=...)

`position_ids` [T] restart at 0 for every packed sequence, so the tables are gathered per token inside the kernel
(no [T, D] cos/sin materialised). The grid is (token, head block): one program rotates a block of q heads or of
k heads of one token, so q and k share a single launch. The math is fp32 with one rounding to the output dtype.
The backward is the transposed rotation (sin negated and the two halves' sines swapped), the same kernel body.

Run the tests on CPU with `TRITON_INTERPRET=1 pytest tests/test_kernels_rotary.py`.
"""

from __future__ import annotations

import math

import torch

from fastllava.kernels.dispatch import HAS_TRITON, use_triton
from fastllava.kernels.launch import unit_last_stride

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rotary_program(
        q_ptr,
        k_ptr,
        q_out_ptr,
        k_out_ptr,
        cos_ptr,
        sin_ptr,
        pos_ptr,
        q_tok_stride,
        q_head_stride,
        k_tok_stride,
        k_head_stride,
        qo_tok_stride,
        qo_head_stride,
        ko_tok_stride,
        ko_head_stride,
        cos_stride,
        sin_stride,
        n_q_heads,
        n_k_heads,
        n_q_blocks,
        HALF: tl.constexpr,
        TRANSPOSE: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_D2: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        hb = tl.program_id(1)
        d = tl.arange(0, BLOCK_D2)
        dmask = d < HALF
        pos = tl.load(pos_ptr + t).to(tl.int64)
        # Both halves of the tables are read (transformers duplicates the first half; nothing here assumes it).
        c1 = tl.load(cos_ptr + pos * cos_stride + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
        c2 = tl.load(cos_ptr + pos * cos_stride + HALF + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
        s1 = tl.load(sin_ptr + pos * sin_stride + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
        s2 = tl.load(sin_ptr + pos * sin_stride + HALF + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
        if TRANSPOSE:
            # forward:  y1 = x1 c1 - x2 s1,  y2 = x2 c2 + x1 s2   -> its transpose swaps and negates the sines
            s1, s2 = -s2, -s1
        if hb < n_q_blocks:
            heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
            mask = (heads[:, None] < n_q_heads) & dmask[None, :]
            src = q_ptr + t * q_tok_stride + heads[:, None] * q_head_stride + d[None, :]
            dst = q_out_ptr + t * qo_tok_stride + heads[:, None] * qo_head_stride + d[None, :]
        else:
            heads = (hb - n_q_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
            mask = (heads[:, None] < n_k_heads) & dmask[None, :]
            src = k_ptr + t * k_tok_stride + heads[:, None] * k_head_stride + d[None, :]
            dst = k_out_ptr + t * ko_tok_stride + heads[:, None] * ko_head_stride + d[None, :]
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
        tl.store(dst, y1.to(dst.dtype.element_ty), mask=mask)
        tl.store(dst + HALF, y2.to(dst.dtype.element_ty), mask=mask)

    @triton.jit
    def _rotary_fwd_kernel(
        q_ptr,
        k_ptr,
        q_out_ptr,
        k_out_ptr,
        cos_ptr,
        sin_ptr,
        pos_ptr,
        q_tok_stride,
        q_head_stride,
        k_tok_stride,
        k_head_stride,
        qo_tok_stride,
        qo_head_stride,
        ko_tok_stride,
        ko_head_stride,
        cos_stride,
        sin_stride,
        n_q_heads,
        n_k_heads,
        n_q_blocks,
        HALF: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_D2: tl.constexpr,
    ):
        _rotary_program(
            q_ptr, k_ptr, q_out_ptr, k_out_ptr, cos_ptr, sin_ptr, pos_ptr,
            q_tok_stride, q_head_stride, k_tok_stride, k_head_stride,
            qo_tok_stride, qo_head_stride, ko_tok_stride, ko_head_stride,
            cos_stride, sin_stride, n_q_heads, n_k_heads, n_q_blocks,
            HALF, False, BLOCK_H, BLOCK_D2,
        )  # fmt: skip

    @triton.jit
    def _rotary_bwd_kernel(
        dq_ptr,
        dk_ptr,
        dq_out_ptr,
        dk_out_ptr,
        cos_ptr,
        sin_ptr,
        pos_ptr,
        dq_tok_stride,
        dq_head_stride,
        dk_tok_stride,
        dk_head_stride,
        dqo_tok_stride,
        dqo_head_stride,
        dko_tok_stride,
        dko_head_stride,
        cos_stride,
        sin_stride,
        n_q_heads,
        n_k_heads,
        n_q_blocks,
        HALF: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_D2: tl.constexpr,
    ):
        _rotary_program(
            dq_ptr, dk_ptr, dq_out_ptr, dk_out_ptr, cos_ptr, sin_ptr, pos_ptr,
            dq_tok_stride, dq_head_stride, dk_tok_stride, dk_head_stride,
            dqo_tok_stride, dqo_head_stride, dko_tok_stride, dko_head_stride,
            cos_stride, sin_stride, n_q_heads, n_k_heads, n_q_blocks,
            HALF, True, BLOCK_H, BLOCK_D2,
        )  # fmt: skip


def _launch(kernel, q, k, q_out, k_out, cos, sin, position_ids) -> None:
    n_tokens, n_q_heads, head_dim = q.shape
    n_k_heads = k.shape[1]
    if head_dim % 2:
        raise ValueError(f"rotary needs an even head_dim, got {head_dim}")
    if n_tokens == 0:
        return
    half = head_dim // 2
    block_d2 = triton.next_power_of_2(half)
    # about 2K elements per half-tile: whole heads of one token, q and k in separate programs
    block_h = min(triton.next_power_of_2(max(n_q_heads, n_k_heads)), max(1, 2048 // block_d2))
    n_q_blocks = triton.cdiv(n_q_heads, block_h)
    grid = (n_tokens, n_q_blocks + triton.cdiv(n_k_heads, block_h))
    kernel[grid](
        q, k, q_out, k_out, cos, sin, position_ids,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
        cos.stride(0), sin.stride(0), n_q_heads, n_k_heads, n_q_blocks,
        HALF=half, BLOCK_H=block_h, BLOCK_D2=block_d2,
        num_warps=4 if block_h * block_d2 >= 1024 else 1,
    )  # fmt: skip


def rotary_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor,
    q_out: torch.Tensor | None = None,
    k_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward rotation; writes into ``q_out``/``k_out`` (new tensors when None; may alias q/k)."""
    q, k = unit_last_stride(q), unit_last_stride(k)
    cos, sin = unit_last_stride(cos), unit_last_stride(sin)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if q_out is None else q_out
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device) if k_out is None else k_out
    _launch(_rotary_fwd_kernel, q, k, q_out, k_out, cos, sin, position_ids)
    return q_out, k_out


def rotary_bwd(
    dq: torch.Tensor, dk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward: the transposed rotation of the output gradients."""
    dq, dk = unit_last_stride(dq), unit_last_stride(dk)
    cos, sin = unit_last_stride(cos), unit_last_stride(sin)
    dq_in = torch.empty(dq.shape, dtype=dq.dtype, device=dq.device)
    dk_in = torch.empty(dk.shape, dtype=dk.dtype, device=dk.device)
    _launch(_rotary_bwd_kernel, dq, dk, dq_in, dk_in, cos, sin, position_ids)
    return dq_in, dk_in


class RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, position_ids):
        q_out, k_out = rotary_fwd(q, k, cos, sin, position_ids)
        ctx.save_for_backward(cos, sin, position_ids)
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin, position_ids = ctx.saved_tensors
        dq_in, dk_in = rotary_bwd(dq, dk, cos, sin, position_ids)
        return dq_in, dk_in, None, None, None


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q ``[T, Hq, D]`` and k ``[T, Hk, D]`` by the table rows ``cos/sin[position_ids]``; new tensors.

    The tables are ``[max_positions, D]`` as built by `rotary_cos_sin` (or transformers); the tables get no
    gradient.
    """
    if use_triton(q, k, cos, sin, position_ids):
        return RotaryFunction.apply(q, k, cos, sin, position_ids)
    return apply_rotary_ref(q, k, cos, sin, position_ids)


def apply_rotary_(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """In-place `apply_rotary` for inference (no autograd): rotates ``q`` and ``k`` where they are, returns them."""
    with torch.no_grad():
        if use_triton(q, k, cos, sin, position_ids) and q.stride(-1) == 1 and k.stride(-1) == 1:
            rotary_fwd(q, k, cos, sin, position_ids, q_out=q, k_out=k)
        else:
            q_rot, k_rot = apply_rotary_ref(q, k, cos, sin, position_ids)
            q.copy_(q_rot)
            k.copy_(k_rot)
    return q, k


def apply_rotary_ref(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch rotate-half RoPE (transformers' `apply_rotary_pos_emb`), in fp32 with one rounding at the end."""
    c = cos[position_ids].float()[:, None, :]  # (T, 1, D)
    s = sin[position_ids].float()[:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        x1, x2 = xf.chunk(2, dim=-1)
        return (xf * c + torch.cat((-x2, x1), dim=-1) * s).to(x.dtype)

    return rotate(q), rotate(k)


def _rope_inv_freq(head_dim: int, base: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] as transformers' ROPE_INIT_FUNCTIONS compute them (on CPU, fp32)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float) / head_dim))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate smoothly in between.
        factor = scaling["factor"]
        low_freq_factor = scaling["low_freq_factor"]
        high_freq_factor = scaling["high_freq_factor"]
        old_context_len = scaling["original_max_position_embeddings"]
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
        is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium_freq, smoothed, inv_freq_llama)
    raise ValueError(f"unsupported rope_scaling type {rope_type!r}: expected 'default', 'linear' or 'llama3'")


def rotary_cos_sin(
    head_dim: int,
    max_positions: int,
    base: float = 10000.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    scaling: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` tables ``[max_positions, head_dim]`` exactly as LlamaRotaryEmbedding produces them.

    ``scaling`` is a transformers ``rope_scaling`` / ``rope_parameters`` dict: ``{"rope_type": "linear", "factor":
    f}`` or ``{"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"}``; None (or ``"default"``) is plain RoPE. Neither type rescales the
    attention (transformers' ``attention_scaling`` is 1 for both).
    """
    inv_freq = _rope_inv_freq(head_dim, base, scaling).to(device)
    positions = torch.arange(max_positions, device=device, dtype=torch.int64).float()
    freqs = positions[:, None] * inv_freq[None, :]  # (P, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (P, D): first half duplicated, as transformers builds it
    return emb.cos().to(dtype), emb.sin().to(dtype)
