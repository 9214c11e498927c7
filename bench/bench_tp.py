"""Tensor-parallel serving: what sharding the language model over ranks costs and buys.

    pytest bench/bench_tp.py                  # CPU: per-step cost of the step broadcast and collectives at tp 2
    bash bench/run_gpu.sh OUT                 # a machine with >= 2 GPUs: prefill and decode throughput tp 1 vs tp N

CPU (gloo, 2 ranks on the shared cores, tiny llama): per decode step of 8 sequences, ``broadcast_ms`` is the
step channel alone (rank 0 sends the decode batch description, the followers receive it: one pickled header
and one broadcast per dtype; ``TPGroup.send`` with a no-op command), and ``step_ms`` the whole engine step at
tp 1 and tp 2; at tiny widths the compute is negligible, so ``step_ms`` at tp 2 minus tp 1 is what the step's
collectives (two all-reduces per layer, the embedding's all-reduce, the head's all-gather) and the broadcast
cost per step. Recorded as ``"kind": "tp_overhead"``; no gate (the number is the deliverable).

GPU (skipped with fewer than 2 GPUs): a Llama-7B-*shaped* language model (``GPU_LAYERS`` decoder layers of 32,
random bf16 weights, written once as a llava-hf checkpoint under the results folder) at tp 1 and tp N = every
GPU (up to 4); prefill tokens/s (16 prompts of 1024 tokens, one output token) and decode tokens/s (32
sequences, 128 tokens each, eager: CUDA graphs are not captured under tensor parallelism yet). Recorded as
``"kind": "throughput"`` with ``series`` ``tp1`` / ``tpN``; no gate.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import pytest
import torch

from fastllava.engine import EngineConfig, LLMEngine, SamplingParams
from fastllava.model.builder import load_pretrained_model
from fastllava.model.export import save_llava_hf
from fastllava.model.language import AttnMetadata
from fastllava.packing import PackedBatch
from fastllava.tiny import build_tiny_llava, build_tokenizer, tiny_config, tiny_image_processor

CPU_BATCH, CPU_STEPS = 8, 40
GPU_LAYERS = 4  # of Llama-7B's 32 (per-layer work is identical; the collectives per layer are what scale)


def _engine(model, tokenizer, **kw) -> LLMEngine:
    return LLMEngine(model, tokenizer, EngineConfig(**kw))


def _decode_step_ms(model, tokenizer, batch: int, steps: int) -> float:
    """Median ms of an engine step that decodes ``batch`` sequences (prefill excluded)."""
    engine = _engine(model, tokenizer, num_blocks=256, block_size=16)
    for i in range(batch):
        engine.add_request(None, [1, 5 + i, 7, 9], params=SamplingParams(max_tokens=steps + 4, temperature=0.0,
                                                                          ignore_eos=True))  # fmt: skip
    engine.step()  # the prefill
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _decode_description(n: int, context: int, block_size: int) -> tuple[PackedBatch, AttnMetadata]:
    rows = torch.randint(0, 400, (4, n))  # ids, positions, slots, context lengths
    cu = torch.arange(n + 1, dtype=torch.int32)
    tables = torch.arange(n * (context // block_size), dtype=torch.int32).view(n, -1)
    batch = PackedBatch(input_ids=rows[0], position_ids=rows[1], cu_seqlens=cu, max_seqlen=1, seq_lens=[1] * n)
    meta = AttnMetadata(cu_seqlens=cu, max_seqlen=1, slot_mapping=rows[2], block_tables=tables,
                        context_lens=rows[3], decode=True)  # fmt: skip
    return batch, meta


def _tiny_checkpoint(out: Path) -> Path:
    cfg = tiny_config("llama")
    path = out / "tp-bench-tiny"
    if not (path / "config.json").is_file():
        save_llava_hf(build_tiny_llava(cfg, seed=0), path, build_tokenizer(), tiny_image_processor(cfg))
    return path


def test_tp_step_overhead_cpu(bench_session):
    s = bench_session
    if s.is_cuda:
        pytest.skip("the CPU (gloo) overhead record; GPUs run test_tp_throughput_gpu")
    path = _tiny_checkpoint(s.out_dir)
    tok, one, _, _ = load_pretrained_model(path, device="cpu")
    step_tp1 = _decode_step_ms(one, tok, CPU_BATCH, CPU_STEPS)
    _, tp, _, _ = load_pretrained_model(path, device="cpu", tensor_parallel_size=2)
    try:
        step_tp2 = _decode_step_ms(tp, tok, CPU_BATCH, CPU_STEPS)
        # a decode batch description as the runner sends it (decode_forward's PackedBatch + AttnMetadata)
        batch, meta = _decode_description(CPU_BATCH, context=64, block_size=16)
        times = []
        for _ in range(200):
            t0 = time.perf_counter()
            tp.group.send("ping", (batch, meta))
            times.append((time.perf_counter() - t0) * 1e3)
        broadcast = statistics.median(times)
    finally:
        tp.close()
    s.record(
        {
            "kind": "tp_overhead",
            "name": "tp2_decode_step_cpu",
            "tensor_parallel_size": 2,
            "backend": "gloo",
            "batch": CPU_BATCH,
            "layers": one.config.text.num_hidden_layers,
            "collectives_per_step": 2 * one.config.text.num_hidden_layers + 2,
            "broadcast_ms": broadcast,
            "step_ms": {"tp1": step_tp1, "tp2": step_tp2},
            "overhead_ms": step_tp2 - step_tp1,
        }
    )
    print(f"\ntp2 on CPU: step broadcast {broadcast:.3f} ms, decode step {step_tp1:.2f} ms (tp1) -> {step_tp2:.2f} ms")
    assert broadcast > 0 and step_tp2 > 0


# ------------------------------------------------------------------------------------------------- GPU


def _gpu_checkpoint(out: Path) -> Path:
    """A Llama-7B-shaped (GPU_LAYERS layers) llava-hf checkpoint of random bf16 weights, written once."""
    path = out / f"tp-bench-7b-{GPU_LAYERS}l"
    if (path / "config.json").is_file():
        return path
    cfg = tiny_config("llama", hidden=4096, layers=GPU_LAYERS, vocab_size=32000)
    t = cfg.text
    t.intermediate_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim = 11008, 32, 32, 128
    model = build_tiny_llava(cfg, seed=0).to(torch.bfloat16)
    save_llava_hf(model, path, build_tokenizer(), tiny_image_processor(cfg))
    return path


def _throughput(model, tok, prompts: int, prompt_len: int, max_tokens: int) -> float:
    engine = _engine(model, tok, max_num_seqs=max(prompts, 1), max_num_batched_tokens=8192)
    ids = [[1] + [5 + (i * 7 + j) % 400 for j in range(prompt_len - 1)] for i in range(prompts)]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    engine.generate(ids[:2], params=SamplingParams(max_tokens=2, ignore_eos=True))  # warm up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    engine.generate(ids, params=params)
    torch.cuda.synchronize()
    tokens = prompts * (prompt_len if max_tokens == 1 else max_tokens)
    return tokens / (time.perf_counter() - t0)


def test_tp_throughput_gpu(bench_session):
    s = bench_session
    if not s.is_cuda or torch.cuda.device_count() < 2:
        pytest.skip("tensor-parallel throughput needs a machine with at least 2 GPUs")
    world = min(torch.cuda.device_count(), 4)
    path = _gpu_checkpoint(s.out_dir)
    for tp in (1, world):
        tok, model, _, _ = load_pretrained_model(path, device="cuda", dtype="bfloat16", tensor_parallel_size=tp)
        try:
            results = {
                "prefill": _throughput(model, tok, prompts=16, prompt_len=1024, max_tokens=1),
                "decode": _throughput(model, tok, prompts=32, prompt_len=64, max_tokens=128),
            }
        finally:
            if tp > 1:
                model.close()
        for phase, tps in results.items():
            s.record(
                {
                    "kind": "throughput",
                    "name": f"tp_{phase}_7b_{GPU_LAYERS}layers",
                    "series": f"tp{tp}",
                    "concurrency": 16 if phase == "prefill" else 32,
                    "tokens_per_s": tps,
                    "layers": GPU_LAYERS,
                }
            )
        del model
        torch.cuda.empty_cache()
