"""The continuous-batching engine (fastllava/engine) on tiny fp32 models, CPU.

Oracles: each request run alone through the engine (batch invariance, token for token), the static
``model.generate`` loop, a forward hook counting vision-tower runs, and the block/encoder-cache bookkeeping
returning to zero. Models use ``std=0.1`` weights so that outputs depend on the whole prompt and its images
(with the default tiny weights the next token is a function of the last token alone, and a test of batching
could not fail).
"""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from fastllava.constants import IMAGE_TOKEN_INDEX
from fastllava.engine import (
    AsyncLLMEngine,
    EngineConfig,
    EngineImage,
    LLMEngine,
    QueueFullError,
    RequestTooLargeError,
    SamplingParams,
)
from fastllava.engine.decode_graphs import decode_buckets
from fastllava.packing import image_tiles
from fastllava.tiny import build_tiny_llava, build_tokenizer, tiny_config

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _model(family: str = "llama", anyres: bool = False):
    return build_tiny_llava(tiny_config(family, anyres=anyres), seed=0, std=0.1).eval()


@pytest.fixture(scope="module")
def anyres_model():
    return _model("llama", anyres=True)


@pytest.fixture(scope="module")
def model():
    return _model("mistral")  # sliding window 48: exercised by prompts + outputs longer than that


def _image(cfg, seed: int, size_hw=(32, 32)) -> EngineImage:
    g = torch.Generator().manual_seed(seed)
    tiles = image_tiles(cfg, size_hw)
    return EngineImage(torch.randn(tiles, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g), size_hw)


def _requests(cfg, n: int, seed: int, max_tokens=(4, 14)):
    """Mixed prompts: text-only, one image, two images; varied lengths, sizes and max_tokens."""
    rng = random.Random(seed)
    sizes = [(32, 32), (32, 64), (64, 32), (48, 80)] if cfg.is_anyres else [(32, 32)]
    pool = [_image(cfg, 100 + i, sizes[i % len(sizes)]) for i in range(6)]  # shared images across requests
    out = []
    for i in range(n):
        ids = [1] + [rng.randrange(5, cfg.text.vocab_size) for _ in range(rng.randrange(2, 30))]
        kind = i % 4  # 0 text-only, 1-2 one image, 3 two images
        imgs = [] if kind == 0 else rng.sample(pool, 2 if kind == 3 else 1)
        for _ in imgs:
            ids.insert(rng.randrange(1, len(ids) + 1), IMAGE_TOKEN_INDEX)
        out.append((ids, imgs, SamplingParams(max_tokens=rng.randrange(*max_tokens), **GREEDY)))
    return out


def _run_alone(model, reqs, **cfg):
    eng = LLMEngine(model, config=EngineConfig(enable_prefix_caching=False, **cfg))
    return [eng.generate([p], [im], sp)[0].token_ids for p, im, sp in reqs]


def _run_together(model, reqs, **cfg):
    eng = LLMEngine(model, config=EngineConfig(**cfg))
    outs = eng.generate([r[0] for r in reqs], [r[1] for r in reqs], [r[2] for r in reqs])
    _assert_clean(eng)
    return [o.token_ids for o in outs], eng


def _assert_clean(eng: LLMEngine) -> None:
    """Nothing leaked: every block free, no ref counts, no encoder-cache references, no request state."""
    bm = eng.block_manager
    assert bm.num_used_blocks == 0 and not bm.tables and not any(bm.ref_counts)
    assert len(bm.free) == bm.num_blocks
    assert eng.encoder_cache.num_refs == 0
    assert all(e.features is not None for e in eng.encoder_cache._entries.values())  # no orphan placeholders
    assert not eng.scheduler.requests and not eng.scheduler.running and not eng.scheduler.waiting
    assert eng.scheduler.waiting_tokens == 0


# ---------------------------------------------------------------------------------------------- batching


