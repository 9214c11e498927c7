"""The overlapped engine (``EngineConfig.overlap_scheduling``) against the synchronous loop, on CPU; deltas.

On CPU the overlap logic runs with no real concurrency (a launched step is done when ``launch`` returns), so
what is checked is the logic: placeholders for the previous step's ids read on the device, requests finished
one step late with their extra token dropped, length-capped requests not rescheduled, prefix-cache blocks
registered once their ids are known. Oracle: the synchronous engine on the same requests, token for token,
text and finish reasons, including EOS-like stop ids, stop strings, seeded sampling, images, chunked prefill,
preemption under a tiny KV cache and the static-buffer (CUDA-graph-shaped) decode.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from test_engine import GREEDY, _assert_clean, _model, _requests  # the engine tests' models and requests

from fastllava.engine import AsyncLLMEngine, EngineConfig, LLMEngine, SamplingParams
from fastllava.tiny import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def anyres_model():
    return _model("llama", anyres=True)


def _run(model, tokenizer, reqs, overlap: bool, **cfg) -> tuple[dict, LLMEngine]:
    """Every request queued at once, stepped to the end: {id: (token_ids, text, finish_reason, streamed text)}."""
    eng = LLMEngine(model, tokenizer, EngineConfig(overlap_scheduling=overlap, **cfg))
    assert eng.overlap is overlap
    for i, (p, im, sp) in enumerate(reqs):
        eng.add_request(f"r{i}", p, im, sp)
    streamed: dict[str, list[str]] = {}
    tokens: dict[str, list[int]] = {}
    final = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            streamed.setdefault(out.request_id, []).append(out.delta_text)
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            assert out.num_output_tokens == len(tokens[out.request_id])
            if out.finished:
                assert out.token_ids == tokens[out.request_id]  # the deltas add up to the final list
                final[out.request_id] = (out.token_ids, out.text, out.finish_reason, "".join(streamed[out.request_id]))
            else:
                assert out.token_ids is None and out.text is None  # nothing O(length) per step
    _assert_clean(eng)
    assert len(final) == len(reqs)
    return final, eng


def _mixed(cfg, tokenizer, model, n: int, seed: int):
    """Greedy and seeded-sampling requests; some with stop ids that the greedy run shows they will hit, some
    with a stop string taken from the middle of their own greedy text (so they do stop, often mid-token)."""
    base = _requests(cfg, n, seed=seed, max_tokens=(6, 24))
    probe, _ = _run(model, tokenizer, base, overlap=False)
    reqs = []
    for i, (p, im, sp) in enumerate(base):
        ids, text, _, _ = probe[f"r{i}"]
        kw = dict(max_tokens=sp.max_tokens)
        if i % 3 == 1 and len(ids) > 4:
            kw["stop_token_ids"] = [ids[len(ids) // 2]]  # an "EOS" hit mid-answer
        elif i % 3 == 2 and len(text) > 8:
            kw["stop"] = [text[len(text) // 2 : len(text) // 2 + 3]]
        if i % 4 == 3:
            kw.update(temperature=0.8, top_p=0.9, top_k=50, seed=100 + i)
        else:
            kw.update(GREEDY)
            kw["ignore_eos"] = "stop_token_ids" not in kw
        reqs.append((p, im, SamplingParams(**kw)))
    return reqs


@pytest.mark.parametrize(
    "cfg",
    [
        dict(),
        dict(max_num_batched_tokens=37, max_num_seqs=12),  # chunked prefill mixed with decodes
        dict(block_size=4, num_blocks=64),  # preemption
        dict(static_decode_buffers=True, cuda_graph_max_batch_size=8, max_model_len=512),
    ],
    ids=["default", "chunked", "preempt", "static_buffers"],
)
def test_overlapped_equals_synchronous(cfg, anyres_model, tokenizer):
    reqs = _mixed(anyres_model.config, tokenizer, anyres_model, 16, seed=11)
    sync, eng_s = _run(anyres_model, tokenizer, reqs, overlap=False, **cfg)
    over, eng_o = _run(anyres_model, tokenizer, reqs, overlap=True, **cfg)
    assert over == sync
    reasons = [v[2] for v in sync.values()]
    assert reasons.count("stop") >= 4 and reasons.count("length") >= 4  # both ways of ending were exercised
    assert all(v[1] == v[3] for v in sync.values())  # streamed == final text
    if "num_blocks" in cfg:
        assert eng_s.metrics().num_preemptions > 0 and eng_o.metrics().num_preemptions > 0
    # the overlapped engine ran at most one extra step per request that stopped early, and no more
    assert eng_o.num_steps <= eng_s.num_steps + reasons.count("stop") + 1


def test_overlapped_prefix_cache_and_aborts(anyres_model, tokenizer):
    """A second turn hits the blocks the overlapped engine registered (their ids were placeholders when they
    ran); an abort while a step is in flight returns only tokens the host has seen."""
    reqs = _requests(anyres_model.config, 4, seed=12, max_tokens=(20, 21))
    for overlap in (False, True):
        eng = LLMEngine(anyres_model, tokenizer, EngineConfig(overlap_scheduling=overlap, block_size=4))
        first = eng.generate([r[0] for r in reqs], [r[1] for r in reqs], [r[2] for r in reqs])
        p, im, sp = reqs[0]
        turn2 = p + first[0].token_ids + [50, 51]
        hits = eng.block_manager.prefix_hits
        again = eng.generate([turn2], [im], sp)[0]
        computed = len(p) + len(first[0].token_ids) - 1  # the first turn's tokens with K/V in the cache
        assert eng.block_manager.prefix_hits - hits >= computed - 4  # all its full blocks
        fresh = LLMEngine(anyres_model, tokenizer, EngineConfig(enable_prefix_caching=False, block_size=4))
        assert again.token_ids == fresh.generate([turn2], [im], sp)[0].token_ids
        eng.add_request("a", p, im, SamplingParams(max_tokens=20, **GREEDY))
        for _ in range(5):
            eng.step()
        out = eng.abort_request("a")
        assert (
            out.finished and out.finish_reason == "abort" and out.token_ids == first[0].token_ids[: len(out.token_ids)]
        )
        assert all(t >= 0 for t in out.token_ids) and len(out.token_ids) == 5 - overlap  # 1 prefill + 4 decodes
        while eng.has_unfinished_requests():
            assert eng.step() == []  # the in-flight step's token for "a" is dropped
        _assert_clean(eng)


def test_full_outputs_on_request(anyres_model, tokenizer):
    """``full_outputs=True`` asks for the whole list and text on every output (the default streams deltas)."""
    eng = LLMEngine(anyres_model, tokenizer)
    p, im, _ = _requests(anyres_model.config, 1, seed=13)[0]
    eng.add_request("x", p, im, SamplingParams(max_tokens=6, full_outputs=True, **GREEDY))
    outs = [o for _ in range(8) for o in eng.step()]
    assert [len(o.token_ids) for o in outs] == list(range(1, 7))
    assert all(o.text == tokenizer.decode(o.token_ids, skip_special_tokens=True) for o in outs)


def test_length_capped_requests_are_not_rescheduled(anyres_model, tokenizer):
    """A request whose in-flight token is its last allowed one is not scheduled again: no extra step, and a
    request that fills the KV cache (and the context) exactly never asks for a block past it."""
    p, im, _ = _requests(anyres_model.config, 1, seed=14)[0]
    probe = LLMEngine(anyres_model, config=EngineConfig(block_size=4)).make_request(p, im)
    total = -(-(probe.num_prompt_tokens + 8) // 4) * 4  # a multiple of the block size
    cfg = dict(block_size=4, num_blocks=total // 4, max_model_len=total)
    sp = SamplingParams(max_tokens=total - probe.num_prompt_tokens, **GREEDY)
    outs = {}
    for overlap in (False, True):
        eng = LLMEngine(anyres_model, tokenizer, EngineConfig(overlap_scheduling=overlap, **cfg))
        outs[overlap] = eng.generate([p], [im], sp)[0]
        assert outs[overlap].finish_reason == "length" and eng.metrics().num_preemptions == 0
        assert eng.num_steps == sp.max_tokens  # one prefill, then one decode per further token
    assert outs[True].token_ids == outs[False].token_ids
    reqs = _requests(anyres_model.config, 12, seed=15)  # ignore_eos: every request ends by length
    _, eng_s = _run(anyres_model, tokenizer, reqs, overlap=False)
    _, eng_o = _run(anyres_model, tokenizer, reqs, overlap=True)
    assert eng_o.num_steps == eng_s.num_steps


@pytest.mark.parametrize("overlap", [False, True])
def test_streamed_equals_non_streamed(anyres_model, tokenizer, overlap):
    """Concurrent ``AsyncLLMEngine`` streams add up (deltas, new token ids, counts) to what the synchronous
    ``LLMEngine.generate`` returns for the same requests, stop strings and sampling included."""
    reqs = _mixed(anyres_model.config, tokenizer, anyres_model, 12, seed=17)
    prompts, images, params = (list(x) for x in zip(*reqs, strict=True))
    plain = LLMEngine(anyres_model, tokenizer).generate(prompts, images, params)
    eng = LLMEngine(anyres_model, tokenizer, EngineConfig(overlap_scheduling=overlap))
    engine = AsyncLLMEngine(eng)

    async def stream(i, p, im, sp):
        text, ids, last = "", [], None
        async for out in engine.generate_request(eng.make_request(p, im, sp, request_id=f"s{i}")):
            text, ids, last = text + out.delta_text, ids + out.new_token_ids, out
        assert last.num_output_tokens == len(ids) and last.token_ids == ids and last.text == text
        return ids, text, last.finish_reason

    async def main():
        got = await asyncio.gather(*[stream(i, *r) for i, r in enumerate(reqs)])
        await engine.shutdown()
        return got

    assert asyncio.run(main()) == [(o.token_ids, o.text, o.finish_reason) for o in plain]
    _assert_clean(eng)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_overlapped_equals_synchronous_cuda(tokenizer):
    """The real overlap: pinned copies and events, placeholders filled into the CUDA graphs' static inputs."""
    m = _model("llama", anyres=True).to("cuda")
    reqs = _mixed(m.config, tokenizer, m, 24, seed=16)
    sync, _ = _run(m, tokenizer, reqs, overlap=False)
    over, eng = _run(m, tokenizer, reqs, overlap=True)
    assert eng.runner.decode_graphs is not None and eng.runner.decode_graphs.num_replays > 0
    assert over == sync
