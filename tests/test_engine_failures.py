"""Admission checks and failure isolation: no request can break the engine, and a broken engine says so.

``SamplingParams`` / ``make_request`` refuse every out-of-range value with a ValueError naming the field (the
values issue 23 used to kill a worker: top_k and seeds past int64); the asyncio engine, driven by a model
runner and a detokenizer that raise on purpose (CPU), fails the affected requests alone and goes on serving,
and turns device errors, unattributable errors and repeated failures into ``EngineDeadError`` + ``on_dead``.
"""

from __future__ import annotations

import asyncio
import math

import pytest
from test_engine import GREEDY, _assert_clean, _model  # the engine tests' tiny model

from fastllava.engine import (
    AsyncLLMEngine,
    EngineConfig,
    EngineDeadError,
    LLMEngine,
    RequestFailedError,
    RequestTooLargeError,
    SamplingParams,
)
from fastllava.tiny import build_tokenizer

PROMPT = [1, 20, 30, 40, 50]


@pytest.fixture(scope="module")
def model():
    return _model("llama")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


# ------------------------------------------------------------------------------------------------ admission
@pytest.mark.parametrize(
    "field,value",
    [
        ("max_tokens", 0),
        ("max_tokens", 2**63),
        ("max_tokens", 1.5),
        ("max_tokens", True),
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("temperature", "1"),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_p", math.nan),
        ("top_k", -1),
        ("top_k", 2**63),
        ("top_k", 10000000000000000000),
        ("top_k", 3.0),
        ("seed", 2**63),
        ("seed", -(2**63) - 1),
        ("seed", "7"),
        ("stop", "###"),
        ("stop", [1]),
        ("stop_token_ids", [-1]),
        ("stop_token_ids", [2**63]),
    ],
)
def test_sampling_params_bounds(field, value):
    with pytest.raises(ValueError, match=f"^{field} must"):
        SamplingParams(**{field: value})


def test_extreme_valid_values_run_in_a_step(model, tokenizer):
    """What used to raise inside ``engine.step`` (int64 overflow in the sampling tensors) is refused at
    admission, and the extremes that pass run."""
    vocab = model.config.text.vocab_size
    eng = LLMEngine(model, tokenizer)
    with pytest.raises(ValueError, match="^top_k must be <= the vocabulary size"):
        eng.make_request(PROMPT, params=SamplingParams(top_k=vocab + 1, temperature=1.0))
    params = [
        SamplingParams(max_tokens=4, temperature=1.0, top_k=vocab, seed=2**63 - 1),
        SamplingParams(max_tokens=4, temperature=1e-3, top_p=1e-9, seed=-(2**63)),
        SamplingParams(max_tokens=4, temperature=2.0, top_k=1, seed=0),
    ]
    outs = eng.generate([PROMPT] * 3, params=params)
    assert all(len(o.token_ids) == 4 for o in outs)
    _assert_clean(eng)


def test_request_too_large_names_the_field_and_clamp(model):
    eng = LLMEngine(model, config=EngineConfig(block_size=4, num_blocks=16, max_model_len=40))
    with pytest.raises(RequestTooLargeError) as e:
        eng.make_request([1] + list(range(10, 49)))
    assert e.value.param == "messages"
    with pytest.raises(RequestTooLargeError) as e:
        eng.make_request(PROMPT, params=SamplingParams(max_tokens=100))
    assert e.value.param == "max_tokens" and isinstance(e.value, ValueError)
    params = SamplingParams(max_tokens=100)
    req = eng.make_request(PROMPT, params=params, clamp_max_tokens=True)
    assert req.params.max_tokens == 40 - len(PROMPT) and params.max_tokens == 100  # the caller's params untouched
    small = LLMEngine(model, config=EngineConfig(block_size=4, num_blocks=4, max_model_len=40))
    with pytest.raises(RequestTooLargeError) as e:  # the context has room, the KV cache has not
        small.make_request(PROMPT, params=SamplingParams(max_tokens=30))
    assert e.value.param == "max_tokens"
    with pytest.raises(RequestTooLargeError) as e:
        small.make_request([1] + list(range(10, 28)), params=SamplingParams(max_tokens=1))
    assert e.value.param == "messages"


# ---------------------------------------------------------------------------------------- failure isolation
async def _collect(engine: AsyncLLMEngine, req) -> tuple[str, BaseException | None]:
    text = ""
    try:
        async for out in engine.generate_request(req):
            text += out.delta_text
    except (RequestFailedError, EngineDeadError) as e:
        return text, e
    return text, None


def _fault_on(eng: LLMEngine, bad: str, error: Exception, where: str):
    """Make the runner raise on every step that runs request ``bad`` (a fault no admission check foresaw), when it
    launches the step or when it collects its sampled ids (the overlapped engine does that one call later)."""
    launch, collect = eng.runner.launch, eng.runner.collect

    def faulty_launch(out, tables):
        if any(r.request_id == bad for r in [c.request for c in out.prefills] + out.decodes):
            raise error
        return launch(out, tables)

    def faulty_collect(handle):
        if any(r.request_id == bad for r in handle.requests):
            raise error
        return collect(handle)

    if where == "launch":
        eng.runner.launch = faulty_launch
    else:
        eng.runner.collect = faulty_collect


