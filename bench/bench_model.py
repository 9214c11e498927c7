"""Benchmark of the whole LLaVA forward: one packed batch with images, fastllava's kernels on vs off.

    pytest bench/bench_model.py                        # CPU: the tiny LLaVA (harness only)

GPU: a random-weight LLaVA-1.5-7B-shaped model in bf16 -- CLIP-L/14 at 336 px (24 layers of 1024, features from
layer -2), the mlp2x_gelu projector, Llama-7B (``MODEL_LAYERS`` = all 32 decoder layers of 4096; recorded in
``shapes``) -- runs ``forward_packed`` (vision tower on every image at once, projector, image-token scatter,
language model with varlen attention; no lm_head, as in serving prefill before the last-token logits) on one packed
batch of 4096 tokens: five single-image samples (576 image slots + text, 597-688 tokens each) and five text-only
samples. ``ours`` runs with ``fastllava.set_kernels("triton")`` and the ``triton`` attention backend; ``kernels_off``
is the same model with ``set_kernels("torch")``: every op's torch reference, attention through the reference SDPA
with a block-diagonal mask. Recorded: both times, tokens/s (``"kind": "model_forward"`` records), approximate
TFLOP/s. GPU gate (h100/h200): kernels on never slower than off.

CPU: the tiny LLaVA of the tests (fp32); kernels "on" is ``auto``, i.e. the references again, so the gate is only
that the switch costs nothing measurable (ratio >= 0.5, as bench_kernels.py's CPU gate).
"""

from __future__ import annotations

from typing import Any

import torch

import fastllava
from bench.harness import GPU, BenchSession, Case, Gate, Impl
from fastllava.config import LlavaConfig, TextConfig, VisionConfig
from fastllava.constants import IMAGE_TOKEN_INDEX
from fastllava.model.llava import LlavaModel
from fastllava.packing import ImageInput, PackedBatch, pack
from fastllava.tiny import build_tiny_llava, tiny_config

MODEL_LAYERS = 32  # Llama-7B decoder layers on GPU (~0.1 s per 4096-token forward on an H100: the full depth fits)
# (total length of each single-image sample, total length of each text-only sample); BOS included.
BATCH = {
    "gpu": ([612, 688, 597, 641, 655], [176, 243, 98, 131, 255]),  # 4096 tokens, LLaVA-665K-like mix
    "cpu": ([60, 72, 48], [40, 50, 30]),  # tiny tower: 16 image slots per image
}


def build_model(session: BenchSession) -> tuple[LlavaModel, str]:
    """The model and its label; random weights (speed does not depend on them)."""
    if not session.is_cuda:
        model = build_tiny_llava(tiny_config("llama"), seed=0).float().eval()
        model.set_attn_implementation("sdpa")
        return model, "tiny-llava"
    cfg = LlavaConfig(
        vision=VisionConfig(),  # CLIP-L/14-336: 24 x 1024, 577 tokens per image
        text=TextConfig(vocab_size=32064, num_hidden_layers=MODEL_LAYERS),  # Llama-7B widths
        image_token_index=32000,
        image_aspect_ratio="pad",
    )
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build in bf16 directly: an fp32 7B would need 28 GB first
    try:
        with torch.device(session.device):
            model = LlavaModel(cfg).eval()
    finally:
        torch.set_default_dtype(previous)
    model.set_attn_implementation("triton")  # with set_kernels("torch") this backend runs its reference
    return model, f"llava-1.5-7b-shaped-{MODEL_LAYERS}-layers"


def packed_batch(session: BenchSession, cfg: LlavaConfig) -> PackedBatch:
    """Single-image samples ``<s> <image> text`` and text-only samples, packed (image slots expanded)."""
    with_image, text_only = BATCH["gpu" if session.is_cuda else "cpu"]
    g = torch.Generator().manual_seed(0)
    side, slots = cfg.vision.image_size, cfg.tokens_per_tile

    def text(n: int) -> list[int]:
        return torch.randint(5, cfg.text.vocab_size - 100, (n,), generator=g).tolist()

    sequences, images = [], []
    for n in with_image:
        sequences.append([1, IMAGE_TOKEN_INDEX, *text(n - 1 - slots)])
        images.append([ImageInput(torch.randn(1, 3, side, side, generator=g), (side, side))])
    for n in text_only:
        sequences.append([1, *text(n - 1)])
        images.append([])
    batch = pack(sequences, images, cfg, device=session.device)
    if batch.num_tokens != sum(with_image) + sum(text_only):
        raise AssertionError(f"packed {batch.num_tokens} tokens, expected {sum(with_image) + sum(text_only)}")
    return batch


