"""Serving throughput and latency: the continuous-batching engine against ``model.generate``.

    pytest bench/bench_engine.py                   # CPU: tiny model; GPU (if any): 7B-shaped random bf16 model

At 1, 8, 32 and 64 concurrent clients (closed loop: each client sends its next request when the previous
one finished), three servers run the same greedy requests on the same model:

- ``engine``: ``LLMEngine`` (continuous batching, chunked prefill, prefix + encoder caches);
- ``sequential``: ``model.generate`` one request at a time (LLaVA's worker, minus its 5-way concurrency);
- ``static``: ``model.generate`` on static batches of ``concurrency`` requests (padded, finish together).

Requests share LLaVA's system prompt, differ in question and length, and half carry a distinct image.
Recorded per (server, concurrency), as ``"kind": "throughput"`` records: output tokens/s, time to first token
(p50/p90, from the request's arrival, queueing included) and mean inter-token latency (p50). The engine's
greedy outputs are checked equal to ``model.generate``'s, so the comparison is between equal answers.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass

import pytest
import torch

from fastllava.config import LlavaConfig, TextConfig, VisionConfig
from fastllava.constants import IMAGE_TOKEN_INDEX
from fastllava.engine import EngineConfig, EngineImage, LLMEngine, SamplingParams
from fastllava.model.llava import LlavaModel
from fastllava.tiny import build_tiny_llava, tiny_config

CONCURRENCY = (1, 8, 32, 64)


@dataclass
class Workload:
    prompts: list[list[int]]
    images: list[list[EngineImage]]
    max_tokens: int


def make_workload(cfg: LlavaConfig, n: int, max_tokens: int, question=(8, 48), system: int = 36, seed: int = 0):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    vocab = cfg.text.vocab_size
    sys_ids = [1] + [rng.randrange(5, vocab) for _ in range(system)]  # one shared system prompt
    prompts, images = [], []
    side = cfg.vision.image_size
    for i in range(n):
        q = [rng.randrange(5, vocab) for _ in range(rng.randrange(*question))]
        if i % 2:
            prompts.append(sys_ids + [IMAGE_TOKEN_INDEX] + q)
            images.append([EngineImage(torch.randn(1, 3, side, side, generator=gen), (side, side))])
        else:
            prompts.append(sys_ids + q)
            images.append([])
    return Workload(prompts, images, max_tokens)


class _Clock:
    """A ``generate`` streamer that timestamps each decoding step (the first ``put`` is the prompt)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times = device, []

    def put(self, value) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _summary(name: str, conc: int, wall: float, tokens: int, ttft: list[float], itl: list[float], n: int) -> dict:
    q = statistics.quantiles(ttft, n=10) if len(ttft) > 1 else [ttft[0]] * 9
    return {
        "kind": "throughput",
        "name": "engine",
        "series": name,
        "concurrency": conc,
        "n_requests": n,
        "tokens_per_s": tokens / wall,
        "wall_s": wall,
        "output_tokens": tokens,
        "ttft_ms_p50": 1e3 * statistics.median(ttft),
        "ttft_ms_p90": 1e3 * q[8],
        "itl_ms_p50": 1e3 * statistics.median(itl) if itl else None,
    }


def run_engine(model, w: Workload, conc: int, engine_cfg: EngineConfig) -> tuple[dict, list[list[int]]]:
    eng = LLMEngine(model, config=engine_cfg)
    eng.generate([w.prompts[0][:8]], params=SamplingParams(max_tokens=2))  # warm-up (allocator, kernels)
    params = SamplingParams(max_tokens=w.max_tokens, temperature=0.0, ignore_eos=True)
    todo, outs, inflight = list(range(len(w.prompts)))[::-1], {}, 0
    t0 = time.perf_counter()
    while todo or eng.has_unfinished_requests():
        while todo and inflight < conc:  # closed loop: a client sends its next request when one finished
            i = todo.pop()
            eng.add_request(str(i), w.prompts[i], w.images[i], SamplingParams(**vars(params)))
            inflight += 1
        for o in eng.step():
            if o.finished:
                outs[int(o.request_id)] = o
                inflight -= 1
    wall = time.perf_counter() - t0
    done = [outs[i] for i in range(len(w.prompts))]
    tokens = sum(len(o.token_ids) for o in done)
    rec = _summary(
        "engine", conc, wall, tokens, [o.metrics.ttft for o in done], [o.metrics.mean_itl for o in done], len(done)
    )
    m = eng.metrics()
    rec.update(prefix_cache_hit_rate=m.prefix_cache_hit_rate, steps=m.num_steps, preemptions=m.num_preemptions)
    return rec, [o.token_ids for o in done]


