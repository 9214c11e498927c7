"""Fused NF4 dequant-matmul: ``y = x @ dequant(W).T + bias`` without materialising ``dequant(W)``.

    y = nf4_matmul(x, qweight, absmax, shape=(N, K), blocksize=64, bias=None, nested=None)

``x`` [..., K] (fp16/bf16/fp32), ``qweight`` bitsandbytes-packed NF4/FP4 of the [N, K] weight (see
`nf4_dequantize`), ``y`` [..., N] in ``x.dtype``. Autograd flows to ``x`` (and ``bias``); the 4-bit weight is frozen.

Design. Row n of W occupies bytes [n*K/2, (n+1)*K/2) when K is even (the kernels require it; odd K takes the
reference), and element (n, k) is scaled by ``absmax[(n*K + k) // blocksize]`` - a block may straddle rows, so the
scale index is computed per packed byte (both nibbles of a byte share a block since the blocksize is even).
Dequantized values are rounded to ``x.dtype`` before the product, as bnb does (dequantize, then linear).
- GEMV (<= 16 rows, decode): grid (cdiv(N, BLOCK_N), SPLIT_K). Each program streams a [BLOCK_N, BLOCK_KH] tile
  of packed bytes per step, dequantizes the high and low nibbles in registers and multiplies them with the even
  and odd columns of x (a broadcast-multiply-reduce over [BLOCK_M, BLOCK_N, BLOCK_KH]; no tensor cores needed at
  these sizes). K is split across programs when N alone gives too few programs; the fp32 partial sums are
  reduced afterwards (deterministic, no atomics).
- GEMM (> 16 rows, prefill/training): grid over (M, N) tiles in grouped order (L2 reuse of W tiles); per K step
  the packed [BLOCK_N, BLOCK_K/2] tile is dequantized in registers, its nibbles interleaved with ``tl.join`` into a
  [BLOCK_N, BLOCK_K] tile and fed to ``tl.dot`` against the x tile; bias and the cast are fused in the epilogue.
- backward: grad_x = grad_y @ dequant(W), same tiling with the roles of N and K swapped: each program owns a
  [BLOCK_M, BLOCK_K] tile of grad_x and loops over N, dequantizing [BLOCK_N, BLOCK_K] tiles of W on the fly.
Double-quantized absmax is dequantized inside the kernels (nested code lookup + scale + offset).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastllava.kernels.dispatch import HAS_TRITON, triton_interpreting, use_triton
from fastllava.kernels.launch import dot_precision, sm_count
from fastllava.kernels.nf4_dequantize import NestedAbsmax, codebook, nested_args, nf4_dequantize_ref

GEMV_MAX_ROWS = 16

if HAS_TRITON:
    import triton
    import triton.language as tl

    from fastllava.kernels.nf4_dequantize import block_scale

    @triton.jit
    def _dequant_tile(
        q_ptr, absmax_ptr, code_ptr, nabs_ptr, ncode_ptr, offset_ptr, rows, jh, N, K, BLOCKSIZE, NESTED, NBS
    ):
        """Dequantize W[rows, 2*jh] and W[rows, 2*jh + 1] (fp32, [len(rows), len(jh)] each; 0 outside W)."""
        KH = K // 2
        mask = (rows[:, None] < N) & (jh[None, :] < KH)
        byte = rows[:, None].to(tl.int64) * KH + jh[None, :]
        q = tl.load(q_ptr + byte, mask=mask, other=0).to(tl.int32)
        scale = block_scale(absmax_ptr, nabs_ptr, ncode_ptr, offset_ptr, (2 * byte) // BLOCKSIZE, mask, NESTED, NBS)
        hi = tl.load(code_ptr + (q >> 4)) * scale
        lo = tl.load(code_ptr + (q & 15)) * scale
        return hi, lo

    @triton.jit
    def _nf4_gemv_kernel(
        x_ptr,
        q_ptr,
        absmax_ptr,
        code_ptr,
        nabs_ptr,
        ncode_ptr,
        offset_ptr,
        bias_ptr,
        out_ptr,
        M,
        N,
        K,
        stride_xm,
        stride_om,
        stride_os,
        KH_PER_SPLIT,
        BLOCKSIZE: tl.constexpr,
        NESTED: tl.constexpr,
        NBS: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_KH: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m = tl.arange(0, BLOCK_M)
        KH = K // 2
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        kh_start = pid_s * KH_PER_SPLIT
        kh_end = tl.minimum(kh_start + KH_PER_SPLIT, KH)
        for kh0 in range(kh_start, kh_end, BLOCK_KH):
            jh = kh0 + tl.arange(0, BLOCK_KH)
            hi, lo = _dequant_tile(
                q_ptr, absmax_ptr, code_ptr, nabs_ptr, ncode_ptr, offset_ptr, rows, jh, N, K, BLOCKSIZE, NESTED, NBS
            )
            # round the weight to x's dtype (bnb dequantizes to x.dtype before the product)
            hi = hi.to(x_ptr.dtype.element_ty).to(tl.float32)
            lo = lo.to(x_ptr.dtype.element_ty).to(tl.float32)
            xmask = (m[:, None] < M) & (jh[None, :] < kh_end)
            xp = x_ptr + m[:, None].to(tl.int64) * stride_xm + 2 * jh[None, :]
            x_even = tl.load(xp, mask=xmask, other=0.0).to(tl.float32)  # (BLOCK_M, BLOCK_KH)
            x_odd = tl.load(xp + 1, mask=xmask, other=0.0).to(tl.float32)
            prod = x_even[:, None, :] * hi[None, :, :] + x_odd[:, None, :] * lo[None, :, :]
            acc += tl.sum(prod, axis=2)  # (BLOCK_M, BLOCK_N)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)[None, :]
        omask = (m[:, None] < M) & (rows[None, :] < N)
        optr = out_ptr + pid_s.to(tl.int64) * stride_os + m[:, None] * stride_om + rows[None, :]
        tl.store(optr, acc.to(out_ptr.dtype.element_ty), mask=omask)

    @triton.jit
    def _nf4_gemm_kernel(
        x_ptr,
        q_ptr,
        absmax_ptr,
        code_ptr,
        nabs_ptr,
        ncode_ptr,
        offset_ptr,
        bias_ptr,
        out_ptr,
        M,
        N,
        K,
        stride_xm,
        stride_om,
        BLOCKSIZE: tl.constexpr,
        NESTED: tl.constexpr,
        NBS: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        # grouped ordering: consecutive programs share W tiles in L2
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        group = GROUP_M * num_n
        first_m = (pid // group) * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % group) % size_m
        pid_n = (pid % group) // size_m
        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # W's packed byte j holds columns 2j (hi nibble) and 2j+1 (lo): x's even columns meet hi, odd ones lo, as
        # two dots over K/2 (interleaving hi/lo into one [N, K] tile with tl.join + reshape fails Triton 3.6's
        # sm_90 compiler in TritonGPUOptimizeDotOperands; tests/sm90_compile.py checks this)
        for k0 in range(0, K, BLOCK_K):
            jh = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            xmask = (m[:, None] < M) & (jh[None, :] < K // 2)
            xp = x_ptr + m[:, None].to(tl.int64) * stride_xm + 2 * jh[None, :]
            x_even = tl.load(xp, mask=xmask, other=0.0)
            x_odd = tl.load(xp + 1, mask=xmask, other=0.0)
            hi, lo = _dequant_tile(
                q_ptr, absmax_ptr, code_ptr, nabs_ptr, ncode_ptr, offset_ptr, rows, jh, N, K, BLOCKSIZE, NESTED, NBS
            )
            acc = tl.dot(x_even, tl.trans(hi.to(x_even.dtype)), acc, input_precision=PRECISION)
            acc = tl.dot(x_odd, tl.trans(lo.to(x_odd.dtype)), acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)[None, :]
        omask = (m[:, None] < M) & (rows[None, :] < N)
        tl.store(
            out_ptr + m[:, None].to(tl.int64) * stride_om + rows[None, :], acc.to(out_ptr.dtype.element_ty), mask=omask
        )

    @triton.jit
    def _nf4_grad_x_kernel(
        g_ptr,
        q_ptr,
        absmax_ptr,
        code_ptr,
        nabs_ptr,
        ncode_ptr,
        offset_ptr,
        dx_ptr,
        M,
        N,
        K,
        stride_gm,
        stride_dm,
        BLOCKSIZE: tl.constexpr,
        NESTED: tl.constexpr,
        NBS: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_k = tl.program_id(1)
        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        jh = pid_k * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
        # dx's even columns come from W's hi nibbles, odd ones from lo (see _nf4_gemm_kernel: no tl.join)
        acc_even = tl.zeros((BLOCK_M, BLOCK_K // 2), dtype=tl.float32)
        acc_odd = tl.zeros((BLOCK_M, BLOCK_K // 2), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            rows = n0 + tl.arange(0, BLOCK_N)
            g = tl.load(
                g_ptr + m[:, None].to(tl.int64) * stride_gm + rows[None, :],
                mask=(m[:, None] < M) & (rows[None, :] < N),
                other=0.0,
            )
            hi, lo = _dequant_tile(
                q_ptr, absmax_ptr, code_ptr, nabs_ptr, ncode_ptr, offset_ptr, rows, jh, N, K, BLOCKSIZE, NESTED, NBS
            )
            acc_even = tl.dot(g, hi.to(g.dtype), acc_even, input_precision=PRECISION)
            acc_odd = tl.dot(g, lo.to(g.dtype), acc_odd, input_precision=PRECISION)
        dmask = (m[:, None] < M) & (jh[None, :] < K // 2)
        dp = dx_ptr + m[:, None].to(tl.int64) * stride_dm + 2 * jh[None, :]
        tl.store(dp, acc_even.to(dx_ptr.dtype.element_ty), mask=dmask)
        tl.store(dp + 1, acc_odd.to(dx_ptr.dtype.element_ty), mask=dmask)


def _launch_args(qweight, absmax, nested, quant_type):
    nabs, ncode, offset = nested_args(absmax, nested)
    q = qweight.contiguous().view(torch.uint8).reshape(-1)
    return (q, absmax.contiguous(), codebook(quant_type, qweight.device), nabs, ncode, offset)


def nf4_gemv_fwd(
    x: torch.Tensor,
    qweight: torch.Tensor,
    absmax: torch.Tensor,
    N: int,
    blocksize: int,
    bias: torch.Tensor | None,
    nested: NestedAbsmax | None,
    quant_type: str = "nf4",
    split_k: int | None = None,
) -> torch.Tensor:
    """x [M <= 16, K] -> [M, N] in x.dtype; ``split_k`` programs per output tile along K (heuristic if None)."""
    M, K = x.shape
    KH = K // 2
    BLOCK_M = max(1, triton.next_power_of_2(M))
    BLOCK_N = 32
    BLOCK_KH = max(16, min(128, 4096 // (BLOCK_M * BLOCK_N), triton.next_power_of_2(KH)))
    n_tiles = triton.cdiv(N, BLOCK_N)
    k_steps = triton.cdiv(KH, BLOCK_KH)
    if split_k is None:
        split_k = 1 if triton_interpreting() else max(1, min(k_steps, (4 * sm_count(x.device)) // n_tiles))
    steps_per_split = triton.cdiv(k_steps, split_k)
    split_k = triton.cdiv(k_steps, steps_per_split)
    if split_k == 1:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    else:
        out = torch.empty((split_k, M, N), dtype=torch.float32, device=x.device)
    fuse_bias = bias is not None and split_k == 1
    _nf4_gemv_kernel[(n_tiles, split_k)](
        x,
        *_launch_args(qweight, absmax, nested, quant_type),
        bias if fuse_bias else x,
        out,
        M,
        N,
        K,
        x.stride(0),
        N,
        M * N,
        steps_per_split * BLOCK_KH,
        BLOCKSIZE=blocksize,
        NESTED=nested is not None,
        NBS=nested.blocksize if nested is not None else 1,
        HAS_BIAS=fuse_bias,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        BLOCK_KH=BLOCK_KH,
        num_warps=4,
    )
    if split_k == 1:
        return out
    out = out.sum(0)
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype)


def nf4_gemm_fwd(
    x: torch.Tensor,
    qweight: torch.Tensor,
    absmax: torch.Tensor,
    N: int,
    blocksize: int,
    bias: torch.Tensor | None,
    nested: NestedAbsmax | None,
    quant_type: str = "nf4",
) -> torch.Tensor:
    """x [M, K] -> [M, N] in x.dtype, tensor-core tiles over dequantized W."""
    M, K = x.shape
    if triton_interpreting():
        BLOCK_M, BLOCK_N, BLOCK_K, warps, stages = 32, 32, 32, 4, 1
    elif M >= 128:
        BLOCK_M, BLOCK_N, BLOCK_K, warps, stages = 128, 128, 64, 8, 3
    else:
        BLOCK_M, BLOCK_N, BLOCK_K, warps, stages = 64, 64, 64, 4, 3
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(M, BLOCK_M) * triton.cdiv(N, BLOCK_N),)
    _nf4_gemm_kernel[grid](
        x,
        *_launch_args(qweight, absmax, nested, quant_type),
        bias if bias is not None else x,
        out,
        M,
        N,
        K,
        x.stride(0),
        N,
        BLOCKSIZE=blocksize,
        NESTED=nested is not None,
        NBS=nested.blocksize if nested is not None else 1,
        HAS_BIAS=bias is not None,
        PRECISION=dot_precision(x.dtype),
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
        GROUP_M=8,
        num_warps=warps,
        num_stages=stages,
    )
    return out


def nf4_grad_x(
    grad_out: torch.Tensor,
    qweight: torch.Tensor,
    absmax: torch.Tensor,
    K: int,
    blocksize: int,
    nested: NestedAbsmax | None,
    quant_type: str = "nf4",
) -> torch.Tensor:
    """grad_out [M, N] -> grad_out @ dequant(W) [M, K] in grad_out.dtype."""
    grad_out = grad_out.contiguous()
    M, N = grad_out.shape
    if triton_interpreting():
        BLOCK_M, BLOCK_N, BLOCK_K, warps, stages = 32, 32, 32, 4, 1
    else:
        BLOCK_M, BLOCK_N, BLOCK_K, warps, stages = (64 if M > 16 else 16), 64, 128, 4, 3
    dx = torch.empty((M, K), dtype=grad_out.dtype, device=grad_out.device)
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(K, BLOCK_K))
    _nf4_grad_x_kernel[grid](
        grad_out,
        *_launch_args(qweight, absmax, nested, quant_type),
        dx,
        M,
        N,
        K,
        grad_out.stride(0),
        K,
        BLOCKSIZE=blocksize,
        NESTED=nested is not None,
        NBS=nested.blocksize if nested is not None else 1,
        PRECISION=dot_precision(grad_out.dtype),
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
        num_warps=warps,
        num_stages=stages,
    )
    return dx


class NF4MatmulFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, qweight, absmax, bias, N, blocksize, nested, quant_type):
        x = x.contiguous()
        if x.shape[0] <= GEMV_MAX_ROWS:
            out = nf4_gemv_fwd(x, qweight, absmax, N, blocksize, bias, nested, quant_type)
        else:
            out = nf4_gemm_fwd(x, qweight, absmax, N, blocksize, bias, nested, quant_type)
        ctx.save_for_backward(qweight, absmax)
        ctx.meta = (x.shape[1], blocksize, nested, quant_type, bias is not None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        qweight, absmax = ctx.saved_tensors
        K, blocksize, nested, quant_type, has_bias = ctx.meta
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = nf4_grad_x(grad_out, qweight, absmax, K, blocksize, nested, quant_type)
        if has_bias and ctx.needs_input_grad[3]:
            grad_bias = grad_out.sum(0)
        return grad_x, None, None, grad_bias, None, None, None, None


def nf4_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    absmax: torch.Tensor,
    shape: tuple[int, int] | torch.Size,
    blocksize: int = 64,
    bias: torch.Tensor | None = None,
    nested: NestedAbsmax | None = None,
    quant_type: str = "nf4",
) -> torch.Tensor:
    """``x @ dequant(W).T (+ bias)`` for the bnb-packed 4-bit weight ``W`` of ``shape`` (N, K); fused on GPU."""
    N, K = shape
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features, the 4-bit weight {tuple(shape)} expects {K}")
    if K % 2 or not use_triton(x, qweight):
        return nf4_matmul_ref(x, qweight, absmax, shape, blocksize, bias, nested, quant_type)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if x2.shape[0] == 0:
        return x.new_empty((*lead, N))
    out = NF4MatmulFunction.apply(x2, qweight, absmax, bias, N, blocksize, nested, quant_type)
    return out.reshape(*lead, N)


def nf4_matmul_ref(
    x: torch.Tensor,
    qweight: torch.Tensor,
    absmax: torch.Tensor,
    shape: tuple[int, int] | torch.Size,
    blocksize: int = 64,
    bias: torch.Tensor | None = None,
    nested: NestedAbsmax | None = None,
    quant_type: str = "nf4",
) -> torch.Tensor:
    """Reference: dequantize W to ``x.dtype`` (bnb's rounding) and ``F.linear``; the CPU path and the oracle."""
    w = nf4_dequantize_ref(qweight, absmax, tuple(shape), blocksize, x.dtype, nested, quant_type)
    return F.linear(x, w, bias.to(x.dtype) if bias is not None else None)
