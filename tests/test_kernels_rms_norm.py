"""Fused RMSNorm (kernels/rms_norm.py): Triton vs the torch reference vs float64, forward and every gradient.

Without a GPU the kernels run in the Triton interpreter: tests/conftest.py sets TRITON_INTERPRET=1 before
anything imports triton. Shared helpers (skip mark, accuracy check) are in tests/kernel_testing.py.
"""

import pytest
import torch
from kernel_testing import CUDA, DEVICE, assert_matches, requires_triton

from fastllava.kernels import rms_norm, rms_norm_ref, set_kernels

pytestmark = requires_triton

# Triton vs the reference in the same dtype (bf16 is checked against float64 only; see `assert_matches`).
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=2e-2, rtol=1e-2)}
SHAPES = [(9, 341), (3, 4095), (1, 64), (2, 3, 48)]


def rms_norm_f64(x, weight, eps, residual):
    """Independent oracle: the textbook formula in float64 (no intermediate casts)."""
    h = x.double() + residual.double() if residual is not None else x.double()
    y = weight.double() * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (y, h) if residual is not None else y


def run_case(shape, dtype, with_residual, eps=1e-6):
    torch.manual_seed(0)
    n = shape[-1]
    x = torch.randn(shape, device=DEVICE, dtype=dtype)
    weight = (1 + 0.1 * torch.randn(n, device=DEVICE)).to(dtype)
    residual = torch.randn(shape, device=DEVICE, dtype=dtype) if with_residual else None
    dy = torch.randn(shape, device=DEVICE, dtype=dtype)
    dh = torch.randn(shape, device=DEVICE, dtype=dtype) if with_residual else None

    results = {}
    for name, fn in (("triton", rms_norm), ("torch", rms_norm_ref), ("f64", rms_norm_f64)):
        cast = torch.float64 if name == "f64" else dtype
        leaves = [t.detach().to(cast).requires_grad_() for t in (x, weight)]
        res = residual.detach().to(cast).requires_grad_() if with_residual else None
        out = fn(leaves[0], leaves[1], eps, res)
        outs = out if with_residual else (out,)
        grads_out = (dy, dh) if with_residual else (dy,)
        torch.autograd.backward(outs, [g.to(cast) for g in grads_out])
        grads = [leaves[0].grad, leaves[1].grad] + ([res.grad] if with_residual else [])
        results[name] = (list(outs), grads)

    names = ["y", "h"][: len(results["triton"][0])]
    for i, name in enumerate(names):
        assert_matches(results["triton"][0][i], results["torch"][0][i], results["f64"][0][i], name, TOL)
    for i, name in enumerate(["dx", "dweight", "dresidual"][: len(results["triton"][1])]):
        assert_matches(results["triton"][1][i], results["torch"][1][i], results["f64"][1][i], name, TOL)


@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_rms_norm(triton_kernels, shape, dtype, with_residual):
    run_case(shape, dtype, with_residual)


def test_rms_norm_matches_transformers(triton_kernels):
    """Bit-level agreement in fp32 with LlamaRMSNorm, the module the reference claims to match."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(1)
    module = LlamaRMSNorm(341, eps=1e-5).to(DEVICE)
    with torch.no_grad():
        module.weight.normal_()
    x = torch.randn(9, 341, device=DEVICE)
    expected = module(x)
    torch.testing.assert_close(rms_norm_ref(x, module.weight, 1e-5), expected, atol=0, rtol=0)
    torch.testing.assert_close(rms_norm(x, module.weight, 1e-5), expected, atol=1e-6, rtol=1e-6)


def test_rms_norm_mixed_weight_dtype(triton_kernels):
    """fp32 weight with fp16 activations: output stays in the activation dtype, like the reference."""
    torch.manual_seed(2)
    x = torch.randn(5, 96, device=DEVICE, dtype=torch.float16)
    w = torch.randn(96, device=DEVICE)
    out = rms_norm(x, w)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, rms_norm_ref(x, w), **TOL[torch.float16])


def test_rms_norm_residual_keeps_the_promoted_dtype(triton_kernels):
    """Autocast adds a half-precision sublayer output to an fp32 residual stream: like the unfused sum, the stream
    and the output stay fp32 (not rounded to fp16), and each gradient comes back in its input's dtype."""
    torch.manual_seed(3)
    x = torch.randn(7, 200, device=DEVICE, dtype=torch.float16)
    residual = 100 * torch.randn(7, 200, device=DEVICE)  # large: fp16 rounding of the sum would show at 1e-2
    w = 1 + 0.1 * torch.randn(200, device=DEVICE)
    dy, dh = torch.randn(7, 200, device=DEVICE), torch.randn(7, 200, device=DEVICE)
    results = []
    for fn in (rms_norm, rms_norm_ref):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, residual)]
        y, h = fn(leaves[0], leaves[1], 1e-6, leaves[2])
        torch.autograd.backward((y, h), (dy, dh))
        results.append((y, h, *(t.grad for t in leaves)))
    ours, ref = results
    assert (
        [t.dtype for t in ours] == [t.dtype for t in ref] == [torch.float32] * 2 + [torch.float16] + [torch.float32] * 2
    )
    for name, a, b in zip(("y", "h", "dx", "dweight", "dresidual"), ours, ref, strict=True):
        torch.testing.assert_close(a, b, **TOL[b.dtype], msg=lambda m, n=name: f"{n}: {m}")


def test_rms_norm_dispatch_uses_reference_when_forced_to_torch():
    previous = set_kernels("torch")
    try:
        x = torch.randn(3, 16)
        w = torch.randn(16)
        assert torch.equal(rms_norm(x, w), rms_norm_ref(x, w))
    finally:
        set_kernels(previous)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("shape", [(9, 341), (37, 4095), (2, 128, 4096)], ids=lambda s: "x".join(map(str, s)))
def test_rms_norm_bf16_gpu(triton_kernels, shape, with_residual):
    run_case(shape, torch.bfloat16, with_residual)