def run_generate(
    model, w: Workload, conc: int, batch: int, name: str, n: int | None = None
) -> tuple[dict, list[list[int]]]:
    """``model.generate`` on batches of ``batch`` requests, one batch at a time, ``conc`` clients."""
    idx = list(range(n or len(w.prompts)))
    dev = model.device
    model.generate(torch.tensor([w.prompts[0][:8]], device=dev), max_new_tokens=2, eos_token_id=[])  # warm-up
    ttft, itl, outs = [], [], {}
    finish: list[float] = []  # finish time of each request, in order
    t0 = time.perf_counter()
    for s in range(0, len(idx), batch):
        rows = idx[s : s + batch]
        L = max(len(w.prompts[i]) for i in rows)
        ids = torch.zeros(len(rows), L, dtype=torch.long)
        mask = torch.zeros(len(rows), L, dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, : len(w.prompts[i])] = torch.tensor(w.prompts[i])
            mask[r, : len(w.prompts[i])] = 1
        imgs = [im for i in rows for im in w.images[i]]
        clock = _Clock(dev)
        new = model.generate(
            ids.to(dev),
            attention_mask=mask.to(dev),
            images=[im.pixel_values.to(dev, model.dtype) for im in imgs] or None,
            image_sizes=[im.size_hw for im in imgs] or None,
            max_new_tokens=w.max_tokens,
            eos_token_id=[],
            streamer=clock,
        ).tolist()
        steps = clock.times[1:]
        for r, i in enumerate(rows):
            arrival = finish[i - conc] if i >= conc else t0  # the client's previous request ended then
            ttft.append(steps[0] - arrival)
            itl.append((steps[-1] - steps[0]) / max(len(steps) - 1, 1))
            outs[i] = new[r]
            finish.append(steps[-1])
    wall = time.perf_counter() - t0
    tokens = sum(len(o) for o in outs.values())
    return _summary(name, conc, wall, tokens, ttft, itl, len(idx)), [outs[i] for i in idx]


def _bench(bench_session, model, w_for, engine_cfg, seq_cap: int | None = None) -> None:
    rows = []
    for conc in CONCURRENCY:
        w = w_for(conc)
        eng_rec, eng_out = run_engine(model, w, conc, engine_cfg(conc))
        seq_rec, seq_out = run_generate(model, w, conc, 1, "sequential", n=min(len(w.prompts), seq_cap or 10**9))
        st_rec, _ = run_generate(model, w, conc, conc, "static")
        if model.device.type == "cpu":  # fp32: the engine answers exactly what generate answers
            assert eng_out[: len(seq_out)] == seq_out
        for rec in (eng_rec, seq_rec, st_rec):
            bench_session.record(rec)
            rows.append(rec)
    print(f"\n{'server':>10} {'conc':>4} {'tok/s':>9} {'TTFT p50 ms':>12} {'TTFT p90 ms':>12} {'ITL p50 ms':>11}")
    for r in rows:
        itl = f"{r['itl_ms_p50']:11.2f}" if r["itl_ms_p50"] is not None else f"{'-':>11}"
        print(
            f"{r['series']:>10} {r['concurrency']:>4} {r['tokens_per_s']:9.1f} {r['ttft_ms_p50']:12.1f} "
            f"{r['ttft_ms_p90']:12.1f} {itl}"
        )
    for conc in CONCURRENCY:
        if conc >= 8:  # batching must pay once there is something to batch
            eng = next(r for r in rows if r["series"] == "engine" and r["concurrency"] == conc)
            seq = next(r for r in rows if r["series"] == "sequential" and r["concurrency"] == conc)
            assert eng["tokens_per_s"] > seq["tokens_per_s"], (eng, seq)


def test_engine_throughput_cpu(bench_session):
    torch.manual_seed(0)
    model = build_tiny_llava(tiny_config("llama"), seed=0, std=0.1).eval()
    _bench(
        bench_session,
        model,
        lambda conc: make_workload(model.config, n=max(conc, 8), max_tokens=32, seed=conc),
        lambda conc: EngineConfig(max_num_seqs=conc, num_blocks=2048),
    )


def llava_7b_config() -> LlavaConfig:
    """LLaVA-1.5-7B's shapes: CLIP-L/14-336 (576 image tokens), 2-layer GELU projector, Vicuna/Llama-2-7B."""
    return LlavaConfig(vision=VisionConfig(), text=TextConfig(vocab_size=32064), image_aspect_ratio="pad")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (7B-shaped model in bf16)")
def test_engine_throughput_gpu_7b(bench_session):
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlavaModel(llava_7b_config()).eval()  # random weights: fine for speed
    finally:
        torch.set_default_dtype(previous)
    _bench(
        bench_session,
        model,
        lambda conc: make_workload(model.config, n=max(conc, 8), max_tokens=128, question=(16, 96), seed=conc),
        lambda conc: EngineConfig(max_num_seqs=conc, max_num_batched_tokens=4096, gpu_memory_utilization=0.5),
        seq_cap=8,  # one at a time, 64 requests would take minutes; tokens/s does not depend on how many
    )