@pytest.mark.parametrize("which", ["anyres_llama", "mistral"])
def test_batch_invariance_32_concurrent(which, anyres_model, model):
    m = anyres_model if which == "anyres_llama" else model
    reqs = _requests(m.config, 32, seed=1)
    alone = _run_alone(m, reqs)
    together, eng = _run_together(m, reqs)
    assert together == alone
    assert len({tuple(t) for t in alone}) > 16  # outputs really differ per request
    # small steps: chunked prefill (chunks cut images), prefill mixed with decode, at most 8 running
    chunked, eng2 = _run_together(m, reqs, max_num_batched_tokens=37, max_num_seqs=12)
    assert chunked == alone
    assert eng2.metrics().num_steps > eng.metrics().num_steps
    # the static generate loop agrees on a few (no image sharing / prefix caching there)
    for p, im, sp in reqs[:4]:
        ref = m.generate(
            torch.tensor([p]),
            pixel_values=[x.pixel_values for x in im] or None,  # transformers' call: sizes as (H, W)
            image_sizes=[x.size_hw for x in im] or None,
            max_new_tokens=sp.max_tokens,
            eos_token_id=[],
        )
        assert ref[0].tolist() == alone[reqs.index((p, im, sp))]


def test_chunked_prefill_equals_unchunked(model):
    reqs = _requests(model.config, 6, seed=2)
    full, _ = _run_together(model, reqs, enable_chunked_prefill=False)
    for budget in (3, 16):
        chunked, _ = _run_together(model, reqs, max_num_batched_tokens=budget)
        assert chunked == full, budget


def test_preemption_under_tiny_cache(anyres_model):
    reqs = _requests(anyres_model.config, 16, seed=3, max_tokens=(10, 30))
    alone = _run_alone(anyres_model, reqs)
    # 4-token blocks; the largest request needs ~45 blocks alone, 16 together need far more than 64
    small, eng = _run_together(anyres_model, reqs, block_size=4, num_blocks=64)
    assert eng.metrics().num_preemptions > 0
    assert small == alone


# ------------------------------------------------------------------------------------------------ sampling


def test_seeded_sampling_reproducible_and_batch_invariant(model):
    reqs = _requests(model.config, 12, seed=4)
    params = [SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=40, seed=1000 + i) for i in range(12)]
    reqs = [(p, im, sp) for (p, im, _), sp in zip(reqs, params, strict=True)]
    alone = _run_alone(model, reqs)
    together, _ = _run_together(model, reqs)
    assert together == alone
    again, _ = _run_together(model, reqs)
    assert again == together
    greedy, _ = _run_together(model, [(p, im, SamplingParams(max_tokens=12, **GREEDY)) for p, im, _ in reqs])
    assert together != greedy  # sampling is not silently greedy
    other = [(p, im, SamplingParams(max_tokens=12, temperature=0.9, seed=7 + i)) for i, (p, im, _) in enumerate(reqs)]
    assert _run_together(model, other)[0] != together


