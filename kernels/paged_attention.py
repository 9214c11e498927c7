"""Paged decode attention in Triton: one new query token per sequence over a block-paged KV cache.

    out = paged_attention_decode(q, k_cache, v_cache, block_tables, context_lens)

q [B, Hq, D]; k_cache, v_cache [num_blocks, block_size, Hk, D]; block_tables [B, max_blocks] int32 (physical
block ids, any order; entries past a sequence's last block are never read); context_lens [B] int32 (keys
0 .. len-1, the new token's own K/V included). Optional sliding window (keys pos >= len - window). Out [B, Hq, D].

Design (vLLM's PagedAttention, with FlashDecoding's split-K):
- grid (B, Hk, num_splits): one program serves all Hq/Hk query heads of one K/V head (GQA), so each cached K/V
  row is read once per group. The group's queries are a [BLOCK_G, D] tile (padded to 16 rows for tl.dot).
- keys are walked BLOCK_N positions at a time, each position gathered through the block table (position ->
  page, slot), so block_size need not be a power of two or match BLOCK_N; online softmax in base 2.
- with num_splits > 1 each program covers one slice of the context and writes (max, sum, unnormalised acc);
  a small kernel merges the slices. Splitting keeps the GPU busy when B * Hk is small and contexts are long.
- context_lens are read on the device; the host only uses shapes (no sync).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastllava.kernels.dispatch import HAS_TRITON, triton_interpreting, use_triton
from fastllava.kernels.launch import dot_precision, require_triton, sm_count, unit_last_stride

LOG2E = 1.4426950408889634

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _paged_attn_decode_kernel(
        Q, K_CACHE, V_CACHE, BLOCK_TABLES, CONTEXT_LENS, OUT, M_PART, L_PART, ACC_PART,
        stride_qb, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
        stride_bt, stride_ob, stride_oh,
        group, head_dim, block_size, qk_scale, WINDOW, tokens_per_split,
        HAS_WINDOW: tl.constexpr, NUM_SPLITS: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0)
        hk = tl.program_id(1)
        split = tl.program_id(2)
        ctx = tl.load(CONTEXT_LENS + b).to(tl.int32)
        start = 0
        if HAS_WINDOW:
            start = tl.maximum(0, ctx - WINDOW)
        lo = tl.maximum(start, split * tokens_per_split)
        hi = tl.minimum(ctx, (split + 1) * tokens_per_split)

        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n0 = tl.arange(0, BLOCK_N)
        g_ok = offs_g < group
        d_ok = offs_d < head_dim
        heads = hk * group + offs_g
        q = tl.load(
            Q + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
            mask=g_ok[:, None] & d_ok[None, :],
            other=0.0,
        )  # (BLOCK_G, BLOCK_D)
        table = BLOCK_TABLES + b.to(tl.int64) * stride_bt

        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        for n0 in range(lo, hi, BLOCK_N):
            pos = n0 + offs_n0
            ok = pos < hi
            phys = tl.load(table + pos // block_size, mask=ok, other=0).to(tl.int64)  # physical block per key
            slot = pos % block_size
            kv_mask = ok[:, None] & d_ok[None, :]
            k = tl.load(
                K_CACHE + phys[:, None] * stride_kb + slot[:, None] * stride_ks + hk * stride_kh + offs_d[None, :],
                mask=kv_mask,
                other=0.0,
            )  # (BLOCK_N, BLOCK_D)
            v = tl.load(
                V_CACHE + phys[:, None] * stride_vb + slot[:, None] * stride_vs + hk * stride_vh + offs_d[None, :],
                mask=kv_mask,
                other=0.0,
            )
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_G, BLOCK_N), log2 units
            s = tl.where(ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new

        out_mask = g_ok[:, None] & d_ok[None, :]
        if NUM_SPLITS == 1:
            out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
            tl.store(
                OUT + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                out.to(OUT.dtype.element_ty),
                mask=out_mask,
            )
        else:
            # partials, contiguous [B, Hq, NUM_SPLITS] (+ [D] for acc)
            row = (b.to(tl.int64) * group * tl.num_programs(1) + heads) * NUM_SPLITS + split
            tl.store(M_PART + row, m_i, mask=g_ok)
            tl.store(L_PART + row, l_i, mask=g_ok)
            tl.store(ACC_PART + row[:, None] * head_dim + offs_d[None, :], acc, mask=out_mask)

    @triton.jit
    def _paged_attn_reduce_kernel(
        M_PART, L_PART, ACC_PART, OUT, stride_ob, stride_oh, num_heads, head_dim,
        NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        # merge the splits of one (sequence, head): out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s
        b = tl.program_id(0)
        h = tl.program_id(1)
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        s_ok = offs_s < NUM_SPLITS
        row = (b.to(tl.int64) * num_heads + h) * NUM_SPLITS + offs_s
        m = tl.load(M_PART + row, mask=s_ok, other=float("-inf"))
        l_s = tl.load(L_PART + row, mask=s_ok, other=0.0)
        acc = tl.load(
            ACC_PART + row[:, None] * head_dim + offs_d[None, :],
            mask=s_ok[:, None] & (offs_d[None, :] < head_dim),
            other=0.0,
        )
        m_max = tl.max(m, 0)
        m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
        w = tl.exp2(m - m_max)  # empty splits (m = -inf) weigh 0
        denom = tl.sum(w * l_s, 0)
        out = tl.sum(w[:, None] * acc, 0) / tl.where(denom == 0.0, 1.0, denom)
        tl.store(
            OUT + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d,
            out.to(OUT.dtype.element_ty),
            mask=offs_d < head_dim,
        )


# ------------------------------------------------------------------------------------------- launcher


def _default_splits(q: torch.Tensor, num_kv_heads: int, max_tokens: int, block_n: int) -> int:
    """Split the context only when B * Hk programs leave SMs idle and contexts are long (host shapes only)."""
    if not q.is_cuda:
        return 1
    programs = q.shape[0] * num_kv_heads
    sms = sm_count(q.device)
    if programs >= sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, programs), triton.cdiv(max_tokens, 8 * block_n), 32))


def paged_attention_decode_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    softmax_scale: float | None = None,
    window: int | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """The Triton kernels, unconditionally (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)."""
    require_triton("the triton paged attention kernel")
    B, Hq, D = q.shape
    _, block_size, Hk, _ = k_cache.shape
    if Hq % Hk or k_cache.shape[-1] != D or v_cache.shape != k_cache.shape:
        raise ValueError(f"q {tuple(q.shape)} does not fit caches {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache/v_cache need a contiguous last (head) dimension")
    q = unit_last_stride(q)
    block_tables = block_tables.to(torch.int32)
    block_tables = unit_last_stride(block_tables)
    context_lens = context_lens.to(torch.int32)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    group = Hq // Hk
    out = torch.empty_like(q)
    if B == 0:
        return out

    interp = triton_interpreting()
    block_n = 16 if interp else 64
    block_d = max(16, triton.next_power_of_2(D))
    max_tokens = block_tables.shape[1] * block_size
    splits = num_splits if num_splits is not None else _default_splits(q, Hk, max_tokens, block_n)
    splits = max(1, min(splits, triton.cdiv(max(max_tokens, 1), block_n)))
    tokens_per_split = triton.cdiv(triton.cdiv(max(max_tokens, 1), splits), block_n) * block_n
    if splits > 1:
        m_part = torch.empty((B, Hq, splits), device=q.device, dtype=torch.float32)
        l_part = torch.empty_like(m_part)
        acc_part = torch.empty((B, Hq, splits, D), device=q.device, dtype=torch.float32)
    else:
        m_part = l_part = acc_part = out  # unused
    _paged_attn_decode_kernel[(B, Hk, splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, m_part, l_part, acc_part,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        group, D, block_size, scale * LOG2E, int(window) if window is not None else 0, tokens_per_split,
        HAS_WINDOW=window is not None, NUM_SPLITS=splits,
        PRECISION=dot_precision(q.dtype),
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=4,
    )  # fmt: skip
    if splits > 1:
        _paged_attn_reduce_kernel[(B, Hq)](
            m_part, l_part, acc_part, out, out.stride(0), out.stride(1), Hq, D,
            NUM_SPLITS=splits, BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=block_d,
        )  # fmt: skip
    return out


# ------------------------------------------------------------------------------------------- public op


def paged_attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    softmax_scale: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Decode attention over a paged cache (shapes in the module docstring); Triton or the reference."""
    if use_triton(q, k_cache, v_cache):
        return paged_attention_decode_triton(q, k_cache, v_cache, block_tables, context_lens, softmax_scale, window)
    return paged_attention_decode_ref(q, k_cache, v_cache, block_tables, context_lens, softmax_scale, window)


# ------------------------------------------------------------------------------------------- reference


def paged_attention_decode_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    softmax_scale: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Plain torch: gather every sequence's blocks, mask positions >= len (and < len - window), one SDPA."""
    B, Hq, D = q.shape
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    tables = block_tables.long().clamp(min=0)
    k = k_cache[tables].flatten(1, 2)  # (B, max_blocks * block_size, Hk, D)
    v = v_cache[tables].flatten(1, 2)
    pos = torch.arange(k.shape[1], device=q.device)
    lens = context_lens.to(q.device).long()[:, None]
    mask = pos[None, :] < lens
    if window is not None:
        mask &= pos[None, :] >= lens - window
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2),  # (B, Hq, 1, D)
        k.transpose(1, 2),  # (B, Hk, L, D)
        v.transpose(1, 2),
        attn_mask=mask[:, None, None, :],
        scale=scale,
        enable_gqa=k.shape[2] != Hq,
    )
    return out.squeeze(2)  # (B, Hq, D)
