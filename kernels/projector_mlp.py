"""Fused LLaVA `mlp2x_gelu` projector: ``Linear(w1, b1) -> exact (erf) GELU -> Linear(w2, b2)``.

    out = projector_mlp(x, w1, b1, w2, b2)   # x [..., K], w1 [H, K], w2 [N, H] (nn.Linear layout), b1/b2 optional

Forward, fully fused (`_projector_mlp_fwd_kernel`): a program owns an output tile [BLOCK_M, BLOCK_N]; for each
BLOCK_H slice of the hidden layer it computes ``h = gelu(x @ w1[hs].T + b1[hs])`` in registers (rounded to the
input dtype, as the unfused modules round it) and immediately accumulates ``h @ w2[:, hs].T`` into the output
tile. The intermediate [M, H] activation never touches global memory.

The price is that every output-column tile recomputes its own h, i.e. the first GEMM runs cdiv(N, BLOCK_N)
times. That is free when one tile spans N (N <= 256 in bf16: small language models, the embedded default); for
LLaVA-1.5 (K=1024, H=N=4096) it would multiply the first GEMM by 16 (~4x the FLOPs of the whole MLP), while the
h round trip it saves is ~10% of the unfused time. So for wide outputs the forward (``fused=None`` -> auto) runs
two stages instead: `_projector_mlp_bwd_kernel` without gradients, i.e. the first GEMM with bias + GELU fused
into its epilogue (h written once, in the input dtype), then one cuBLAS ``addmm`` with b2 fused. Either way
GELU is never a separate pass over memory.

Backward (`_projector_mlp_bwd_kernel`, grid over [M, H] tiles): recomputes ``pre = x @ w1.T + b1`` and computes
``dh = dout @ w2`` for the same tile in one program, then in the epilogue writes ``h = gelu(pre)`` and
``dpre = dh * gelu'(pre)``. The three remaining products (dx = dpre @ w1, dw1 = dpre.T @ x, dw2 = dout.T @ h) are
plain GEMMs left to cuBLAS; b1/b2 grads are column sums.

Run the tests on CPU with `TRITON_INTERPRET=1 pytest tests/test_kernels_projector_mlp.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastllava.kernels.dispatch import HAS_TRITON, triton_interpreting, use_triton
from fastllava.kernels.launch import as_rows, dot_precision

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _gelu_erf(x):
        return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))

    @triton.jit
    def _hidden_tile(
        x_ptr, w1_ptr, b1_ptr, rows, hid, row_mask, hid_mask, n_in,
        x_stride, w1_stride_h, w1_stride_k,
        HAS_B1: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):  # fmt: skip
        """``x[rows] @ w1[hid].T + b1[hid]`` as an fp32 [BLOCK_M, BLOCK_H] tile (zero outside the masks)."""
        pre = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
        for k0 in range(0, n_in, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < n_in
            x_mask = row_mask[:, None] & kmask[None, :]
            x = tl.load(x_ptr + rows[:, None] * x_stride + ks[None, :], mask=x_mask, other=0.0)
            w1t = tl.load(
                w1_ptr + hid[None, :] * w1_stride_h + ks[:, None] * w1_stride_k,
                mask=kmask[:, None] & hid_mask[None, :],
                other=0.0,
            )  # (BLOCK_K, BLOCK_H)
            pre = tl.dot(x, w1t, pre, input_precision=DOT_PRECISION)
        if HAS_B1:
            pre += tl.load(b1_ptr + hid, mask=hid_mask, other=0.0).to(tl.float32)[None, :]
        return pre

    @triton.jit
    def _projector_mlp_fwd_kernel(
        x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr,
        n_rows, n_in, n_hidden, n_out,
        x_stride, w1_stride_h, w1_stride_k, w2_stride_n, w2_stride_h, out_stride,
        HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < n_rows
        col_mask = cols < n_out
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for h0 in range(0, n_hidden, BLOCK_H):
            hid = h0 + tl.arange(0, BLOCK_H)
            hid_mask = hid < n_hidden
            pre = _hidden_tile(
                x_ptr, w1_ptr, b1_ptr, rows, hid, row_mask, hid_mask, n_in,
                x_stride, w1_stride_h, w1_stride_k, HAS_B1, BLOCK_M, BLOCK_H, BLOCK_K, DOT_PRECISION,
            )  # fmt: skip
            # h stays in registers; rounded to the input dtype like the unfused Linear -> GELU -> Linear.
            # Padded hidden columns give gelu(0) = 0 and meet zero-masked w2 rows: they add nothing.
            h = _gelu_erf(pre).to(x_ptr.dtype.element_ty)
            w2t = tl.load(
                w2_ptr + cols[None, :] * w2_stride_n + hid[:, None] * w2_stride_h,
                mask=hid_mask[:, None] & col_mask[None, :],
                other=0.0,
            )  # (BLOCK_H, BLOCK_N)
            acc = tl.dot(h, w2t, acc, input_precision=DOT_PRECISION)
        if HAS_B2:
            acc += tl.load(b2_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + rows[:, None] * out_stride + cols[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])

    @triton.jit
    def _projector_mlp_bwd_kernel(
        x_ptr, w1_ptr, b1_ptr, w2_ptr, dout_ptr, h_ptr, dpre_ptr,
        n_rows, n_in, n_hidden, n_out,
        x_stride, w1_stride_h, w1_stride_k, w2_stride_n, w2_stride_h, dout_stride, h_stride, dpre_stride,
        HAS_B1: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):  # fmt: skip
        """Tile [BLOCK_M, BLOCK_H] of h = gelu(x @ w1.T + b1) and, with COMPUTE_GRAD, dpre = (dout @ w2) * gelu'."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        hid = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        row_mask = rows < n_rows
        hid_mask = hid < n_hidden
        mask = row_mask[:, None] & hid_mask[None, :]
        pre = _hidden_tile(
            x_ptr, w1_ptr, b1_ptr, rows, hid, row_mask, hid_mask, n_in,
            x_stride, w1_stride_h, w1_stride_k, HAS_B1, BLOCK_M, BLOCK_H, BLOCK_K, DOT_PRECISION,
        )  # fmt: skip
        h = _gelu_erf(pre)
        tl.store(h_ptr + rows[:, None] * h_stride + hid[None, :], h.to(h_ptr.dtype.element_ty), mask=mask)
        if COMPUTE_GRAD:
            dh = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
            for n0 in range(0, n_out, BLOCK_N):
                ns = n0 + tl.arange(0, BLOCK_N)
                nmask = ns < n_out
                dout = tl.load(
                    dout_ptr + rows[:, None] * dout_stride + ns[None, :],
                    mask=row_mask[:, None] & nmask[None, :],
                    other=0.0,
                )
                w2 = tl.load(
                    w2_ptr + ns[:, None] * w2_stride_n + hid[None, :] * w2_stride_h,
                    mask=nmask[:, None] & hid_mask[None, :],
                    other=0.0,
                )  # (BLOCK_N, BLOCK_H)
                dh = tl.dot(dout, w2, dh, input_precision=DOT_PRECISION)
            # d gelu(x) / dx = Phi(x) + x * phi(x)
            cdf = 0.5 * (1.0 + tl.math.erf(pre * 0.7071067811865476))
            pdf = tl.exp(-0.5 * pre * pre) * 0.3989422804014327
            dpre = dh * (cdf + pre * pdf)
            dpre_out = dpre_ptr + rows[:, None] * dpre_stride + hid[None, :]
            tl.store(dpre_out, dpre.to(dpre_ptr.dtype.element_ty), mask=mask)


