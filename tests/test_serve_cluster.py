"""Two workers behind a controller, as real processes: dispatch to both, and failover when one is killed.

Killing a worker (SIGKILL, no goodbye) while it streams: its in-flight streams end with an OpenAI error
event and ``[DONE]`` (never a hang or a torn connection), the other worker's streams finish, requests sent
before the controller notices are retried on the live worker (none lost), and after the heartbeat expiry
the dead worker is gone from the registry. A worker with the wrong token never gets registered.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from fastllava.default_model import random_model_path  # noqa: E402
from fastllava.serve.launcher import Proc, free_port, module_cmd, wait_http  # noqa: E402

TOKEN = "cluster-token"
EXPIRY = 4.0


@pytest.fixture(scope="module")
def cluster():
    model = random_model_path()  # the stack under test, on a model that never stops early
    tmp = Path(tempfile.mkdtemp(prefix="fastllava-test-cluster-"))
    env = {**os.environ, "FASTLLAVA_WORKER_TOKEN": TOKEN}
    cport = free_port()
    ctl_url = f"http://127.0.0.1:{cport}"
    procs = {"controller": Proc("controller", module_cmd("controller", "--port", cport, "--heart-beat-expiration",
                                                         EXPIRY), tmp, env)}  # fmt: skip
    urls = {}
    for name, token in (("a", TOKEN), ("b", TOKEN), ("intruder", "wrong-token")):
        port = free_port()
        urls[name] = f"http://127.0.0.1:{port}"
        cmd = module_cmd("worker", "--port", port, "--controller-address", ctl_url, "--model-path", model,
                         "--device", "cpu", "--heart-beat-interval", 1, "--worker-token", token)  # fmt: skip
        procs[name] = Proc(f"worker-{name}", cmd, tmp, env)
    try:
        wait_http(ctl_url + "/health", procs["controller"])
        for name in ("a", "b", "intruder"):
            wait_http(urls[name] + "/health", procs[name])
        wait_http(ctl_url + "/health", procs["controller"], ok=lambda r: r.json()["workers"] == 2, timeout=30)
        yield {"controller": ctl_url, "urls": urls, "procs": procs}
    finally:
        for p in procs.values():
            p.stop()


def _body(name: str, **kw) -> dict:
    msgs = [{"role": "user", "content": "Where is the circle?"}]
    return {"model": name, "messages": msgs, "temperature": 0, "ignore_eos": True, **kw}


def _model(ctl: str) -> str:
    return httpx.get(ctl + "/v1/models").json()["data"][0]["id"]


def test_wrong_token_worker_is_not_registered(cluster):
    time.sleep(1.5)  # a few of its registration attempts have been refused by now
    workers = httpx.get(cluster["controller"] + "/health").json()["workers"]
    assert workers == 2
    assert "HTTP 401" in cluster["procs"]["intruder"].log(100_000)


def test_requests_spread_over_both_workers(cluster):
    ctl = cluster["controller"]
    name = _model(ctl)

    async def run():
        async with httpx.AsyncClient(timeout=60) as c:
            rs = await asyncio.gather(*[c.post(ctl + "/v1/chat/completions", json=_body(name, max_tokens=40))
                                        for _ in range(8)])  # fmt: skip
        return rs

    rs = asyncio.run(run())
    assert all(r.status_code == 200 for r in rs)
    served = {r.headers["x-fastllava-worker"] for r in rs}
    assert served == {cluster["urls"]["a"], cluster["urls"]["b"]}
    assert len({r.json()["choices"][0]["message"]["content"] for r in rs}) == 1  # same greedy answer anywhere


def test_killing_a_worker_mid_load(cluster):
    ctl, urls = cluster["controller"], cluster["urls"]
    name = _model(ctl)
    victim, survivor = urls["a"], urls["b"]

    async def stream(c: httpx.AsyncClient, started: asyncio.Event, counter: list):
        async with c.stream("POST", ctl + "/v1/chat/completions", json=_body(name, max_tokens=600, stream=True)) as r:
            assert r.status_code == 200
            worker, events = r.headers["x-fastllava-worker"], []
            async for line in r.aiter_lines():
                if line.startswith("data:"):
                    events.append(line[5:].strip())
                    if len(events) == 1:
                        counter.append(1)
                        if len(counter) == 8:
                            started.set()
            return worker, events

    async def run():
        async with httpx.AsyncClient(timeout=120) as c:
            started, counter = asyncio.Event(), []
            tasks = [asyncio.create_task(stream(c, started, counter)) for _ in range(8)]
            await asyncio.wait_for(started.wait(), 60)
            cluster["procs"]["a"].popen.send_signal(signal.SIGKILL)  # no drain, no goodbye
            # and a registered worker that is already gone (empty queue: the first pick); nothing may be lost to it
            ghost = {"worker_name": f"http://127.0.0.1:{free_port()}", "check_heart_beat": True,
                     "worker_status": {"model_names": [name], "speed": 1, "queue_length": 0}}  # fmt: skip
            r = await c.post(ctl + "/register_worker", json=ghost, headers={"X-Worker-Token": TOKEN})
            assert r.status_code == 200
            # sent before the controller can know: each is retried on the survivor if it lands on the dead one
            late = [c.post(ctl + "/v1/chat/completions", json=_body(name, max_tokens=5)) for _ in range(6)]
            return await asyncio.gather(*tasks), await asyncio.gather(*late)

    streams, late = asyncio.run(run())
    on_victim = [ev for w, ev in streams if w == victim]
    on_survivor = [ev for w, ev in streams if w == survivor]
    assert on_victim and on_survivor
    for ev in on_victim:  # a clean error event, then [DONE]
        assert ev[-1] == "[DONE]"
        err = json.loads(ev[-2])["error"]
        assert err["code"] == "worker_failed" and victim in err["message"]
    for ev in on_survivor:
        chunks = [json.loads(e) for e in ev[:-1]]
        assert ev[-1] == "[DONE]" and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert [r.status_code for r in late] == [200] * 6
    assert {r.headers["x-fastllava-worker"] for r in late} == {survivor}
    retries = [
        ln for ln in httpx.get(ctl + "/metrics").text.splitlines() if ln.startswith("fastllava_controller_retries")
    ]
    assert float(retries[0].split()[-1]) >= 1
    # after the expiry only the survivor is registered, and new requests go there
    wait_http(ctl + "/health", ok=lambda r: r.json()["workers"] == 1, timeout=EXPIRY + 5)
    client = openai.OpenAI(base_url=ctl + "/v1", api_key="none", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model=name, messages=_body(name)["messages"], max_tokens=3)
    assert raw.headers["x-fastllava-worker"] == survivor and raw.parse().choices[0].finish_reason
