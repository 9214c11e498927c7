"""Varlen FlashAttention-2 in Triton over packed sequences: forward and backward, causal or not, GQA, sliding
window, separate key lengths (prefill over a cached prefix).

    out = flash_attn_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=True)

q [Tq, Hq, D], k/v [Tk, Hk, D] (Hq a multiple of Hk), cu_seqlens_* [B+1] int32 on the device, max_seqlen_* host
ints. Masks, as flash-attn: keys of other sequences never count; causal is aligned bottom-right (query i of a
sequence with Lq queries and Lk keys sees keys j <= i + Lk - Lq); a window w keeps i + Lk - Lq - j < w.

Design (Dao, "FlashAttention-2", 2023), all without a host sync:
- forward: grid (cdiv(max_seqlen_q, BLOCK_M), B, Hq). Each program reads its sequence's bounds from cu_seqlens
  and exits at once when its query block lies past the sequence end; it streams only the key blocks its mask
  can reach with the online softmax (base 2), and stores O and the logsumexp (natural log, [Hq, Tq] fp32).
- backward: delta = rowsum(dO * O) (preprocess kernel); a dk/dv kernel, grid (cdiv(max_seqlen_k, BLOCK_N), B, Hk),
  keeps one key block in registers and loops over the Hq/Hk query heads of its group and the query blocks that
  can see it, so GQA gradients are summed in registers and no atomics are needed; a dq kernel with the forward's
  grid loops over key blocks. Both recompute P from the stored logsumexp.
- head dims that are not powers of two (80, 96) are padded to BLOCK_D with masked loads and stores.

Run the kernels on CPU (tests) with TRITON_INTERPRET=1 set before triton is imported; the interpreter has no
bf16, so test fp32/fp16 there.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastllava.kernels.dispatch import HAS_TRITON, triton_interpreting, use_triton
from fastllava.kernels.launch import dot_precision, require_triton, unit_last_stride

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# Kernels exist only where triton is installed; the reference at the bottom works everywhere.
if HAS_TRITON:
    import triton
    import triton.language as tl

    def _configs(shapes: list[tuple[int, int, int, int]]) -> list[triton.Config]:
        """(BLOCK_M, BLOCK_N, num_warps, num_stages) candidates; one small config under the interpreter."""
        if triton_interpreting():
            return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]

    _FWD_CONFIGS = _configs([(128, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 2)])
    _BWD_DKDV_CONFIGS = _configs([(32, 64, 4, 2), (32, 128, 8, 2), (64, 64, 4, 2), (16, 64, 4, 2)])
    _BWD_DQ_CONFIGS = _configs([(64, 32, 4, 2), (128, 32, 8, 2), (64, 64, 4, 2), (128, 64, 8, 2)])
    _KEY = ["BLOCK_D", "CAUSAL", "HAS_WINDOW", "PRECISION"]

    @triton.jit
    def _visible(q_pos, k_pos, Lq, Lk, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, WINDOW, shift):
        """Boolean mask from broadcastable query/key local positions (bottom-right causal, window)."""
        ok = (q_pos < Lq) & (k_pos < Lk)
        if CAUSAL:
            ok = ok & (q_pos + shift >= k_pos)
        if HAS_WINDOW:
            ok = ok & (q_pos + shift - k_pos < WINDOW)
        return ok

    @triton.autotune(configs=_FWD_CONFIGS, key=_KEY)
    @triton.jit
    def _flash_attn_fwd_kernel(
        Q, K, V, O, LSE, CU_Q, CU_K,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
        stride_lse_h,
        group, head_dim, qk_scale, WINDOW,
        CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        pid_m = tl.program_id(0)
        b = tl.program_id(1)
        h = tl.program_id(2)
        q_start = tl.load(CU_Q + b)
        Lq = tl.load(CU_Q + b + 1) - q_start
        m0 = pid_m * BLOCK_M
        if m0 >= Lq:  # query block past this sequence's end (grid covers max_seqlen_q)
            return
        k_start = tl.load(CU_K + b)
        Lk = tl.load(CU_K + b + 1) - k_start
        shift = Lk - Lq  # bottom-right alignment
        hk = h // group

        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_n0 = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < head_dim
        row_q = (q_start + offs_m).to(tl.int64)
        q = tl.load(
            Q + row_q[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
            mask=(offs_m[:, None] < Lq) & d_ok[None, :],
            other=0.0,
        )  # (BLOCK_M, BLOCK_D)
        k_base = K + hk * stride_kh
        v_base = V + hk * stride_vh

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        # key blocks these queries can reach: causal stops at the last query's position, the window starts
        # WINDOW - 1 before the first query's (rounded down to a block)
        hi = Lk
        if CAUSAL:
            hi = tl.minimum(hi, m0 + BLOCK_M + shift)
        lo = 0
        if HAS_WINDOW:
            lo = (tl.maximum(0, m0 + shift - WINDOW + 1) // BLOCK_N) * BLOCK_N
        for n0 in range(lo, hi, BLOCK_N):
            offs_n = n0 + offs_n0
            row_k = (k_start + offs_n).to(tl.int64)
            kv_mask = (offs_n[:, None] < Lk) & d_ok[None, :]
            k = tl.load(k_base + row_k[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_base + row_k[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
            ok = _visible(offs_m[:, None], offs_n[None, :], Lq, Lk, CAUSAL, HAS_WINDOW, WINDOW, shift)
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new

        empty = l_i == 0.0  # only when Lq > Lk leaves a query no key: output 0, lse +inf (so P = 0 in backward)
        l_safe = tl.where(empty, 1.0, l_i)
        out = acc / l_safe[:, None]
        lse = tl.where(empty, float("inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
        row_ok = offs_m < Lq
        tl.store(
            O + row_q[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
            out.to(O.dtype.element_ty),
            mask=row_ok[:, None] & d_ok[None, :],
        )
        tl.store(LSE + h * stride_lse_h + q_start + offs_m, lse, mask=row_ok)

    @triton.jit
    def _flash_attn_bwd_preprocess_kernel(
        O, DO, DELTA, total, stride_ot, stride_oh, stride_dot, stride_doh, stride_delta_h, head_dim,
        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        # delta[h, t] = sum_d dO * O: the row term of dS = P * (dP - delta)
        h = tl.program_id(1)
        offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_d = tl.arange(0, BLOCK_D)
        rows = offs_t.to(tl.int64)
        mask = (offs_t[:, None] < total) & (offs_d[None, :] < head_dim)
        o = tl.load(O + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :], mask=mask, other=0.0)
        do = tl.load(DO + rows[:, None] * stride_dot + h * stride_doh + offs_d[None, :], mask=mask, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(DELTA + h * stride_delta_h + offs_t, delta, mask=offs_t < total)

    @triton.autotune(configs=_BWD_DKDV_CONFIGS, key=_KEY)
    @triton.jit
    def _flash_attn_bwd_dkdv_kernel(
        Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
        stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lse_h,
        group, head_dim, qk_scale, sm_scale, WINDOW,
        CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        pid_n = tl.program_id(0)
        b = tl.program_id(1)
        hk = tl.program_id(2)
        k_start = tl.load(CU_K + b)
        Lk = tl.load(CU_K + b + 1) - k_start
        n0 = pid_n * BLOCK_N
        if n0 >= Lk:
            return
        q_start = tl.load(CU_Q + b)
        Lq = tl.load(CU_Q + b + 1) - q_start
        shift = Lk - Lq

        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_m0 = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < head_dim
        row_k = (k_start + offs_n).to(tl.int64)
        kv_mask = (offs_n[:, None] < Lk) & d_ok[None, :]
        k = tl.load(K + row_k[:, None] * stride_kt + hk * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + row_k[:, None] * stride_vt + hk * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

        # queries that can see this key block: causal needs i >= j - shift, the window i < j + WINDOW - shift
        lo = 0
        if CAUSAL:
            lo = (tl.maximum(0, n0 - shift) // BLOCK_M) * BLOCK_M
        hi = Lq
        if HAS_WINDOW:
            hi = tl.minimum(Lq, n0 + BLOCK_N - 1 + WINDOW - shift)
        for g in range(group):  # the query heads sharing this K/V head (GQA): summed here, no atomics
            h = hk * group + g
            for m0 in range(lo, hi, BLOCK_M):
                offs_m = m0 + offs_m0
                row_q = (q_start + offs_m).to(tl.int64)
                q_mask = (offs_m[:, None] < Lq) & d_ok[None, :]
                q = tl.load(Q + row_q[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=q_mask, other=0.0)
                do = tl.load(
                    DO + row_q[:, None] * stride_dot + h * stride_doh + offs_d[None, :], mask=q_mask, other=0.0
                )
                lse2 = tl.load(LSE + h * stride_lse_h + q_start + offs_m, mask=offs_m < Lq, other=float("inf"))
                lse2 = lse2 * 1.4426950408889634
                delta = tl.load(DELTA + h * stride_lse_h + q_start + offs_m, mask=offs_m < Lq, other=0.0)
                s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
                ok = _visible(offs_m[None, :], offs_n[:, None], Lq, Lk, CAUSAL, HAS_WINDOW, WINDOW, shift)
                p_t = tl.where(ok, tl.exp2(s_t - lse2[None, :]), 0.0)
                dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
                dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
                ds_t = p_t * (dp_t - delta[None, :])
                dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
        out_mask = (offs_n[:, None] < Lk) & d_ok[None, :]
        tl.store(
            DK + row_k[:, None] * stride_dkt + hk * stride_dkh + offs_d[None, :],
            (dk * sm_scale).to(DK.dtype.element_ty),
            mask=out_mask,
        )
        tl.store(
            DV + row_k[:, None] * stride_dvt + hk * stride_dvh + offs_d[None, :],
            dv.to(DV.dtype.element_ty),
            mask=out_mask,
        )

    @triton.autotune(configs=_BWD_DQ_CONFIGS, key=_KEY)
    @triton.jit
    def _flash_attn_bwd_dq_kernel(
        Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
        stride_dqt, stride_dqh, stride_lse_h,
        group, head_dim, qk_scale, sm_scale, WINDOW,
        CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        pid_m = tl.program_id(0)
        b = tl.program_id(1)
        h = tl.program_id(2)
        q_start = tl.load(CU_Q + b)
        Lq = tl.load(CU_Q + b + 1) - q_start
        m0 = pid_m * BLOCK_M
        if m0 >= Lq:
            return
        k_start = tl.load(CU_K + b)
        Lk = tl.load(CU_K + b + 1) - k_start
        shift = Lk - Lq
        hk = h // group

        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_n0 = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < head_dim
        row_q = (q_start + offs_m).to(tl.int64)
        q_mask = (offs_m[:, None] < Lq) & d_ok[None, :]
        q = tl.load(Q + row_q[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=q_mask, other=0.0)
        do = tl.load(DO + row_q[:, None] * stride_dot + h * stride_doh + offs_d[None, :], mask=q_mask, other=0.0)
        lse2 = tl.load(LSE + h * stride_lse_h + q_start + offs_m, mask=offs_m < Lq, other=float("inf"))
        lse2 = lse2 * 1.4426950408889634
        delta = tl.load(DELTA + h * stride_lse_h + q_start + offs_m, mask=offs_m < Lq, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

        # key blocks these queries can reach: causal stops at the last query's position, the window starts
        # WINDOW - 1 before the first query's (rounded down to a block)
        hi = Lk
        if CAUSAL:
            hi = tl.minimum(hi, m0 + BLOCK_M + shift)
        lo = 0
        if HAS_WINDOW:
            lo = (tl.maximum(0, m0 + shift - WINDOW + 1) // BLOCK_N) * BLOCK_N
        for n0 in range(lo, hi, BLOCK_N):
            offs_n = n0 + offs_n0
            row_k = (k_start + offs_n).to(tl.int64)
            kv_mask = (offs_n[:, None] < Lk) & d_ok[None, :]
            k = tl.load(K + row_k[:, None] * stride_kt + hk * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(V + row_k[:, None] * stride_vt + hk * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
            ok = _visible(offs_m[:, None], offs_n[None, :], Lq, Lk, CAUSAL, HAS_WINDOW, WINDOW, shift)
            p = tl.where(ok, tl.exp2(s - lse2[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        tl.store(
            DQ + row_q[:, None] * stride_dqt + h * stride_dqh + offs_d[None, :],
            (dq * sm_scale).to(DQ.dtype.element_ty),
            mask=q_mask,
        )


# ------------------------------------------------------------------------------------------- launchers


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"expected q [T, Hq, D], k/v [Tk, Hk, D]; got {tuple(q.shape)}, {tuple(k.shape)}")
    if q.shape[1] % k.shape[1] or q.shape[2] != k.shape[2]:
        raise ValueError(f"Hq ({q.shape[1]}) must be a multiple of Hk ({k.shape[1]}) and head dims must match")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")


def _common(q, k, causal, window):
    D = q.shape[-1]
    return dict(
        group=q.shape[1] // k.shape[1],
        head_dim=D,
        WINDOW=int(window) if window is not None else 0,
        CAUSAL=bool(causal),
        HAS_WINDOW=window is not None,
        PRECISION=dot_precision(q.dtype),
        BLOCK_D=max(16, triton.next_power_of_2(D)),
    )


def flash_attn_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, softmax_scale, causal, window):
    """Launch the forward kernel; returns (out [Tq, Hq, D], lse [Hq, Tq] fp32, natural log)."""
    B = cu_seqlens_q.numel() - 1
    Hq = q.shape[1]
    out = torch.empty_like(q)
    lse = torch.empty((Hq, q.shape[0]), device=q.device, dtype=torch.float32)
    if q.shape[0] == 0 or B == 0:
        return out, lse

    def grid(meta):
        return (triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), B, Hq)

    _flash_attn_fwd_kernel[grid](
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        lse.stride(0),
        qk_scale=softmax_scale * LOG2E,
        **_common(q, k, causal, window),
    )  # fmt: skip
    return out, lse


def flash_attn_varlen_bwd(
    do, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window
):
    """Launch preprocess, dk/dv and dq kernels; returns (dq, dk, dv)."""
    B = cu_seqlens_q.numel() - 1
    Tq, Hq, D = q.shape
    Hk = k.shape[1]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if Tq == 0 or B == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    if k.shape[0] > 0:
        dk.zero_()  # keys no query sees (e.g. past every sequence's end) get no program: keep them at 0
        dv.zero_()
    common = _common(q, k, causal, window)
    delta = torch.empty_like(lse)
    block_t = 16 if triton_interpreting() else 64
    _flash_attn_bwd_preprocess_kernel[(triton.cdiv(Tq, block_t), Hq)](
        out, do, delta, Tq, out.stride(0), out.stride(1), do.stride(0), do.stride(1), delta.stride(0), D,
        BLOCK_T=block_t, BLOCK_D=common["BLOCK_D"],
    )  # fmt: skip
    scales = dict(qk_scale=softmax_scale * LOG2E, sm_scale=softmax_scale)

    def grid_k(meta):
        return (triton.cdiv(max_seqlen_k, meta["BLOCK_N"]), B, Hk)

    _flash_attn_bwd_dkdv_kernel[grid_k](
        q, k, v, do, lse, delta, dk, dv, cu_seqlens_q, cu_seqlens_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
        dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), lse.stride(0),
        **scales, **common,
    )  # fmt: skip

    def grid_q(meta):
        return (triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), B, Hq)

    _flash_attn_bwd_dq_kernel[grid_q](
        q, k, v, do, lse, delta, dq, cu_seqlens_q, cu_seqlens_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
        dq.stride(0), dq.stride(1), lse.stride(0),
        **scales, **common,
    )  # fmt: skip
    return dq, dk, dv


# ------------------------------------------------------------------------------------- autograd Function


class FlashAttnVarlenFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale, window):
        _check(q, k, v)
        q, k, v = unit_last_stride(q), unit_last_stride(k), unit_last_stride(v)
        cu_seqlens_q = cu_seqlens_q.to(torch.int32)  # no-op when already int32; a device op, not a sync
        cu_seqlens_k = cu_seqlens_k.to(torch.int32)
        out, lse = flash_attn_varlen_fwd(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, softmax_scale, causal, window
        )
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
        ctx.args = (max_seqlen_q, max_seqlen_k, softmax_scale, causal, window)
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
        max_seqlen_q, max_seqlen_k, softmax_scale, causal, window = ctx.args
        dq, dk, dv = flash_attn_varlen_bwd(
            unit_last_stride(do), q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
            max_seqlen_q, max_seqlen_k, softmax_scale, causal, window,
        )  # fmt: skip
        return dq, dk, dv, None, None, None, None, None, None, None


# ------------------------------------------------------------------------------------------- public op


def flash_attn_varlen_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool = True,
    softmax_scale: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """The Triton kernels, unconditionally (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)."""
    require_triton("the triton varlen attention kernel")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return FlashAttnVarlenFunction.apply(
        q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), causal, scale, window
    )


def flash_attn_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool = True,
    softmax_scale: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Varlen attention: q [Tq, Hq, D], k/v [Tk, Hk, D] -> [Tq, Hq, D]; Triton or the reference per the switch."""
    if use_triton(q, k, v):
        return flash_attn_varlen_triton(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale, window
        )
    return flash_attn_varlen_ref(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale, window
    )