FUSED_MAX_N = 256  # widest output one fused bf16/fp16 tile covers on a GPU; wider outputs take the two-stage path


def _blocks(n_out: int, dtype: torch.dtype) -> dict:
    """Tile sizes: tensor-core friendly on a GPU, minimal (16, tl.dot's floor) under the CPU interpreter."""
    block_n = max(triton.next_power_of_2(n_out), 16)
    if triton_interpreting():
        return dict(BLOCK_M=16, BLOCK_N=min(block_n, 32), BLOCK_H=16, BLOCK_K=16)
    if dtype == torch.float32:  # 4-byte tiles: halve them to stay inside shared memory
        return dict(BLOCK_M=32, BLOCK_N=min(block_n, FUSED_MAX_N // 2), BLOCK_H=32, BLOCK_K=32)
    return dict(BLOCK_M=64, BLOCK_N=min(block_n, FUSED_MAX_N), BLOCK_H=64, BLOCK_K=64)


def _check(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> None:
    if not (x.dtype == w1.dtype == w2.dtype):
        raise ValueError(f"projector_mlp: x, w1, w2 must share a dtype, got {x.dtype}, {w1.dtype}, {w2.dtype}")
    if w1.shape[1] != x.shape[-1] or w2.shape[1] != w1.shape[0]:
        raise ValueError(f"projector_mlp: shapes x {tuple(x.shape)}, w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)}")


def _hidden(x2, w1, b1, w2=None, dout=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch `_projector_mlp_bwd_kernel`: h [M, H] and, given dout (and w2), dpre [M, H]."""
    m, k = x2.shape
    n_hidden = w1.shape[0]
    h = torch.empty((m, n_hidden), dtype=x2.dtype, device=x2.device)
    dpre = torch.empty((m, n_hidden), dtype=x2.dtype, device=x2.device) if dout is not None else None
    blocks = _blocks(dout.shape[1] if dout is not None else 16, x2.dtype)
    blocks["BLOCK_N"] = blocks["BLOCK_K"]  # the dout @ w2 reduction runs over N: a K-like block
    if m > 0 and n_hidden > 0:
        grid = (triton.cdiv(m, blocks["BLOCK_M"]), triton.cdiv(n_hidden, blocks["BLOCK_H"]))
        w2_ = w2 if w2 is not None else w1
        dout_ = dout if dout is not None else x2
        dpre_ = dpre if dpre is not None else h
        _projector_mlp_bwd_kernel[grid](
            x2, w1, b1 if b1 is not None else w1, w2_, dout_, h, dpre_,
            m, k, n_hidden, dout.shape[1] if dout is not None else 0,
            x2.stride(0), w1.stride(0), w1.stride(1), w2_.stride(0), w2_.stride(1),
            dout_.stride(0), h.stride(0), dpre_.stride(0),
            HAS_B1=b1 is not None, COMPUTE_GRAD=dout is not None,
            DOT_PRECISION=dot_precision(x2.dtype), num_warps=4, **blocks,
        )  # fmt: skip
    return h, dpre


def projector_mlp_fwd(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    fused: bool | None = None,
) -> torch.Tensor:
    """Launch the forward. ``fused``: True = single fused kernel, False = two stages, None = by output width."""
    _check(x, w1, w2)
    x2 = as_rows(x)
    m, k = x2.shape
    n_hidden, n_out = w1.shape[0], w2.shape[0]
    blocks = _blocks(n_out, x.dtype)
    if fused is None:  # fuse only when one tile spans the output: no recomputation of h
        fused = n_out <= blocks["BLOCK_N"]
    if not fused:
        h, _ = _hidden(x2, w1, b1)
        out = torch.addmm(b2, h, w2.t()) if b2 is not None else h @ w2.t()
        return out.view(*x.shape[:-1], n_out)
    out = torch.empty((m, n_out), dtype=x.dtype, device=x.device)
    if m > 0 and n_out > 0:
        grid = (triton.cdiv(m, blocks["BLOCK_M"]), triton.cdiv(n_out, blocks["BLOCK_N"]))
        _projector_mlp_fwd_kernel[grid](
            x2, w1, b1 if b1 is not None else w1, w2, b2 if b2 is not None else w2, out,
            m, k, n_hidden, n_out,
            x2.stride(0), w1.stride(0), w1.stride(1), w2.stride(0), w2.stride(1), out.stride(0),
            HAS_B1=b1 is not None, HAS_B2=b2 is not None,
            DOT_PRECISION=dot_precision(x.dtype), num_warps=8 if blocks["BLOCK_N"] >= 128 else 4, **blocks,
        )  # fmt: skip
    return out.view(*x.shape[:-1], n_out)


def projector_mlp_bwd(
    dout: torch.Tensor,
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2_dtype: torch.dtype | None,
    needs_grad: tuple[bool, bool, bool, bool, bool] = (True,) * 5,
) -> tuple[torch.Tensor | None, ...]:
    """Launch the backward: returns ``(dx, dw1, db1, dw2, db2)``; None where there is no bias or no grad needed.

    ``b2_dtype`` is b2's dtype (None without b2); ``needs_grad`` flags (x, w1, b1, w2, b2) as autograd passes
    them, so a frozen vision tower (LLaVA stage 1) skips the dx GEMM.
    """
    x2 = as_rows(x)
    dout2 = as_rows(dout)
    h, dpre = _hidden(x2, w1, b1, w2, dout2)  # recomputed h and dpre = (dout @ w2) * gelu'(pre), [M, H]
    need_x, need_w1, need_b1, need_w2, need_b2 = needs_grad
    dx = (dpre @ w1).view(x.shape) if need_x else None
    dw1 = dpre.t() @ x2 if need_w1 else None
    db1 = dpre.sum(0, dtype=torch.float32).to(b1.dtype) if b1 is not None and need_b1 else None
    dw2 = dout2.t() @ h if need_w2 else None
    db2 = dout2.sum(0, dtype=torch.float32).to(b2_dtype) if b2_dtype is not None and need_b2 else None
    return dx, dw1, db1, dw2, db2


class ProjectorMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, fused):
        ctx.b2_dtype = b2.dtype if b2 is not None else None
        ctx.save_for_backward(x, w1, b1, w2)
        return projector_mlp_fwd(x, w1, b1, w2, b2, fused)

    @staticmethod
    def backward(ctx, dout):
        x, w1, b1, w2 = ctx.saved_tensors
        dx, dw1, db1, dw2, db2 = projector_mlp_bwd(dout, x, w1, b1, w2, ctx.b2_dtype, ctx.needs_input_grad[:5])
        return dx, dw1, db1, dw2, db2, None


def projector_mlp(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    *,
    fused: bool | None = None,
) -> torch.Tensor:
    """LLaVA's ``mlp2x_gelu`` projector on ``x`` [..., K]: ``gelu(x @ w1.T + b1) @ w2.T + b2`` (exact erf GELU).

    ``fused`` picks the Triton forward (see the module docstring): None chooses by output width; True/False
    force the single fused kernel / the two-stage one (tests and benchmarks).
    """
    if use_triton(x, w1, b1, w2, b2):
        return ProjectorMLPFunction.apply(x, w1, b1, w2, b2, fused)
    return projector_mlp_ref(x, w1, b1, w2, b2)


def projector_mlp_ref(
    x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor, b2: torch.Tensor | None
) -> torch.Tensor:
    """Plain torch ``Linear -> GELU(erf) -> Linear`` (LLaVA's nn.Sequential): the CPU path and the test oracle."""
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)
