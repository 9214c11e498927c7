"""Helpers shared by the kernel tests: where they run, when they skip, and the accuracy check."""

from __future__ import annotations

import pytest
import torch

from fastllava.kernels.dispatch import HAS_TRITON, triton_interpreting

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

requires_triton = pytest.mark.skipif(
    not HAS_TRITON or not (CUDA or triton_interpreting()),
    reason="needs triton and a GPU, or TRITON_INTERPRET=1 set before triton was imported",
)


def assert_matches(out, ref, exact, name, tol):
    """``out`` (Triton) agrees with ``ref`` (torch, same dtype) within ``tol[dtype]`` and is no worse than
    2x ``ref``'s error against the float64 ``exact`` (how bf16 is judged: it has no entry in ``tol``)."""
    assert out.dtype == ref.dtype and out.shape == ref.shape, name
    assert torch.isfinite(out).all(), f"{name}: non-finite (unwritten?) elements"
    if out.dtype in tol:
        torch.testing.assert_close(out, ref, **tol[out.dtype], msg=lambda m: f"{name}: {m}")
    if out.numel() == 0:
        return
    exact = exact.double()
    err = (out.double() - exact).abs().max()
    ref_err = (ref.double() - exact).abs().max()
    floor = torch.finfo(out.dtype).eps * exact.abs().max().clamp_min(1.0)
    assert err <= 2 * ref_err + floor, f"{name}: error vs float64 {err:.3g} > 2 x torch's {ref_err:.3g}"
