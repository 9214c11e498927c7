"""Fused RMSNorm (Llama), with an optional residual add in the same pass.

    y = weight * (x_fp32 * rsqrt(mean(x_fp32 ** 2) + eps)).to(x.dtype)          # transformers' LlamaRMSNorm
    y, h = rms_norm(x, weight, eps, residual=r)   # h = x + r (promoted dtype), y = rms_norm(h)

Forward: one program per row; the row (hidden size padded to a power of two, masked) stays in registers, the
statistics are fp32, and the per-row 1/rms is kept for the backward. With a residual the sum `h` is written
once and normalised from registers, so the pre-norm residual stream is read once instead of three times.
Backward: each program walks a contiguous chunk of rows, writes dx (and dresidual) row by row and keeps its
partial dweight in fp32 registers; the partials (one row per program) are summed by torch at the end.

Run the tests on CPU with `TRITON_INTERPRET=1 pytest tests/test_kernels_rms_norm.py`.
"""

from __future__ import annotations

import torch

from fastllava.kernels.dispatch import HAS_TRITON, use_triton
from fastllava.kernels.launch import as_rows, sm_count

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rms_norm_fwd_kernel(
        x_ptr,
        r_ptr,
        w_ptr,
        y_ptr,
        h_ptr,
        rstd_ptr,
        x_stride,
        r_stride,
        y_stride,
        h_stride,
        n_cols,
        eps,
        HAS_RESIDUAL: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_N)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(r_ptr + row * r_stride + cols, mask=mask, other=0.0)
            # Round the sum to h's dtype (x's and the residual's promoted) exactly as the unfused `x + residual`
            # would, then normalise that.
            x = (x.to(tl.float32) + r.to(tl.float32)).to(h_ptr.dtype.element_ty)
            tl.store(h_ptr + row * h_stride + cols, x, mask=mask)
        xf = x.to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
        tl.store(rstd_ptr + row, rstd)
        # LlamaRMSNorm's cast order: normalise in fp32, cast to the input dtype, then multiply by the weight.
        normed = (xf * rstd).to(y_ptr.dtype.element_ty)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        y = w.to(tl.float32) * normed.to(tl.float32)
        tl.store(y_ptr + row * y_stride + cols, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rms_norm_bwd_kernel(
        dy_ptr,
        dh_ptr,
        h_ptr,
        w_ptr,
        rstd_ptr,
        dx_ptr,
        dr_ptr,
        dw_partial_ptr,
        dy_stride,
        dh_stride,
        h_stride,
        dx_stride,
        dr_stride,
        n_rows,
        n_cols,
        rows_per_program,
        HAS_DH: tl.constexpr,
        HAS_DR: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_N)
        mask = cols < n_cols
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_N], dtype=tl.float32)
        # int64 loop bounds make `row` int64, so `row * stride` cannot overflow on huge inputs
        row_start = pid.to(tl.int64) * rows_per_program
        row_end = tl.minimum(row_start + rows_per_program, n_rows)
        for row64 in range(row_start, row_end):
            h = tl.load(h_ptr + row64 * h_stride + cols, mask=mask, other=0.0)
            dy = tl.load(dy_ptr + row64 * dy_stride + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row64)
            normed = h.to(tl.float32) * rstd
            # dweight sees the normalised row as the forward multiplied it: rounded to the input dtype.
            dw += dy * normed.to(h.dtype).to(tl.float32)
            g = dy * w
            # d/dh [h * rstd(h)] applied to g:  rstd * (g - normed * mean(g * normed))
            dx = rstd * (g - normed * (tl.sum(g * normed, axis=0) / n_cols))
            if HAS_DH:
                dx += tl.load(dh_ptr + row64 * dh_stride + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(dx_ptr + row64 * dx_stride + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            if HAS_DR:
                tl.store(dr_ptr + row64 * dr_stride + cols, dx.to(dr_ptr.dtype.element_ty), mask=mask)
        tl.store(dw_partial_ptr + pid.to(tl.int64) * n_cols + cols, dw, mask=mask)


def _launch_shape(n_cols: int) -> tuple[int, int]:
    block_n = triton.next_power_of_2(n_cols)
    num_warps = min(max(block_n // 256, 1), 16)
    return block_n, num_warps


def rms_norm_fwd(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Launch the forward: returns ``(y, h, rstd)``; ``h = x + residual`` (None without a residual), ``rstd`` [M].

    ``h`` and ``y`` take the promoted dtype of ``x`` and ``residual``, as the unfused sum does: under autocast a
    bf16 sublayer output added to an fp32 residual stream keeps the stream in fp32.
    """
    n = x.shape[-1]
    x2 = as_rows(x, n)
    m = x2.shape[0]
    dtype = torch.promote_types(x.dtype, residual.dtype) if residual is not None else x.dtype
    y = torch.empty((m, n), dtype=dtype, device=x.device)
    rstd = torch.empty((m,), dtype=torch.float32, device=x.device)
    r2 = as_rows(residual, n) if residual is not None else None
    h = torch.empty((m, n), dtype=dtype, device=x.device) if residual is not None else None
    if m > 0:
        block_n, num_warps = _launch_shape(n)
        _rms_norm_fwd_kernel[(m,)](
            x2,
            r2 if r2 is not None else x2,
            weight,
            y,
            h if h is not None else y,
            rstd,
            x2.stride(0),
            r2.stride(0) if r2 is not None else 0,
            y.stride(0),
            h.stride(0) if h is not None else 0,
            n,
            eps,
            HAS_RESIDUAL=residual is not None,
            BLOCK_N=block_n,
            num_warps=num_warps,
        )
    y = y.view(x.shape)
    return y, (h.view(x.shape) if h is not None else None), rstd


def _num_programs(device: torch.device, n_rows: int) -> int:
    if device.type == "cuda":
        target = 2 * sm_count(device)
    else:  # the interpreter runs programs one after another: few programs, long loops
        target = 4
    return max(1, min(n_rows, target))


def rms_norm_bwd(
    dy: torch.Tensor,
    dh: torch.Tensor | None,
    h: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    with_residual: bool,
    x_dtype: torch.dtype | None = None,
    residual_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Launch the backward on the normalised input ``h`` (x, or x + residual): returns ``(dx, dresidual, dweight)``.

    ``dh`` is the gradient flowing into the returned residual stream ``h`` (None when there is none); ``dx`` and
    ``dresidual`` are written in their inputs' dtypes (default: ``h``'s).
    """
    n = h.shape[-1]
    h2 = as_rows(h, n)
    m = h2.shape[0]
    dy2 = as_rows(dy, n)
    dh2 = as_rows(dh, n) if dh is not None else None
    dx = torch.empty((m, n), dtype=x_dtype or h.dtype, device=h.device)
    dr = torch.empty((m, n), dtype=residual_dtype or h.dtype, device=h.device) if with_residual else None
    programs = _num_programs(h.device, m)
    dw_partial = torch.empty((programs, n), dtype=torch.float32, device=h.device)
    if m > 0:
        block_n, num_warps = _launch_shape(n)
        _rms_norm_bwd_kernel[(programs,)](
            dy2,
            dh2 if dh2 is not None else dy2,
            h2,
            weight,
            rstd,
            dx,
            dr if dr is not None else dx,
            dw_partial,
            dy2.stride(0),
            dh2.stride(0) if dh2 is not None else 0,
            h2.stride(0),
            dx.stride(0),
            dr.stride(0) if dr is not None else 0,
            m,
            n,
            triton.cdiv(m, programs),
            HAS_DH=dh2 is not None,
            HAS_DR=dr is not None,
            BLOCK_N=block_n,
            num_warps=num_warps,
        )
        dw = dw_partial.sum(0).to(weight.dtype)
    else:
        dw = torch.zeros_like(weight)
    return dx.view(h.shape), (dr.view(h.shape) if dr is not None else None), dw


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, residual):
        y, h, rstd = rms_norm_fwd(x, weight, eps, residual)
        ctx.has_residual = residual is not None
        ctx.dtypes = (x.dtype, residual.dtype if residual is not None else None)
        ctx.save_for_backward(h if h is not None else x, weight, rstd)
        return y if h is None else (y, h)

    @staticmethod
    def backward(ctx, dy, dh=None):
        h, weight, rstd = ctx.saved_tensors
        dx, dr, dw = rms_norm_bwd(dy, dh, h, weight, rstd, ctx.has_residual, *ctx.dtypes)
        return dx, dw, None, dr


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim (LlamaRMSNorm numerics); output in ``x.dtype`` (with a residual: in the dtype of
    ``x + residual``).

    With ``residual``, returns ``(rms_norm(x + residual), x + residual)`` computed in one pass (pre-norm blocks
    carry the second output forward as the residual stream).
    """
    if use_triton(x, weight, residual):
        return RMSNormFunction.apply(x, weight, eps, residual)
    return rms_norm_ref(x, weight, eps, residual)


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain torch RMSNorm, cast for cast as transformers' LlamaRMSNorm (the CPU path and the test oracle)."""
    h = x + residual if residual is not None else x
    hf = h.to(torch.float32)
    variance = hf.pow(2).mean(-1, keepdim=True)
    y = (weight * (hf * torch.rsqrt(variance + eps)).to(h.dtype)).to(h.dtype)
    return (y, h) if residual is not None else y
