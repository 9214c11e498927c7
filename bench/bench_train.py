"""Training throughput, packed vs padded, on the same samples (a LLaVA-665K-like length mix).

    pytest bench/bench_train.py                  # CPU: tiny LLaVA; GPU: also a 7B-shaped LLaVA (4 layers)
    python bench/bench_train.py                  # the same, printed, without pytest

Both arms train on exactly the same samples with the same model, optimizer and fused linear cross-entropy; only
the micro-batching differs:
  * padded: ``batch_size`` samples per micro-batch in data order, right-padded to the longest (what LLaVA's
    Trainer does without ``group_by_modality_length``): padding costs compute;
  * packed: best-fit-decreasing into micro-batches of ``batch_size * mean length`` tokens, no padding.
Reported: real (non-padding) tokens per second over full steps (forward, backward, AdamW step), and the padding
fraction of the padded arm. Attention is the device's default backend (``auto``; on CPU ``sdpa_padded``). Results
go to ``bench/results/results.jsonl`` as ``"kind": "packed_vs_padded"``.

The length mix imitates LLaVA-v1.5-mix665k: ~ 2/3 single-image VQA / short conversations, ~ 1/6 long image
conversations, ~ 1/6 text-only ShareGPT chats (long), scaled by ``scale`` for the tiny CPU model.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import pytest
import torch

from fastllava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from fastllava.data.dataset import Sample, collate
from fastllava.data.sampler import best_fit_decreasing
from fastllava.packing import ImageInput
from fastllava.tiny import build_tiny_llava, tiny_config
from fastllava.train.strategy import TrainModule


def llava665k_lengths(n: int, seed: int = 0, scale: float = 1.0) -> list[tuple[int, bool]]:
    """(text tokens, has image) per sample, drawn like LLaVA-665K's mix (text length excludes image slots)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.66:  # VQAv2 / GQA / OCR-VQA style: several short QA turns
            length, img = rng.lognormvariate(4.3, 0.5), True
        elif r < 0.83:  # LLaVA-Instruct conversations / detailed descriptions
            length, img = rng.lognormvariate(5.6, 0.4), True
        else:  # ShareGPT text-only
            length, img = rng.lognormvariate(6.3, 0.6), False
        out.append((max(8, int(length * scale)), img))
    return out


def make_samples(cfg, lengths: list[tuple[int, bool]], seed: int = 0) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    S = cfg.vision.image_size
    samples = []
    for i, (n, img) in enumerate(lengths):
        ids = torch.randint(5, cfg.text.vocab_size, (n,), generator=g).tolist()
        ids[0] = 1
        labels = [IGNORE_INDEX] * (n // 3) + ids[n // 3 :]
        images = []
        if img:
            ids.insert(1, IMAGE_TOKEN_INDEX)
            labels.insert(1, IGNORE_INDEX)
            images = [ImageInput(torch.randn(1, 3, S, S, generator=g), (S, S))]
        length = n + (cfg.tokens_per_tile if img else 0)
        samples.append(Sample(i, ids, labels, images, length))
    return samples


@dataclass
class ArmResult:
    real_tokens: int
    run_tokens: int  # padding included
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.real_tokens / self.seconds


def run_arm(model, samples: list[Sample], micro: list[list[int]], device, pad: bool, dtype) -> ArmResult:
    """Train one pass over ``micro`` (lists of sample indices); returns tokens and time."""
    module = TrainModule(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    batches = []
    for mb in micro:
        ss = [samples[i] for i in mb]
        batches.append(collate(ss, model.config, pad_to=max(s.length for s in ss) if pad else None))
    real = sum(s.length for s in samples)
    run_tokens = sum(b.n_tokens for b in batches)

    def step(b):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = module(b.packed.to(device), b.target_rows.to(device), b.targets.to(device)) / max(b.n_targets, 1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    # warm-up (allocator, autotuning, compiles): Triton compiles an integer argument's kernel again when it is, or
    # is not, divisible by 16, so one batch of each such kind in this arm runs before the clock starts
    kinds = {(b.n_tokens % 16 == 0, b.packed.max_seqlen % 16 == 0): b for b in reversed(batches)}
    for b in kinds.values():
        step(b)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for b in batches:
        step(b)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return ArmResult(real, run_tokens, time.perf_counter() - t0)


def packed_vs_padded(model, samples, batch_size: int, device, dtype) -> dict:
    order = list(range(len(samples)))
    padded = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    mean = sum(s.length for s in samples) / len(samples)
    budget = max(int(batch_size * mean), max(s.length for s in samples))
    packed = best_fit_decreasing([(s.index, s.length) for s in samples], budget)
    random.Random(0).shuffle(packed)
    a = run_arm(model, samples, packed, device, pad=False, dtype=dtype)
    b = run_arm(model, samples, padded, device, pad=True, dtype=dtype)
    return {
        "packed_tokens_per_s": a.tokens_per_s,
        "padded_tokens_per_s": b.tokens_per_s,
        "speedup": a.tokens_per_s / b.tokens_per_s,
        "padding_fraction": 1 - b.real_tokens / b.run_tokens,
        "packed_micro_batches": len(packed),
        "padded_micro_batches": len(padded),
        "token_budget": budget,
        "batch_size": batch_size,
        "n_samples": len(samples),
    }


def cpu_case():
    cfg = tiny_config("llama", image_size=32, patch_size=8, hidden=64)
    model = build_tiny_llava(cfg, seed=0).float()
    # the CPU default (`auto` = sdpa_padded: per-sequence attention). The dense-mask `sdpa` reference would make
    # packing look better than it is: 4.3-4.8x vs 1.8-2.3x here (2 cores), its [T, T] mask costing the packed arm
    model.set_attn_implementation("auto")
    samples = make_samples(cfg, llava665k_lengths(96, seed=0, scale=0.25))
    return "tiny-cpu", model, samples, 8, torch.device("cpu"), torch.float32


def gpu_case():
    from fastllava.config import LlavaConfig, TextConfig, VisionConfig
    from fastllava.model.llava import LlavaModel

    # LLaVA-1.5-7B's shapes (CLIP-L/14-336 tower, Vicuna-7B widths) with 4 decoder layers so AdamW fits one GPU
    cfg = LlavaConfig(
        vision=VisionConfig(),
        text=TextConfig(num_hidden_layers=4),
        image_token_index=32000,
        image_aspect_ratio="pad",
    )
    with torch.device("cuda"):
        model = LlavaModel(cfg)
    model.vision_tower.requires_grad_(False)
    samples = make_samples(cfg, llava665k_lengths(256, seed=0))
    return "7b-shaped-4-layers", model, samples, 16, torch.device("cuda"), torch.bfloat16


def _bench(bench, case):
    label, model, samples, bs, device, dtype = case()
    res = packed_vs_padded(model, samples, bs, device, dtype)
    bench.session.record({"kind": "packed_vs_padded", "name": "train_step", "label": label, **res})
    print(f"\n{label}: {res}")
    assert res["padding_fraction"] > 0.2 and res["packed_tokens_per_s"] > 0


def test_train_packed_vs_padded_cpu(bench):
    if bench.session.is_cuda:
        pytest.skip("CPU-model benchmark (its records and gates are for the CPU run): pytest bench --bench-device=cpu")
    _bench(bench, cpu_case)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_train_packed_vs_padded_gpu(bench):
    _bench(bench, gpu_case)


if __name__ == "__main__":
    cases = [cpu_case] + ([gpu_case] if torch.cuda.is_available() else [])
    for c in cases:
        label, model, samples, bs, device, dtype = c()
        print(label, packed_vs_padded(model, samples, bs, device, dtype))