@pytest.mark.parametrize("overlap,where", [(False, "launch"), (True, "launch"), (True, "collect")])
def test_failed_request_fails_alone_and_the_next_is_answered(model, tokenizer, overlap, where):
    eng = LLMEngine(model, tokenizer, EngineConfig(overlap_scheduling=overlap))
    expected = eng.generate([PROMPT], params=SamplingParams(max_tokens=12, **GREEDY))[0].text
    dead = []
    engine = AsyncLLMEngine(eng, on_dead=dead.append)
    _fault_on(eng, "bad", IndexError("index 7 is out of bounds"), where)

    async def main():
        sp = SamplingParams(max_tokens=12, **GREEDY)
        # 1. a step that raises fails the request it ran; the engine goes on
        # (one token: in the overlapped engine it is collected in a step that does not run it any more)
        one = SamplingParams(max_tokens=1, **GREEDY)
        text, err = await _collect(engine, eng.make_request(PROMPT, params=one, request_id="bad"))
        assert isinstance(err, RequestFailedError) and err.request_id == "bad" and "out of bounds" in str(err)
        assert engine.is_healthy and engine.dead_error is None
        assert (await _collect(engine, eng.make_request(PROMPT, params=sp, request_id="next"))) == (expected, None)
        # 2. host-side work of one request that raises (its detokenizer) fails it alone, in a shared step
        poisoned = eng.make_request(PROMPT, params=sp, request_id="poisoned")
        poisoned.detokenizer.add = lambda n: 1 / 0
        results = await asyncio.gather(
            *[_collect(engine, eng.make_request(PROMPT, params=sp, request_id=f"ok{i}")) for i in range(3)],
            _collect(engine, poisoned),
        )
        assert results[:3] == [(expected, None)] * 3
        assert isinstance(results[3][1], RequestFailedError) and results[3][1].request_id == "poisoned"
        await engine.shutdown()

    asyncio.run(main())
    assert not dead and engine.num_failed_steps == 1 and eng.num_failed == 2
    _assert_clean(eng)


@pytest.mark.parametrize(
    "error,steps",
    [
        (RuntimeError("CUDA error: an illegal memory access was encountered"), 1),  # device error: at once
        (ValueError("shape mismatch"), 3),  # keeps failing: after max_consecutive_failures
    ],
)
def test_fatal_errors_mark_the_engine_dead(model, tokenizer, error, steps):
    eng = LLMEngine(model, tokenizer)
    dead: list[BaseException] = []
    engine = AsyncLLMEngine(eng, on_dead=dead.append, max_consecutive_failures=3)
    launch = eng.runner.launch

    def always(out, tables):
        raise error

    eng.runner.launch = always

    async def main():
        sp = SamplingParams(max_tokens=8, **GREEDY)
        results = []
        for i in range(steps):  # one failed step per request, until the engine gives up
            results.append(await _collect(engine, eng.make_request(PROMPT, params=sp, request_id=f"r{i}")))
        assert all(isinstance(e, RequestFailedError) for _, e in results[:-1])
        assert isinstance(results[-1][1], EngineDeadError)
        assert not engine.is_healthy and engine.dead_error is error and dead == [error]
        eng.runner.launch = launch  # even a working runner is not trusted again
        with pytest.raises(EngineDeadError):
            async for _ in engine.generate(PROMPT, params=sp):
                pass
        with pytest.raises(EngineDeadError):
            async for _ in engine.generate_request(eng.make_request(PROMPT, params=sp)):
                pass

    asyncio.run(main())
    assert dead == [error]  # called once


def test_unattributable_error_is_fatal_and_reaches_every_stream(model, tokenizer):
    """An error before any request was scheduled (the scheduler itself) leaves the engine's state in doubt."""
    eng = LLMEngine(model, tokenizer)
    dead = []
    engine = AsyncLLMEngine(eng, on_dead=dead.append)
    schedule = eng.scheduler.schedule
    calls = []

    def broken():
        calls.append(1)
        if len(calls) == 4:
            raise KeyError("bookkeeping")
        return schedule()

    eng.scheduler.schedule = broken

    async def main():
        sp = SamplingParams(max_tokens=30, **GREEDY)
        return await asyncio.gather(*[_collect(engine, eng.make_request(PROMPT, params=sp)) for _ in range(3)])

    results = asyncio.run(main())
    assert all(isinstance(e, EngineDeadError) for _, e in results) and len(dead) == 1
    assert isinstance(engine.dead_error, KeyError)
    assert not eng.scheduler.requests  # everything was aborted and freed