# ------------------------------------------------------------------------------------------- reference


def varlen_mask(
    cu_seqlens_q: torch.Tensor,
    total_q: int,
    cu_seqlens_k: torch.Tensor,
    total_k: int,
    causal: bool,
    window: int | None = None,
) -> torch.Tensor:
    """[Tq, Tk] bool, True where query i may attend key j: same sequence, bottom-right causal, window.

    Built on the device from cu_seqlens (searchsorted), so it needs no host sync.
    """
    dev = cu_seqlens_q.device
    seq_q = torch.searchsorted(cu_seqlens_q[1:].contiguous(), torch.arange(total_q, device=dev), right=True)
    seq_k = torch.searchsorted(cu_seqlens_k[1:].contiguous(), torch.arange(total_k, device=dev), right=True)
    mask = seq_q[:, None] == seq_k[None, :]
    if causal or window is not None:
        len_q = (cu_seqlens_q[1:] - cu_seqlens_q[:-1])[seq_q]
        len_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1])[seq_q]
        # query position counted in its sequence's key positions (bottom-right alignment)
        q_pos = torch.arange(total_q, device=dev) - cu_seqlens_q[seq_q] + len_k - len_q
        k_pos = torch.arange(total_k, device=dev) - cu_seqlens_k[seq_k]
        diff = q_pos[:, None] - k_pos[None, :]
        if causal:
            mask &= diff >= 0
        if window is not None:
            mask &= diff < window
    return mask


def flash_attn_varlen_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool = True,
    softmax_scale: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Plain torch: one SDPA call with a [Tq, Tk] block-diagonal mask (O(T^2) memory; CPU-sized batches)."""
    Tq, Hq, D = q.shape
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    mask = varlen_mask(cu_seqlens_q, Tq, cu_seqlens_k, k.shape[0], causal, window)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),  # (1, Hq, Tq, D)
        k.transpose(0, 1).unsqueeze(0),  # (1, Hk, Tk, D)
        v.transpose(0, 1).unsqueeze(0),
        attn_mask=mask,
        scale=scale,
        enable_gqa=k.shape[1] != Hq,
    )
    return out.squeeze(0).transpose(0, 1)  # (Tq, Hq, D)