def forward_flops(model: LlavaModel, batch: PackedBatch) -> int:
    """Approximate forward FLOPs: 2 x params x tokens per linear stack, plus attention's two matmuls."""
    cfg = model.config
    n_img = len(batch.image_counts_host)
    vis_tokens = cfg.vision.num_patches + 1  # CLS kept inside the tower
    vis_layers = cfg.vision.num_hidden_layers - 1  # features come from layer -2: the last layer never runs
    per_vis_layer = sum(p.numel() for p in model.vision_tower.encoder.layers[0].parameters())
    vision = 2 * per_vis_layer * vis_layers * n_img * vis_tokens
    vision += 4 * vis_tokens**2 * cfg.vision.hidden_size * vis_layers * n_img  # bidirectional
    projector = 2 * sum(p.numel() for p in model.multi_modal_projector.parameters()) * sum(batch.image_counts_host)
    lm_params = sum(p.numel() for p in model.language_model.layers.parameters())
    t = cfg.text
    lm = 2 * lm_params * batch.num_tokens
    lm += sum(2 * n * n * t.head_dim * t.num_attention_heads for n in batch.seq_lens) * t.num_hidden_layers  # causal
    return int(vision + projector + lm)


def kernels_off(model: LlavaModel):
    """The forward with every fastllava op on its torch reference (restores the switch afterwards)."""

    def fn(batch: PackedBatch) -> torch.Tensor:
        previous = fastllava.set_kernels("torch")
        try:
            return model.forward_packed(batch)
        finally:
            fastllava.set_kernels(previous)

    return fn


def run_forward(bench) -> None:
    s = bench.session
    model, label = build_model(s)
    batch = packed_batch(s, model.config)
    rec = bench.run(
        Case(
            name="llava_forward",
            mode="fwd",
            setup=lambda: {"batch": batch},  # read-only: every implementation may share it
            candidate=Impl("ours", lambda batch: model.forward_packed(batch)),
            baselines=[Impl("kernels_off", kernels_off(model))],
            gates=[
                Gate("kernels_off", 1.0, GPU, why="fused kernels and varlen attention never lose to references"),
                Gate("kernels_off", 0.5, ("cpu",), why="on CPU both arms run the references"),
            ],
            shapes=model_shapes(model, batch, label),
            dtype=str(model.dtype).removeprefix("torch."),
            track=None if s.is_cuda else ("kernels_off",),
            flops=forward_flops(model, batch),
        )
    )
    for impl, m in rec["impls"].items():
        s.record(
            {
                "kind": "model_forward",
                "name": "llava_forward",
                "label": label,
                "series": "kernels_on" if impl == "ours" else impl,
                "tokens": batch.num_tokens,
                "tokens_per_s": batch.num_tokens / (m["median_ms"] / 1e3),
                "median_ms": m["median_ms"],
            }
        )


def test_llava_forward(bench):
    try:
        run_forward(bench)
    finally:
        if bench.session.is_cuda:
            torch.cuda.empty_cache()  # ~14 GB of weights, freed with run_forward's frame: hand them back


def model_shapes(model: LlavaModel, batch: PackedBatch, label: str) -> dict[str, Any]:
    cfg = model.config
    return {
        "model": label,
        "tokens": batch.num_tokens,
        "seqlens": batch.seq_lens,
        "images": len(batch.image_counts_host),
        "image_tokens": sum(batch.image_counts_host),
        "vision": [cfg.vision.num_hidden_layers, cfg.vision.hidden_size, cfg.vision.image_size],
        "lm_layers": cfg.text.num_hidden_layers,
        "lm_hidden": cfg.text.hidden_size,
        "attention": model.attn_implementation,
    }


def test_kernels_on_computes_what_off_computes(bench_session):
    """Kernels on and off give the same hidden states (tiny model, fp32, the benchmark's batch layout): the two
    timed arms do the same work."""
    s = bench_session
    model = build_tiny_llava(tiny_config("llama"), seed=0).float().to(s.device).eval()
    model.set_attn_implementation("triton" if s.is_cuda else "sdpa")
    batch = packed_batch(s, model.config)
    tol = {"atol": 2e-2, "rtol": 2e-2} if s.is_cuda else {"atol": 1e-5, "rtol": 1e-5}  # tf32 dots in Triton
    hidden = {}
    for arm, mode in (("on", "triton" if s.is_cuda else "auto"), ("off", "torch")):
        previous = fastllava.set_kernels(mode)
        try:
            with torch.no_grad():
                hidden[arm] = model.forward_packed(batch)
        finally:
            fastllava.set_kernels(previous)
    assert hidden["on"].shape == (batch.num_tokens, model.config.text.hidden_size)
    assert torch.isfinite(hidden["on"]).all()
    torch.testing.assert_close(hidden["on"], hidden["off"], **tol)
