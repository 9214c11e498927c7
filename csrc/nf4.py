"""Python shim of the CUDA NF4 GEMV (`nf4_gemv.cu`): builds it on first use, falls back to Triton.

    from fastllava.csrc.nf4 import nf4_gemv, cuda_gemv_available
    y = nf4_gemv(x, qweight, absmax, (N, K), blocksize=64, bias=None, nested=None)   # x [M <= 8, K] on CUDA

The extension is compiled with ``torch.utils.cpp_extension.load`` the first time a CUDA call needs it (cached
by torch under ``TORCH_EXTENSIONS_DIR``). Where it cannot be used - no CUDA, no toolchain, a failed build,
``FASTLLAVA_NF4_CUDA=0``, fp32 input, more than 8 rows, K not a multiple of 32, unaligned pointers - the call
goes to `fastllava.kernels.nf4_matmul.nf4_matmul` (Triton on GPU, the torch reference on CPU) with the same
signature and result. The CUDA kernel has no backward: callers that need grad_x use `nf4_matmul`.
"""

from __future__ import annotations

import os
import subprocess
import warnings

import torch

from fastllava.kernels import envs
from fastllava.kernels.nf4_dequantize import NestedAbsmax, codebook

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nf4_gemv.cu")
CUDA_GEMV_MAX_ROWS = 8

# Availability: the build is attempted lazily, once per process; the outcome is kept here.
CUDA_GEMV_ENABLED = envs.FASTLLAVA_NF4_CUDA
_ext = None
_build_error: str | None = None


def _load_extension():
    global _ext, _build_error
    if _ext is not None or _build_error is not None:
        return _ext
    if not CUDA_GEMV_ENABLED:
        _build_error = "disabled by FASTLLAVA_NF4_CUDA=0"
    elif not torch.cuda.is_available():
        _build_error = "no CUDA device"
    else:
        from torch.utils.cpp_extension import load

        try:
            _ext = load(
                name="fastllava_nf4_gemv",
                sources=[_SOURCE],
                extra_cuda_cflags=["-O3", "-lineinfo"],
                verbose=envs.FASTLLAVA_VERBOSE_BUILD,
            )
        except (RuntimeError, OSError, ImportError, subprocess.CalledProcessError) as err:
            _build_error = f"{type(err).__name__}: {err}"
            warnings.warn(
                f"fastllava: CUDA NF4 GEMV unavailable, using the Triton kernel ({_build_error})", stacklevel=3
            )
    return _ext


def cuda_gemv_available() -> bool:
    """Whether the CUDA GEMV extension is (or can be) built; builds it on first call when CUDA is present."""
    return _load_extension() is not None


def cuda_gemv_status() -> str:
    """``"ok"`` or why the CUDA GEMV is not used (for logs and benchmarks)."""
    return "ok" if cuda_gemv_available() else str(_build_error)


def _cuda_eligible(
    x: torch.Tensor, qweight: torch.Tensor, absmax: torch.Tensor, N: int, K: int, blocksize: int
) -> bool:
    return (
        x.is_cuda
        and x.dtype in (torch.float16, torch.bfloat16)
        and x.dim() == 2
        and 1 <= x.shape[0] <= CUDA_GEMV_MAX_ROWS
        and K % 32 == 0
        and (N * K) % blocksize == 0
        and blocksize >= 32
        and blocksize & (blocksize - 1) == 0
        and qweight.is_contiguous()
        and x.data_ptr() % 16 == 0
        and qweight.data_ptr() % 16 == 0
        and absmax.is_contiguous()
        and absmax.is_cuda
    )


def nf4_gemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    absmax: torch.Tensor,
    shape: tuple[int, int] | torch.Size,
    blocksize: int = 64,
    bias: torch.Tensor | None = None,
    nested: NestedAbsmax | None = None,
    quant_type: str = "nf4",
) -> torch.Tensor:
    """``x @ dequant(W).T (+ bias)`` for decode-sized ``x`` [..., K]; CUDA GEMV when it applies, else Triton/torch."""
    from fastllava.kernels.nf4_matmul import nf4_matmul

    N, K = shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    needs_grad = torch.is_grad_enabled() and x.requires_grad  # the CUDA kernel has no backward
    if needs_grad or not _cuda_eligible(x2, qweight, absmax, N, K, blocksize):
        return nf4_matmul(x, qweight, absmax, shape, blocksize, bias, nested, quant_type)
    ext = _load_extension()
    if ext is None:
        return nf4_matmul(x, qweight, absmax, shape, blocksize, bias, nested, quant_type)
    with torch.cuda.device(x2.device):
        out = ext.nf4_gemv(
            x2,
            qweight.view(torch.uint8),
            absmax,
            codebook(quant_type, x2.device),
            N,
            blocksize,
            bias.to(x2.dtype).contiguous() if bias is not None else None,
            nested.absmax.float().contiguous() if nested is not None else None,
            nested.code.float().contiguous() if nested is not None else None,
            nested.offset.float().reshape(1) if nested is not None else None,
            nested.blocksize if nested is not None else 256,
            torch.cuda.current_stream(x2.device).cuda_stream,
        )
    return out.reshape(*lead, N)
