"""Benchmark answering speed: ``model_vqa``'s batched engine runs against LLaVA's one-question-at-a-time loop.

    pytest bench/bench_eval.py        # CPU: tiny model; GPU (if any): 7B-shaped random bf16 model as well

The same questions (the synthetic shapes set's held-out split, LLaVA question jsonl, images on disk) are answered
greedily by the same model through ``eval.runner.answer_all`` with three backends:

- ``engine``: what ``python -m eval.model_vqa`` runs (``LLMEngine``, continuous batching);
- ``one_at_a_time``: ``model.generate`` per question, LLaVA's ``model_vqa.py`` loop;
- ``static``: ``model.generate`` on padded batches of the engine's batch size (``--backend static``).

``model.generate`` is the padded API over the engine (``fastllava.generation``): the baselines run the engine's
decode under LLaVA's calling pattern (one question, or one static batch run to its longest answer, at a time),
so the ratios measure the scheduling (continuous batching, prefetch), not a second decode loop.

Each series times everything after model loading: prompt building, tokenization, image loading and
preprocessing, generation, detokenization. Recorded as ``"kind": "eval_throughput"`` records (questions/s).
On CPU (fp32) the engine's answers are checked equal to the one-at-a-time answers.
"""

from __future__ import annotations

import time

import pytest
import torch

from fastllava.eval.embedded import held_out_split
from fastllava.eval.questions import load_vqa_jsonl
from fastllava.eval.runner import EngineBackend, GenParams, StaticBackend, answer_all
from fastllava.tiny import build_tiny_llava, build_tokenizer, tiny_config, tiny_image_processor


def _timed(name: str, backend, questions, params: GenParams) -> tuple[dict, list[str]]:
    start = time.perf_counter()
    got = {i: t for i, t, _ in answer_all(questions, backend, params)}
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    texts = [got[i] for i in range(len(questions))]
    rec = {
        "kind": "eval_throughput",
        "series": name,
        "questions": len(questions),
        "batch_size": getattr(backend, "batch_size", 1),
        "max_new_tokens": params.max_new_tokens,
        "seconds": wall,
        "questions_per_s": len(questions) / wall,
    }
    return rec, texts


def _bench(bench_session, model, tokenizer, processor, data_dir, n: int, batch: int, max_new_tokens: int, seq_n: int):
    questions = load_vqa_jsonl(str(held_out_split(data_dir, seed=0, n_eval=n)), str(data_dir / "images"))
    params = GenParams(temperature=0.0, max_new_tokens=max_new_tokens)
    # warm up once (allocator, kernel selection), outside the timings
    list(answer_all(questions[:2], EngineBackend(model, tokenizer, processor, "llava_v1", batch_size=2), params))
    eng, eng_out = _timed("engine", EngineBackend(model, tokenizer, processor, "llava_v1", batch), questions, params)
    one, one_out = _timed("one_at_a_time", StaticBackend(model, tokenizer, processor, "llava_v1", 1),
                          questions[:seq_n], params)  # fmt: skip
    st, _ = _timed("static", StaticBackend(model, tokenizer, processor, "llava_v1", batch), questions, params)
    if model.device.type == "cpu":  # fp32: batching must not change a greedy answer
        assert eng_out[:seq_n] == one_out
    for rec in (eng, one, st):
        rec["device_type"] = model.device.type
        bench_session.record(rec)
    print(f"\n{'series':>14} {'questions':>9} {'q/s':>8}")
    for r in (eng, one, st):
        print(f"{r['series']:>14} {r['questions']:>9} {r['questions_per_s']:8.2f}")
    print(f"engine / one-at-a-time: {eng['questions_per_s'] / one['questions_per_s']:.1f}x")
    assert eng["questions_per_s"] > one["questions_per_s"], (eng, one)


def test_model_vqa_throughput_cpu(bench_session, tmp_path):
    if bench_session.is_cuda:
        pytest.skip("CPU-model benchmark (its records and gates are for the CPU run): pytest bench --bench-device=cpu")
    cfg = tiny_config("llama")
    model = build_tiny_llava(cfg, seed=1, std=0.2).eval()
    _bench(bench_session, model, build_tokenizer(), tiny_image_processor(cfg), tmp_path, n=64, batch=32,
           max_new_tokens=16, seq_n=64)  # fmt: skip


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (7B-shaped model in bf16)")
def test_model_vqa_throughput_gpu_7b(bench_session, tmp_path):
    from bench.bench_engine import llava_7b_config
    from fastllava.model.llava import LlavaModel

    cfg = llava_7b_config()
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlavaModel(cfg).eval()  # random weights: answers run to max_new_tokens, fine for speed
    finally:
        torch.set_default_dtype(previous)
    _bench(bench_session, model, build_tokenizer(), tiny_image_processor(cfg), tmp_path, n=256, batch=64,
           max_new_tokens=64, seq_n=16)  # fmt: skip
