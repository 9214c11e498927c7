"""Fused projector MLP (kernels/projector_mlp.py): Triton vs the torch reference vs float64, forward and every
gradient, for both forward strategies (single fused kernel, two-stage).

Without a GPU the kernels run in the Triton interpreter, which `triton.jit` selects when a kernel is *defined*:
CI runs `TRITON_INTERPRET=1 pytest tests`. Run alone, this module sets it before importing fastllava; if an
earlier test module already imported fastllava (building GPU kernels), the op module is reloaded under it.
"""

import importlib
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
import torch.nn.functional as F  # noqa: E402

from fastllava.kernels import projector_mlp, projector_mlp_ref, set_kernels  # noqa: E402
from fastllava.kernels.dispatch import HAS_TRITON, triton_interpreting  # noqa: E402

op_module = importlib.import_module("fastllava.kernels.projector_mlp")
if HAS_TRITON and not CUDA and triton_interpreting():
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(op_module._projector_mlp_fwd_kernel, InterpretedFunction):
        importlib.reload(op_module)  # the public op looks its kernels up in the reloaded module globals

pytestmark = pytest.mark.skipif(
    not HAS_TRITON or not (CUDA or triton_interpreting()),
    reason="needs triton and a GPU, or TRITON_INTERPRET=1 set before triton was imported",
)
DEVICE = "cuda" if CUDA else "cpu"

# Triton vs the reference in the same dtype (bf16 is checked against float64 only; see `assert_matches`).
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=1e-2, rtol=1e-2)}

# (leading shape of x, K = vision width, H = hidden, N = LM width); the interpreter tiles are 16 (M, H, K), 32 (N)
CASES = [
    ((9,), 20, 40, 24),  # nothing a multiple of the tiles
    ((2, 3), 33, 48, 40),  # leading dims; N spans two fused tiles (h recomputed per tile)
    ((1,), 16, 16, 16),  # one row
    ((37,), 24, 36, 20),  # three row tiles
]


@pytest.fixture
def triton_kernels(monkeypatch):
    """Force the Triton path, and fill every `torch.empty` output with NaN so an unwritten element fails."""
    previous = set_kernels("triton")
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))
    yield
    set_kernels(previous)


def assert_matches(out, ref, exact, name):
    """``out`` (Triton) agrees with ``ref`` (torch, same dtype) and is no worse than 2x ``ref``'s error vs float64."""
    assert out.dtype == ref.dtype and out.shape == ref.shape, name
    assert torch.isfinite(out).all(), f"{name}: non-finite (unwritten?) elements"
    if out.dtype in TOL:
        torch.testing.assert_close(out, ref, **TOL[out.dtype], msg=lambda m: f"{name}: {m}")
    exact = exact.double()
    err = (out.double() - exact).abs().max()
    ref_err = (ref.double() - exact).abs().max()
    floor = torch.finfo(out.dtype).eps * exact.abs().max().clamp_min(1.0)
    assert err <= 2 * ref_err + floor, f"{name}: error vs float64 {err:.3g} > 2 x torch's {ref_err:.3g}"


def mlp_f64(x, w1, b1, w2, b2):
    """Independent oracle: the same math in float64 with the textbook erf GELU written out."""
    pre = x.double() @ w1.double().t() + (b1.double() if b1 is not None else 0.0)
    h = 0.5 * pre * (1.0 + torch.erf(pre / 2.0**0.5))
    return h @ w2.double().t() + (b2.double() if b2 is not None else 0.0)


def make_case(lead, k, h, n, dtype, bias=True, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(*lead, k, device=DEVICE, dtype=dtype)
    w1 = (torch.randn(h, k, device=DEVICE) / k**0.5).to(dtype)
    w2 = (torch.randn(n, h, device=DEVICE) / h**0.5).to(dtype)
    b1 = (0.1 * torch.randn(h, device=DEVICE)).to(dtype) if bias else None
    b2 = (0.1 * torch.randn(n, device=DEVICE)).to(dtype) if bias else None
    return x, w1, b1, w2, b2


def run_case(case, dtype, fused, bias=True, x_requires_grad=True):
    tensors = make_case(*case, dtype, bias)
    dout = torch.randn(*case[0], case[3], device=DEVICE, dtype=dtype)
    names = ["x", "w1", "b1", "w2", "b2"]
    results = {}
    fns = (
        ("triton", lambda *a: projector_mlp(*a, fused=fused)),
        ("torch", projector_mlp_ref),
        ("f64", mlp_f64),
    )
    for name, fn in fns:
        cast = torch.float64 if name == "f64" else dtype
        leaves = [
            t.detach().to(cast).requires_grad_(x_requires_grad or i > 0) if t is not None else None
            for i, t in enumerate(tensors)
        ]
        out = fn(*leaves)
        out.backward(dout.to(cast))
        results[name] = [out] + [t.grad if t is not None else None for t in leaves]
    assert_matches(results["triton"][0], results["torch"][0], results["f64"][0], "out")
    for i, name in enumerate(names, start=1):
        tri = results["triton"][i]
        if results["torch"][i] is None:
            assert tri is None, f"d{name} should be None"
            continue
        assert_matches(tri, results["torch"][i], results["f64"][i], f"d{name}")


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "two-stage"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{'x'.join(map(str, c[0]))}-K{c[1]}-H{c[2]}-N{c[3]}")
def test_projector_mlp(triton_kernels, case, dtype, fused):
    run_case(case, dtype, fused)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "two-stage"])
def test_projector_mlp_without_biases(triton_kernels, fused):
    run_case(CASES[1], torch.float32, fused, bias=False)


def test_projector_mlp_frozen_input(triton_kernels):
    """LLaVA stage 1: the vision features need no grad; the weight grads are still right."""
    run_case(CASES[0], torch.float32, None, x_requires_grad=False)


def test_projector_mlp_matches_llava_module(triton_kernels):
    """Same numbers as LLaVA's `mlp2x_gelu` nn.Sequential(Linear, GELU(), Linear) built from the same weights."""
    torch.manual_seed(7)
    module = torch.nn.Sequential(torch.nn.Linear(20, 40), torch.nn.GELU(), torch.nn.Linear(40, 24)).to(DEVICE)
    x = torch.randn(2, 9, 20, device=DEVICE)
    expected = module(x)
    args = (module[0].weight, module[0].bias, module[2].weight, module[2].bias)
    torch.testing.assert_close(projector_mlp_ref(x, *args), expected, atol=0, rtol=0)
    torch.testing.assert_close(projector_mlp(x, *args), expected, **TOL[torch.float32])
    assert F.gelu(torch.tensor(1.0)) != F.gelu(torch.tensor(1.0), approximate="tanh")  # the erf GELU, not tanh


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("fused", [None, True, False], ids=["auto", "fused", "two-stage"])
@pytest.mark.parametrize(
    "case",
    CASES + [((576,), 1024, 256, 256), ((2, 576), 1024, 4096, 4096)],
    ids=lambda c: f"{'x'.join(map(str, c[0]))}-K{c[1]}-H{c[2]}-N{c[3]}",
)
def test_projector_mlp_bf16_gpu(triton_kernels, case, fused):
    run_case(case, torch.bfloat16, fused)
