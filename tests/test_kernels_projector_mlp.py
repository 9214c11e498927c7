"""Fused projector MLP (kernels/projector_mlp.py): Triton vs the torch reference vs float64, forward and every
gradient, for both forward strategies (single fused kernel, two-stage).

Without a GPU the kernels run in the Triton interpreter: tests/conftest.py sets TRITON_INTERPRET=1 before
anything imports triton. Shared helpers (skip mark, accuracy check) are in tests/kernel_testing.py.
"""

import pytest
import torch
import torch.nn.functional as F
from kernel_testing import CUDA, DEVICE, assert_matches, requires_triton

from fastllava.kernels import projector_mlp, projector_mlp_ref

pytestmark = requires_triton

# Triton vs the reference in the same dtype (bf16 is checked against float64 only; see `assert_matches`).
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=1e-2, rtol=1e-2)}

# (leading shape of x, K = vision width, H = hidden, N = LM width); the interpreter tiles are 16 (M, H, K), 32 (N)
CASES = [
    ((9,), 20, 40, 24),  # nothing a multiple of the tiles
    ((2, 3), 33, 48, 40),  # leading dims; N spans two fused tiles (h recomputed per tile)
    ((1,), 16, 16, 16),  # one row
    ((37,), 24, 36, 20),  # three row tiles
]


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
    assert_matches(results["triton"][0], results["torch"][0], results["f64"][0], "out", TOL)
    for i, name in enumerate(names, start=1):
        tri = results["triton"][i]
        if results["torch"][i] is None:
            assert tri is None, f"d{name} should be None"
            continue
        assert_matches(tri, results["torch"][i], results["f64"][i], f"d{name}", TOL)


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
