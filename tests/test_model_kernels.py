"""The model with every Triton op on equals the model on the torch references (issue 3's wiring check).

Runs the Triton kernels through the interpreter on CPU (CI exports TRITON_INTERPRET=1) or on a GPU; compares
the packed forward's logits and every parameter gradient, with images of different token counts (anyres) and
a text-only sequence in the batch, and with the `triton` attention backend as well.
"""

from __future__ import annotations

import os

import pytest
import torch

from fastllava import set_kernels
from fastllava.constants import IMAGE_TOKEN_INDEX
from fastllava.packing import ImageInput, image_tiles, pack
from fastllava.tiny import build_tiny_llava, tiny_config

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="Triton kernels need a GPU or TRITON_INTERPRET=1 (set before triton is imported)",
)


def _batch(cfg):
    sizes = [(40, 90), (32, 32)]
    g = torch.Generator().manual_seed(0)
    imgs = [ImageInput(torch.randn(image_tiles(cfg, s), 3, 32, 32, generator=g), s) for s in sizes]
    seqs = [[1, 20, IMAGE_TOKEN_INDEX, 30, 31], [1, 40, 41], [1, IMAGE_TOKEN_INDEX, 50, 9]]
    labels = [[-100, -100, -100, 30, 31], [-100, 40, 41], [-100, -100, 50, 9]]
    return pack(seqs, [[imgs[0]], [], [imgs[1]]], cfg, labels=labels)


def _run(model, batch, kernels: str, attn: str):
    previous = set_kernels(kernels)
    try:
        model.set_attn_implementation(attn)
        model.zero_grad()
        hidden = model.forward_packed(batch)
        loss, n = model.packed_loss(batch, hidden)
        (loss / n).backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        return model.logits(hidden).detach(), grads
    finally:
        set_kernels(previous)


LAUNCHERS = {
    "rms_norm": "rms_norm_fwd",
    "rotary": "rotary_fwd",
    "projector_mlp": "projector_mlp_fwd",
    "scatter_image_tokens": "scatter_image_tokens_fwd",
    "flash_attention": "flash_attn_varlen_fwd",
}


@pytest.mark.parametrize("attn", ["sdpa", "triton"])
def test_model_with_triton_kernels_matches_references(attn, monkeypatch):
    import importlib

    cfg = tiny_config("llama", anyres=True)
    model = build_tiny_llava(cfg, seed=0)
    batch = _batch(cfg)
    ref_logits, ref_grads = _run(model, batch, "torch", "sdpa")
    calls = dict.fromkeys(LAUNCHERS, 0)
    for mod_name, fn_name in LAUNCHERS.items():  # count launches: the model must reach every Triton op
        mod = importlib.import_module(f"fastllava.kernels.{mod_name}")
        real = getattr(mod, fn_name)

        def spy(*a, _real=real, _name=mod_name, **kw):
            calls[_name] += 1
            return _real(*a, **kw)

        monkeypatch.setattr(mod, fn_name, spy)
    logits, grads = _run(model, batch, "triton", attn)
    expected = {k for k in LAUNCHERS if k != "flash_attention" or attn == "triton"}
    assert {k for k, n in calls.items() if n} == expected, calls
    torch.testing.assert_close(logits, ref_logits, atol=2e-4, rtol=1e-4)
    assert grads.keys() == ref_grads.keys() and len(grads) > 20
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], atol=2e-4, rtol=1e-3, msg=lambda m, k=k: f"{k}: {m}")
