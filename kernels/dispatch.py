"""One switch for every op in `kernels/`: Triton or the plain-torch reference.

Modes (env `FASTLLAVA_KERNELS`, or `set_kernels()` at run time):
  * ``auto``   (default) Triton for CUDA tensors when Triton is installed, the reference otherwise;
  * ``triton`` always Triton: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (how CI tests kernels);
  * ``torch``  always the reference (A/B tests, benchmarks, debugging).
"""

from __future__ import annotations

import importlib.util

import torch

from fastllava.kernels import envs

MODES = envs.KERNEL_MODES
# the one optional-dependency flag outside fastllava/optional.py (which re-exports it): kernels/ may not import it
HAS_TRITON = importlib.util.find_spec("triton") is not None

_mode = envs.FASTLLAVA_KERNELS  # read once at import; set_kernels() switches at run time
if _mode not in MODES:
    raise ValueError(f"FASTLLAVA_KERNELS={_mode!r}: expected one of {MODES}")


def set_kernels(mode: str) -> str:
    """Select ``"auto" | "triton" | "torch"`` for all ops; returns the previous mode."""
    global _mode
    mode = mode.lower()
    if mode not in MODES:
        raise ValueError(f"unknown kernel mode {mode!r}: expected one of {MODES}")
    previous, _mode = _mode, mode
    return previous


def get_kernels() -> str:
    return _mode


def triton_interpreting() -> bool:
    return envs.TRITON_INTERPRET


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether an op called on ``tensors`` should take its Triton path."""
    if _mode == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    if _mode == "auto":
        return HAS_TRITON and on_cuda
    # forced "triton"
    if not HAS_TRITON:
        raise RuntimeError("FASTLLAVA_KERNELS=triton but triton is not installed: pip install triton")
    if not on_cuda and not triton_interpreting():
        raise RuntimeError(
            "FASTLLAVA_KERNELS=triton with CPU tensors needs TRITON_INTERPRET=1 set before triton is imported"
        )
    return True