def test_stop_token_eos_and_stop_strings(model, tokenizer):
    eng = LLMEngine(model, tokenizer)
    prompt = [1] + list(range(40, 60))
    full = eng.generate([prompt], params=SamplingParams(max_tokens=16, **GREEDY))[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 16
    k = next(i for i in range(3, 16) if full.token_ids[i] not in full.token_ids[:i])
    stop_tok = full.token_ids[k]
    out = eng.generate([prompt], params=SamplingParams(max_tokens=16, stop_token_ids=[stop_tok]))[0]
    assert out.token_ids == full.token_ids[: k + 1] and out.finish_reason == "stop"
    eng.eos_token_ids = {stop_tok}  # the model's EOS (default stop_token_ids)
    assert eng.generate([prompt], params=SamplingParams(max_tokens=16))[0].token_ids == full.token_ids[: k + 1]
    assert len(eng.generate([prompt], params=SamplingParams(max_tokens=16, ignore_eos=True))[0].token_ids) == 16
    # stop string: cut the text at its first occurrence, finish early, stream exactly the kept text
    text = full.text
    start = next(i for i in range(len(text) // 3, len(text) - 3) if "\ufffd" not in text[i : i + 3])
    stop = text[start : start + 3]
    eng.eos_token_ids = set()
    eng.add_request("s", prompt, params=SamplingParams(max_tokens=16, stop=[stop]))
    deltas, last = [], None
    while eng.has_unfinished_requests():
        for o in eng.step():
            deltas.append(o.delta_text)
            last = o
    assert last.finished and last.finish_reason == "stop"
    assert last.text == text[: text.find(stop)] == "".join(deltas)
    assert len(last.token_ids) < 16
    _assert_clean(eng)


# ------------------------------------------------------------------------------------- aborts and limits


def test_abort_hundreds_at_random_points_leaks_nothing(anyres_model):
    rng = random.Random(5)
    eng = LLMEngine(anyres_model, config=EngineConfig(block_size=4, num_blocks=96, max_num_batched_tokens=64))
    reqs = _requests(anyres_model.config, 200, seed=5, max_tokens=(2, 10))
    pending, aborted, finished = list(enumerate(reqs)), 0, 0
    while pending or eng.has_unfinished_requests():
        for _ in range(rng.randrange(0, 12)):
            if pending:
                i, (p, im, sp) = pending.pop()
                eng.add_request(f"r{i}", p, im, sp)
        live = list(eng.scheduler.requests)
        for rid in rng.sample(live, k=min(len(live), rng.randrange(0, 4))):  # waiting, prefilling or decoding
            assert eng.abort_request(rid).finish_reason == "abort"
            aborted += 1
        finished += sum(o.finished for o in eng.step())
    assert aborted > 80 and finished > 40
    assert eng.metrics().num_aborted == aborted
    assert eng.abort_request("r0") is None  # already gone: no-op
    _assert_clean(eng)


def test_request_too_large_and_queue_bounds(model):
    eng = LLMEngine(model, config=EngineConfig(block_size=4, num_blocks=8, max_waiting_requests=3))
    with pytest.raises(RequestTooLargeError, match="8 blocks of 4 tokens"):
        eng.add_request(None, [1] * 20, params=SamplingParams(max_tokens=16))
    with pytest.raises(RequestTooLargeError, match="context"):
        eng.add_request(None, [1] * 5000)
    for i in range(3):
        eng.add_request(f"q{i}", [1, 2, 3], params=SamplingParams(max_tokens=2))
    with pytest.raises(QueueFullError, match="queue full"):
        eng.add_request("q3", [1, 2, 3], params=SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="already in use"):
        eng.scheduler.add(eng.make_request([1, 2], params=SamplingParams(max_tokens=2), request_id="q0"))
    cfg = model.config
    img = _image(cfg, 0)
    eng = LLMEngine(model, config=EngineConfig(max_waiting_tokens=40))
    eng.add_request(None, [1, IMAGE_TOKEN_INDEX, 5], [img])  # 2 + 16 image slots = 18 tokens
    eng.add_request(None, [1, IMAGE_TOKEN_INDEX, 5], [img])
    with pytest.raises(QueueFullError, match="image tokens counted"):
        eng.add_request(None, [1, IMAGE_TOKEN_INDEX, 5], [img])
    assert eng.metrics().num_rejected == 1
    with pytest.raises(ValueError, match="image"):
        eng.add_request(None, [1, IMAGE_TOKEN_INDEX, 5])  # placeholder without an image


# ------------------------------------------------------------------------------- prefix and encoder caches


def test_second_turn_skips_vision_tower_and_shared_prefix(anyres_model):
    m, cfg = anyres_model, anyres_model.config
    runs = []
    hook = m.vision_tower.register_forward_hook(lambda *a: runs.append(1))
    try:
        img = _image(cfg, 7, (32, 64))
        same = EngineImage(img.pixel_values.clone(), img.size_hw)  # the resent image: same content, new object
        turn1 = [1, 30, 31, 32, IMAGE_TOKEN_INDEX, 40, 41, 42, 43]
        eng = LLMEngine(m, config=EngineConfig(block_size=4))
        out1 = eng.generate([turn1], [[img]], SamplingParams(max_tokens=10, **GREEDY))[0]
        assert len(runs) == 1
        before = eng.metrics()
        turn2 = turn1 + out1.token_ids + [50, 51, 52, 53, 54]
        out2 = eng.generate([turn2], [[same]], SamplingParams(max_tokens=10, **GREEDY))[0]
        after = eng.metrics()
        assert len(runs) == 1  # vision tower not run again
        n2 = len(turn2) - 1 + out1.metrics.num_prompt_tokens - len(turn1) + 1  # expanded turn-2 length
        hit = after.prefix_cache_hits - before.prefix_cache_hits
        shared = out1.metrics.num_prompt_tokens + 10 - 1  # turn 1's computed tokens
        assert hit == shared // 4 * 4  # every full block of turn 1 reused
        assert after.num_prompt_tokens_computed - before.num_prompt_tokens_computed == n2 - hit
        assert out2.metrics.num_cached_tokens == hit
        cold = LLMEngine(m, config=EngineConfig(block_size=4, enable_prefix_caching=False))
        assert cold.generate([turn2], [[same]], SamplingParams(max_tokens=10, **GREEDY))[0].token_ids == out2.token_ids
        assert len(runs) == 2
        # a different image with the same text: only the blocks before it are shared, and it is encoded
        other = _image(cfg, 8, (32, 64))
        h0 = eng.metrics().prefix_cache_hits
        out3 = eng.generate([turn2], [[other]], SamplingParams(max_tokens=10, **GREEDY))[0]
        assert len(runs) == 3
        assert eng.metrics().prefix_cache_hits - h0 == 4  # block 0 = [1, 30, 31, 32]; block 1 holds image rows
        assert out3.token_ids != out2.token_ids
        # encoder cache alone (prefix caching off): a resent image is not encoded again
        eng = LLMEngine(m, config=EngineConfig(enable_prefix_caching=False))
        eng.generate([turn1, turn1 + [60]], [[img], [same]], SamplingParams(max_tokens=3, **GREEDY))
        n = len(runs)
        eng.generate([turn1 + [61]], [[same]], SamplingParams(max_tokens=3, **GREEDY))
        assert len(runs) == n and eng.metrics().encoder_cache_hits >= 2
        _assert_clean(eng)
    finally:
        hook.remove()


# --------------------------------------------------------------------------------------- async and metrics


def test_async_engine_streams_aborts_and_reports_metrics(model, tokenizer):
    reqs = _requests(model.config, 8, seed=9, max_tokens=(6, 14))
    alone = _run_alone(model, reqs)
    eng = AsyncLLMEngine(LLMEngine(model, tokenizer))

    async def client(i, abort_after=None):
        p, im, sp = reqs[i]
        tokens, outs = [], []
        async for out in eng.generate(p, im, SamplingParams(**vars(sp)), request_id=f"c{i}"):
            tokens += out.new_token_ids
            outs.append(out)
            if abort_after is not None and len(tokens) >= abort_after:
                break
        return tokens, outs

    async def main():
        results = await asyncio.gather(*(client(i, abort_after=2 if i in (3, 6) else None) for i in range(8)))
        for _ in range(20):  # the aborts are applied by the loop between steps
            if not eng.engine.scheduler.requests:
                break
            await asyncio.sleep(0.01)
        with pytest.raises(RequestTooLargeError):
            await anext(eng.generate([1] * 5000))
        await eng.shutdown()
        return results

    results = asyncio.run(main())
    for i, (tokens, outs) in enumerate(results):
        if i in (3, 6):
            assert tokens == alone[i][:2]
            continue
        assert tokens == alone[i] and outs[-1].finished and outs[-1].finish_reason == "length"
        assert all(len(o.new_token_ids) == 1 for o in outs)  # streamed token by token
        m = outs[-1].metrics
        assert m.queue_time >= 0 and m.ttft >= m.queue_time and m.mean_itl > 0
        assert len(m.inter_token_latencies) == len(tokens) - 1 and m.num_output_tokens == len(tokens)
    em = eng.metrics()
    assert em.num_aborted == 2 and em.num_finished == 6 and em.num_running == em.num_waiting == 0
    assert em.kv_usage == 0.0 and em.num_generated_tokens >= sum(len(t) for t, _ in results)
    _assert_clean(eng.engine)


def test_engine_metrics_while_running(model):
    eng = LLMEngine(model, config=EngineConfig(max_num_seqs=4))
    for p, im, sp in _requests(model.config, 8, seed=10):
        eng.add_request(None, p, im, sp)
    eng.step()
    m = eng.metrics()
    assert m.num_running == 4 and m.num_waiting == 4 and 0 < m.kv_usage < 1 and m.kv_blocks_used > 0
    assert m.num_steps == 1 and m.num_generated_tokens == 4 and m.encoder_images_run > 0


def test_nf4_quantized_model_runs_unchanged():
    quantization = pytest.importorskip("fastllava.quantization")
    m = quantization.quantize_model_(_model("llama"))  # module swap at load time: the engine is unaware
    assert any(type(x).__name__ == "Linear4bit" for x in m.modules())
    reqs = _requests(m.config, 8, seed=11)
    together, _ = _run_together(m, reqs)
    assert together == _run_alone(m, reqs)


# ---------------------------------------------------------------------------- CUDA graphs / bucketed decode


def test_decode_buckets():
    assert decode_buckets(1) == [1]
    assert decode_buckets(3) == [1, 2, 3]
    assert decode_buckets(12) == [1, 2, 4, 8, 12]
    assert decode_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    with pytest.raises(ValueError):
        decode_buckets(0)


def _drive(m, reqs, spy=None, **cfg):
    """Requests arriving at staggered steps (decode batches of every size), the one with id ``r1`` aborted
    after 3 tokens; returns every request's tokens (the aborted one's partial) and the engine."""
    eng = LLMEngine(m, config=EngineConfig(max_num_seqs=12, max_num_batched_tokens=37, **cfg))
    if spy is not None:
        spy(eng)
    tokens, pending, step = {}, list(enumerate(reqs)), 0
    while pending or eng.has_unfinished_requests():
        for _ in range(4 if step == 0 else 1 + step % 2):
            if pending:
                i, (p, im, sp) = pending.pop(0)
                eng.add_request(f"r{i}", p, im, SamplingParams(**vars(sp)))
        r1 = eng.scheduler.requests.get("r1")
        if r1 is not None and len(r1.output_token_ids) >= 3:
            tokens["r1"] = eng.abort_request("r1").token_ids
        for out in eng.step():
            tokens[out.request_id] = out.token_ids
        step += 1
    _assert_clean(eng)
    return tokens, eng


def _mixed_requests(cfg, n: int, seed: int):
    reqs = _requests(cfg, n, seed=seed, max_tokens=(3, 24))
    for k in (2, 5):  # two seeded sampling requests: the graphs' logits feed the same sampler
        p, im, sp = reqs[k]
        reqs[k] = (p, im, SamplingParams(max_tokens=sp.max_tokens, temperature=0.8, top_k=20, seed=k, ignore_eos=True))
    return reqs


def _count_decode_paths(eng, seen: list[tuple[int, bool]]) -> None:
    """Record (batch size, ran bucketed) for every decode step."""
    graphs = eng.runner.decode_graphs
    real_run = graphs.run

    def run(reqs, tables):
        logits = real_run(reqs, tables)
        seen.append((len(reqs), logits is not None))
        return logits

    graphs.run = run


@pytest.mark.parametrize("which", ["anyres_llama", "mistral"])
def test_bucketed_decode_matches_eager(which, anyres_model, model):
    """The graphs' static-buffer path without capture (CPU): the same tokens as eager decode, token for token,
    across chunked prefill mixed with decode, images, staggered arrivals and finishes, an abort, and batches
    bigger than the largest bucket (those fall back to eager)."""
    m = anyres_model if which == "anyres_llama" else model
    reqs = _mixed_requests(m.config, 20, seed=12)
    eager, eng = _drive(m, reqs)
    assert eng.runner.decode_graphs is None and eng.runner.kv.num_blocks == eng.block_manager.num_blocks
    seen: list[tuple[int, bool]] = []
    bucketed, eng = _drive(
        m,
        reqs,
        spy=lambda e: _count_decode_paths(e, seen),
        static_decode_buffers=True,
        cuda_graph_max_batch_size=8,
        max_model_len=512,
    )
    assert bucketed == eager
    assert len(eager["r1"]) == 3 and len(eager) == 20
    assert len({tuple(t) for t in eager.values()}) > 10  # outputs really differ per request
    graphs = eng.runner.decode_graphs
    assert graphs.buckets == [1, 2, 4, 8] and graphs.num_replays == 0  # no capture on CPU
    sizes = {b for b, ran in seen if ran}
    assert sizes - {1, 2, 4, 8} and graphs.num_padded_rows > 0  # padded up to a bucket
    assert all(ran == (b <= 8) for b, ran in seen) and any(b > 8 for b, _ in seen)  # > 8: eager
    assert eng.runner.kv.num_blocks == eng.block_manager.num_blocks + 1  # + the scratch block


def _check_writes(eng, log: list[int]) -> None:
    """Wrap ``runner.execute``: each step may change only the KV slots of its scheduled tokens in real blocks.
    Appends the number of real slots changed per step to ``log``."""
    runner, bs = eng.runner, eng.block_manager.block_size
    real_blocks = eng.block_manager.num_blocks
    real_execute = runner.execute

    def execute(out, tables):
        def slot(req, p):
            return tables[req.request_id][p // bs] * bs + p % bs

        allowed = {slot(c.request, p) for c in out.prefills for p in range(c.start, c.start + c.num_tokens)}
        allowed |= {slot(r, r.num_computed_tokens) for r in out.decodes}
        before = [t.clone() for t in runner.kv.k + runner.kv.v]
        sampled = real_execute(out, tables)
        changed = torch.zeros(runner.kv.num_blocks, bs, dtype=torch.bool, device=before[0].device)
        for old, new in zip(before, runner.kv.k + runner.kv.v, strict=True):
            changed |= (old != new).flatten(2).any(-1)
        real = set(changed[:real_blocks].flatten().nonzero().flatten().tolist())
        assert real <= allowed, f"slots {sorted(real - allowed)} written by no scheduled token"
        log.append(len(real))
        return sampled

    runner.execute = execute


def test_bucketed_decode_padding_writes_only_the_scratch_block(anyres_model):
    """Padding rows never write a real KV block (small blocks, a small cache: blocks are reused, requests
    preempted); they write the scratch block's slot 0 only."""
    reqs = _mixed_requests(anyres_model.config, 14, seed=13)
    log: list[int] = []
    cfg = dict(block_size=4, num_blocks=80, max_model_len=256)
    out, eng = _drive(anyres_model, reqs, spy=lambda e: _check_writes(e, log), static_decode_buffers=True, **cfg)
    graphs = eng.runner.decode_graphs
    assert graphs.num_padded_rows > 0 and sum(log) > 500
    assert out == _drive(anyres_model, reqs, **cfg)[0]
    scratch = [t[graphs.scratch_block] for t in eng.runner.kv.k + eng.runner.kv.v]  # (bs, Hk, D) each
    assert all(s[0].abs().sum() > 0 and not s[1:].any() for s in scratch)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_graph_decode_matches_eager_gpu(dtype):
    """Real capture and replay: the same tokens as the static path without capture (same kernels, same shapes)
    and, in fp32, as eager decode (≥ 90% of requests); the replay makes no host sync; padding never writes a
    real block."""
    m = _model("mistral").to("cuda", dtype)
    reqs = _mixed_requests(m.config, 20, seed=14)
    eager, _ = _drive(m, reqs, cuda_graphs=False)
    static, _ = _drive(m, reqs, static_decode_buffers=True, cuda_graph_max_batch_size=8)
    seen: list[tuple[int, bool]] = []
    log: list[int] = []

    def spy(eng):
        _check_writes(eng, log)
        _count_decode_paths(eng, seen)
        graphs = eng.runner.decode_graphs
        real_run = graphs.run

        def run(reqs, tables):
            torch.cuda.set_sync_debug_mode("error")
            try:
                return real_run(reqs, tables)
            finally:
                torch.cuda.set_sync_debug_mode("default")

        graphs.run = run

    graphed, eng = _drive(m, reqs, spy=spy, cuda_graph_max_batch_size=8)
    graphs = eng.runner.decode_graphs
    assert sorted(graphs.graphs) == graphs.buckets == [1, 2, 4, 8]
    assert graphs.num_replays == sum(ran for _, ran in seen) > 0 and any(not ran for _, ran in seen)
    assert graphed == static
    if dtype == torch.float32:
        # eager decode runs its GEMMs at the true batch size, the graphs at the padded bucket size: cuBLAS may
        # pick other kernels there, so a greedy near-tie can flip (a broken graph gets nearly all wrong)
        assert graphed.keys() == eager.keys() and sum(graphed[k] == eager[k] for k in eager) >= 0.9 * len(eager)
    assert sum(log) > 0


def test_failed_graph_capture_falls_back_to_eager_decode(model, monkeypatch, caplog):
    """An op that cannot be captured must not take serving down: the runner decodes eagerly and says why."""
    from fastllava.engine import runner as R
    from fastllava.engine.encoder_cache import EncoderCache

    def refuse(*a, **k):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(R, "DecodeGraphs", refuse)
    with caplog.at_level("WARNING", logger=R.__name__):
        run = R.ModelRunner(model, 16, 16, EncoderCache(1 << 20), decode_max_batch=8, capture_graphs=True)
    assert run.decode_graphs is None and "decoding eagerly" in caplog.text
    with pytest.raises(RuntimeError, match="stream is capturing"):  # the capture-free path has no excuse
        R.ModelRunner(model, 16, 16, EncoderCache(1 << 20), decode_max_batch=8, capture_graphs=False)
