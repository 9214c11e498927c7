"""Varlen image-token scatter (kernels/scatter_image_tokens.py): Triton vs the torch reference vs a per-image loop.

Without a GPU the kernels run in the Triton interpreter: tests/conftest.py sets TRITON_INTERPRET=1 before
anything imports triton. Shared helpers (skip mark, accuracy check) are in tests/kernel_testing.py.
"""

import pytest
import torch
from kernel_testing import CUDA, DEVICE, assert_matches, requires_triton

from fastllava.kernels import (
    scatter_image_tokens,
    scatter_image_tokens_,
    scatter_image_tokens_ref,
)

pytestmark = requires_triton

# A scatter is a copy (with at most one cast): every dtype must match the reference exactly.
TOL = {torch.float32: dict(atol=0, rtol=0), torch.float16: dict(atol=0, rtol=0), torch.bfloat16: dict(atol=0, rtol=0)}

# (T, D, offsets, counts)
CASES = {
    "3-images-D33": (24, 33, [2, 7, 15], [3, 1, 5]),
    "no-images": (10, 16, [], []),
    "one-image-D4095": (6, 4095, [1], [5]),
    "zero-count-image": (9, 20, [0, 4, 5], [2, 0, 3]),
    # packed: [3 text + 4 image] [1 text] [2 text + 2 image + 1 text + 3 image + 1 text], then 4 more images
    "packed-8-images": (40, 24, [3, 10, 13, 16, 21, 24, 30, 36], [4, 2, 3, 1, 3, 5, 6, 4]),
}


def scatter_loop_f64(embeds, features, offsets, counts):
    """Independent oracle: one slice assignment per image, in float64, host ints (fine in a test)."""
    out = embeds.double().clone()
    start = 0
    for off, cnt in zip(offsets.tolist(), counts.tolist(), strict=True):
        out[off : off + cnt] = features.double()[start : start + cnt]
        start += cnt
    return out


def make_case(t, d, offsets, counts, dtype, index_dtype=torch.int64, features_dtype=None, seed=0):
    torch.manual_seed(seed)
    embeds = torch.randn(t, d, device=DEVICE, dtype=dtype)
    features = torch.randn(sum(counts), d, device=DEVICE, dtype=features_dtype or dtype)
    offsets = torch.tensor(offsets, device=DEVICE, dtype=index_dtype)
    counts = torch.tensor(counts, device=DEVICE, dtype=index_dtype)
    return embeds, features, offsets, counts


def run_case(case, dtype, index_dtype=torch.int64, features_dtype=None):
    embeds, features, offsets, counts = make_case(*case, dtype, index_dtype, features_dtype)
    d_out = torch.randn_like(embeds)
    results = {}
    for name, fn in (("triton", scatter_image_tokens), ("torch", scatter_image_tokens_ref), ("f64", scatter_loop_f64)):
        e = embeds.detach().to(torch.float64 if name == "f64" else dtype).requires_grad_()
        f = features.detach().to(torch.float64 if name == "f64" else features.dtype).requires_grad_()
        out = fn(e, f, offsets, counts)
        out.backward(d_out.to(out.dtype))
        # with no images the loop oracle never touches the features: autograd leaves their grad None
        results[name] = (out, e.grad, f.grad if f.grad is not None else torch.zeros_like(f))
    for i, name in enumerate(["merged", "d_embeds", "d_features"]):
        tri, ref, exact = results["triton"][i], results["torch"][i], results["f64"][i]
        assert_matches(tri, ref, exact, name, TOL)
    # the image slots get exactly zero gradient, everything else passes through
    dest_mask = scatter_loop_f64(torch.zeros_like(embeds), torch.ones_like(features), offsets, counts) > 0
    assert torch.equal(results["triton"][1][dest_mask], torch.zeros_like(results["triton"][1][dest_mask]))
    assert torch.equal(results["triton"][1][~dest_mask], d_out[~dest_mask])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_scatter_image_tokens(triton_kernels, case, dtype):
    run_case(case, dtype)


def test_scatter_image_tokens_int32_indices_and_fp32_features(triton_kernels):
    """int32 offsets/counts, and fp32 projector output cast into an fp16 stream on the way."""
    run_case(CASES["packed-8-images"], torch.float16, index_dtype=torch.int32, features_dtype=torch.float32)


def test_scatter_image_tokens_inplace(triton_kernels):
    embeds, features, offsets, counts = make_case(*CASES["packed-8-images"], torch.float32)
    expected = scatter_image_tokens_ref(embeds, features, offsets, counts)
    buffer = embeds.clone()
    out = scatter_image_tokens_(buffer, features, offsets, counts)
    assert out is buffer
    assert torch.equal(buffer, expected)


def test_scatter_image_tokens_inplace_autograd(triton_kernels):
    """In-place on a non-leaf (an embedding lookup's output) still gives the gather / zeroed gradients."""
    embeds, features, offsets, counts = make_case(*CASES["3-images-D33"], torch.float32, seed=1)
    grads = {}
    for name, op in (("triton", scatter_image_tokens_), ("torch", None)):
        leaf = embeds.clone().requires_grad_()
        f = features.clone().requires_grad_()
        stream = leaf * 1.0
        out = op(stream, f, offsets, counts) if op else scatter_image_tokens_ref(stream, f, offsets, counts)
        (out * torch.arange(out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads[name] = (leaf.grad, f.grad)
    assert torch.equal(grads["triton"][0], grads["torch"][0])
    assert torch.equal(grads["triton"][1], grads["torch"][1])


def test_scatter_image_tokens_reference_needs_no_host_sync():
    """The reference runs on meta tensors, so it never reads a value back (no .item(), nonzero, masks)."""
    t, d, offsets, counts = CASES["packed-8-images"]
    meta = dict(device="meta")
    out = scatter_image_tokens_ref(
        torch.empty(t, d, **meta),
        torch.empty(sum(counts), d, **meta),
        torch.empty(len(offsets), dtype=torch.int64, **meta),
        torch.empty(len(counts), dtype=torch.int64, **meta),
    )
    assert out.shape == (t, d) and out.device.type == "meta"


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_scatter_image_tokens_bf16_gpu_no_sync(triton_kernels, case):
    """bf16 on the GPU, and neither the op nor its backward synchronises with the host."""
    run_case(case, torch.bfloat16)
    embeds, features, offsets, counts = make_case(*case, torch.bfloat16)
    embeds.requires_grad_()
    features.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = scatter_image_tokens(embeds, features, offsets, counts)
        out.backward(torch.ones_like(out))
    finally:
        torch.cuda.set_sync_debug_mode("default")
