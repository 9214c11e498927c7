"""Packed training equals one-by-one training: per-sample losses and parameter gradients (fp32, 1e-5), with
anyres images of different token counts, several images per sample and text-only samples in one micro-batch;
and the fused/chunked linear cross-entropy against plain logits + ``F.cross_entropy``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastllava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from fastllava.losses import linear_cross_entropy
from fastllava.packing import ImageInput, image_tiles, image_token_count, pack, shifted_targets
from fastllava.tiny import build_tiny_llava, tiny_config
from fastllava.train.strategy import TrainModule


def _sample(gen, cfg, n_text, sizes):
    """Token ids with one IMAGE_TOKEN_INDEX per image after a short prefix, labels on a random suffix."""
    ids = [1] + torch.randint(5, cfg.text.vocab_size, (3,), generator=gen).tolist()
    images = []
    for hw in sizes:
        ids.append(IMAGE_TOKEN_INDEX)
        n = image_tiles(cfg, hw)
        images.append(ImageInput(torch.randn(n, 3, cfg.vision.image_size, cfg.vision.image_size, generator=gen), hw))
    ids += torch.randint(5, cfg.text.vocab_size, (n_text,), generator=gen).tolist()
    labels = [IGNORE_INDEX if (t == IMAGE_TOKEN_INDEX or j < len(ids) - n_text // 2) else t for j, t in enumerate(ids)]
    return ids, labels, images


def _oracle_loss(model, ids, labels, images):
    """One sample alone, through full [T, V] logits and F.cross_entropy (no fused loss, no packing of others)."""
    b = pack([ids], [images], model.config, labels=[labels])
    logits = model.logits(model.forward_packed(b)).float()
    targets = shifted_targets(b.labels, b.cu_seqlens)
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum"), int((targets >= 0).sum())


def test_packed_equals_one_by_one():
    torch.manual_seed(0)
    cfg = tiny_config("llama", anyres=True)
    model = build_tiny_llava(cfg, seed=1).float()
    model.set_attn_implementation("sdpa")
    gen = torch.Generator().manual_seed(0)
    S = cfg.vision.image_size
    specs = [(12, [(S, 2 * S)]), (9, []), (15, [(2 * S, S), (S, S)]), (7, [(2 * S, 2 * S)]), (11, [])]
    samples = [_sample(gen, cfg, n, sizes) for n, sizes in specs]
    counts = {image_token_count(cfg, hw) for _, sizes in specs for hw in sizes}
    assert len(counts) >= 3  # images of different token counts in one micro-batch

    # oracle: each sample alone, summed CE; gradient of (sum of sums) / total targets
    model.zero_grad()
    per_sample, n_total = [], 0
    for ids, labels, images in samples:
        s, n = _oracle_loss(model, ids, labels, images)
        per_sample.append(s.detach())
        n_total += n
    sum(_oracle_loss(model, *smp)[0] for smp in samples).div(n_total).backward()
    ref_grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    # packed: one stream, the training path (TrainModule + fused linear CE at target rows only)
    model.zero_grad()
    packed = pack([s[0] for s in samples], [s[2] for s in samples], cfg, labels=[s[1] for s in samples])
    targets = shifted_targets(packed.labels, packed.cu_seqlens)
    rows = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    assert rows.numel() == n_total
    loss_sum = TrainModule(model, chunk_size=7, impl="chunked")(packed, rows, targets[rows])
    (loss_sum / n_total).backward()
    torch.testing.assert_close(loss_sum.detach(), torch.stack(per_sample).sum(), rtol=1e-5, atol=1e-5)

    # per-sample losses from the packed stream
    hidden = model.forward_packed(packed)
    cu = packed.cu_seqlens.tolist()
    for b, ref in enumerate(per_sample):
        seg = rows[(rows >= cu[b]) & (rows < cu[b + 1])]
        got = linear_cross_entropy(hidden[seg], model.language_model.lm_head.weight, targets[seg], impl="eager")
        torch.testing.assert_close(got.detach(), ref, rtol=1e-5, atol=1e-5)

    grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys()
    assert any(k.startswith("vision_tower.") for k in grads) and "image_newline" in grads
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-5, atol=1e-5, msg=k)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("n,d,v,chunk", [(9, 16, 341, 4), (64, 32, 1000, 64), (1, 8, 5, 1)])
def test_linear_cross_entropy_matches_eager(n, d, v, chunk, dtype, tol):
    g = torch.Generator().manual_seed(n)
    h0 = torch.randn(n, d, generator=g).to(dtype)
    w0 = (torch.randn(v, d, generator=g) * 0.3).to(dtype)
    b0 = torch.randn(v, generator=g).to(dtype)
    t = torch.randint(0, v, (n,), generator=g)
    t[0] = IGNORE_INDEX
    outs = {}
    for impl in ("chunked", "eager"):
        h, w, b = (x.clone().requires_grad_(True) for x in (h0, w0, b0))
        loss = linear_cross_entropy(h, w, t, bias=b, chunk_size=chunk, impl=impl)
        (loss * 0.5).backward()
        outs[impl] = (loss.detach(), h.grad, w.grad, b.grad)
    for got, ref in zip(outs["chunked"], outs["eager"], strict=True):
        torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol)


def test_padded_api_and_packed_loss_are_the_training_loss():
    """``forward(labels=)`` (mean over targets) and ``packed_loss`` (sum, count) go through the model's one loss:
    equal to full ``[T, V]`` logits + ``F.cross_entropy`` of the same sample, with gradients and under no_grad."""
    cfg = tiny_config("llama")
    model = build_tiny_llava(cfg, seed=2).float()
    model.set_attn_implementation("sdpa")
    gen = torch.Generator().manual_seed(3)
    S = cfg.vision.image_size
    ids, labels, images = _sample(gen, cfg, 10, [(S, S)])
    ref_sum, n = _oracle_loss(model, ids, labels, images)
    assert n > 0
    out = model(torch.tensor([ids]), images=images[0].pixel_values, image_sizes=[(S, S)], labels=torch.tensor([labels]))
    torch.testing.assert_close(out.loss, ref_sum / n, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    assert model.language_model.lm_head.weight.grad is not None
    with torch.no_grad():
        got_sum, got_n = model.packed_loss(pack([ids], [images], cfg, labels=[labels]))
    assert got_n == n and not got_sum.requires_grad
    torch.testing.assert_close(got_sum, ref_sum.detach(), rtol=1e-5, atol=1e-5)


def test_idle_micro_batch_adds_zero_gradient():
    """A rank with nothing left in a micro-batch runs ``idle_batch`` (so DDP / FSDP2 / ZeRO collectives pair up):
    its loss is 0 and every language-model gradient it produces is exactly zero."""
    from fastllava.train.train import idle_batch

    cfg = tiny_config("llama")
    model = build_tiny_llava(cfg, seed=2).float()
    b = idle_batch(cfg, pad_id=0)
    assert b.n_targets == 0 and b.packed.input_ids.numel() == 1
    loss = TrainModule(model)(b.packed, b.target_rows, b.targets)
    loss.backward()
    assert loss.item() == 0.0
    grads = [p.grad for p in model.language_model.parameters()]
    assert all(g is not None and not g.any() for g in grads)
