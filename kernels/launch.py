"""Launch helpers shared by the kernels' launchers: operand layout, dot precision, device size, triton present.

    from fastllava.kernels.launch import as_rows, dot_precision, require_triton, sm_count, unit_last_stride

Every launcher in ``kernels/`` needs the same few checks before it calls a kernel; they live here once. Torch and
the standard library only (the layering rules: ``kernels/`` never imports ``fastllava`` proper), and no triton
import, so this module loads where triton is missing and the launchers fail with ``require_triton``'s message.
"""

from __future__ import annotations

import torch

from fastllava.kernels.dispatch import HAS_TRITON


def require_triton(what: str) -> None:
    """Raise the install hint when a launcher runs without triton (the public ops fall back before this)."""
    if not HAS_TRITON:
        raise RuntimeError(f"{what} needs triton: pip install triton")


def unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dimension is contiguous (what the kernels index with a unit stride), else a copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def as_rows(t: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """``t`` viewed as ``[M, n]`` rows (``n``: its last dimension by default) with a unit column stride."""
    return unit_last_stride(t.reshape(-1, t.shape[-1] if n is None else n))


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s ``input_precision``: fp32 inputs get exact fp32 dots ("ieee"; tf32 would lose ~3 digits
    against the fp32 reference), 16-bit inputs run on tensor cores ("tf32" is ignored for them)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (1 elsewhere: the interpreter runs programs one at a time)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1
