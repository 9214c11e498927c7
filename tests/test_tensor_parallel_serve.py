"""Tensor-parallel serving end to end (CPU, gloo): a worker started with ``--tensor-parallel-size 2`` answers
``/v1/chat/completions`` with the same greedy text as a ``--tensor-parallel-size 1`` worker (tiny llama with one
K/V head, fewer than the ranks), with an image and text-only, streamed and not; killing its follower rank ends
the request in flight with an error naming the dead rank, and the worker exits non-zero within seconds and
leaves its controller."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
from serve_testing import cluster, data_url, model_name, msgs, png  # noqa: E402

from fastllava.model.export import save_llava_hf  # noqa: E402
from fastllava.tiny import build_tiny_llava, build_tokenizer, tiny_config, tiny_image_processor  # noqa: E402


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    cfg = tiny_config("llama")
    cfg.text.num_key_value_heads = 1
    path = tmp_path_factory.mktemp("tp-serve") / "tiny-llava-tp"
    save_llava_hf(build_tiny_llava(cfg, seed=5, std=0.2), path, build_tokenizer(), tiny_image_processor(cfg))
    with cluster(path, workers={"one": [], "tp": ["--tensor-parallel-size", 2]}) as c:
        yield c


def _chat(url: str, messages: list, stream: bool, max_tokens: int = 12) -> str:
    body = {"model": model_name(url), "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    if not stream:
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text[:500]
        return r.json()["choices"][0]["message"]["content"]
    text = []
    with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data:") and line[5:].strip() != "[DONE]":
                for c in json.loads(line[5:])["choices"]:
                    text.append(c["delta"].get("content") or "")
    return "".join(text)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("with_image", [True, False])
def test_same_greedy_text_as_one_rank(stack, stream, with_image):
    messages = msgs(data_url(png((0, 200, 30)))) if with_image else msgs(text="How many shapes are there?")
    one, tp = stack["workers"]["one"], stack["workers"]["tp"]
    expected = _chat(one, messages, stream)
    assert expected  # a tiny random model that never stops early: something to compare
    assert _chat(tp, messages, stream) == expected


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def test_killing_a_rank_fails_the_request_and_the_worker_exits(stack):
    proc, url = stack["procs"]["tp"], stack["workers"]["tp"]
    (follower,) = _children(proc.popen.pid)
    events: list[str] = []
    started = threading.Event()

    def stream():
        body = {"model": model_name(url), "messages": msgs(text="Describe the image."), "max_tokens": 1500,
                "temperature": 0, "stream": True}  # fmt: skip
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    events.append(line[5:].strip())
                    started.set()

    t = threading.Thread(target=stream)
    t.start()
    assert started.wait(60)
    os.kill(follower, signal.SIGKILL)
    killed = time.monotonic()
    t.join(30)
    assert not t.is_alive()
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]  # a dead rank is a dead engine: the worker says it is restarting
    assert error["code"] == "worker_unhealthy" and "restarting" in error["message"], error
    code = proc.popen.wait(30)
    assert code == 3 and time.monotonic() - killed < 15
    # the controller no longer lists it
    deadline = time.monotonic() + 20
    while httpx.get(stack["controller"] + "/health").json()["workers"] != 1:
        assert time.monotonic() < deadline
        time.sleep(0.5)
