"""Failures inside the engine, through the real servers: a worker whose engine fails on request
(``serve_faulty_worker.py``: a fault injected into the model runner) behind a controller, and
``fastllava serve`` supervising its worker.

- a request whose step raises gets a 500 naming its id (an error event once streaming) and the worker goes
  on serving the next request;
- a device error kills the engine: the worker answers 503, leaves the controller at once (long before its
  heartbeat would expire) and exits with status 3;
- ``fastllava serve`` restarts a worker that exits (SIGKILL here), logs it, and the new worker registers.
"""

from __future__ import annotations

import json
import os
import re
import signal
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
from serve_testing import cluster, data_url, msgs, ordinary_chat, png  # noqa: E402

from fastllava.default_model import random_model_path  # noqa: E402
from fastllava.serve.launcher import Proc, module_cmd  # noqa: E402

FAULTY = Path(__file__).with_name("serve_faulty_worker.py")
RED = data_url(png())


@pytest.fixture(scope="module")
def faulty():
    with cluster(random_model_path(), ["--heart-beat-expiration", 60], {"f": []}, worker_script=FAULTY) as c:
        c["worker"] = c["workers"]["f"]
        yield c


def _chat(url: str, **kw) -> httpx.Response:
    body = {"messages": msgs(RED), "max_tokens": 12, "temperature": 0, "ignore_eos": True, **kw}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=60)


def _events(url: str, **kw) -> list[str]:
    body = {"messages": msgs(RED), "max_tokens": 20, "temperature": 0, "ignore_eos": True, "stream": True, **kw}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        return [line[5:].strip() for line in r.iter_lines() if line.startswith("data:")]


@pytest.mark.parametrize("via", ["worker", "controller"])
def test_a_failed_request_is_a_500_with_its_id_and_the_worker_keeps_serving(faulty, via):
    r = _chat(faulty[via], stop=["FAULT-REQUEST"])
    assert r.status_code == 500, r.text
    err = r.json()["error"]
    assert err["code"] == "request_failed" and re.search(r"chatcmpl-[0-9a-f]{32}", err["message"]), err
    ordinary_chat(faulty[via])
    assert httpx.get(faulty["worker"] + "/health").status_code == 200
    assert "an injected fault" in faulty["procs"]["f"].log(10**6)  # the cause is in the worker's log


@pytest.mark.parametrize("via", ["worker", "controller"])
def test_a_failure_mid_stream_is_an_error_event(faulty, via):
    events = _events(faulty[via], stop=["FAULT-LATER"])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert any(c.get("choices") and c["choices"][0]["delta"].get("content") for c in chunks[:-1])  # tokens first
    assert chunks[-1]["error"]["code"] == "request_failed", chunks[-1]
    ordinary_chat(faulty[via])
    assert httpx.get(faulty["worker"] + "/health").status_code == 200


def test_a_dead_engine_takes_the_worker_out_and_it_exits_3(faulty):
    """Last in the module: the worker is gone afterwards."""
    ctl, proc = faulty["controller"], faulty["procs"]["f"]
    assert httpx.get(ctl + "/health").json()["workers"] == 1
    r = _chat(ctl, stop=["FAULT-DEVICE"])
    assert r.status_code == 503 and r.headers.get("retry-after"), r.text
    health = httpx.get(faulty["worker"] + "/health")  # it exits a second after answering
    assert health.status_code == 503 and health.json()["status"] == "unhealthy"
    assert httpx.get(ctl + "/health").json()["workers"] == 0  # dropped at once (heartbeats expire after 60 s)
    assert proc.popen.wait(30) == 3
    assert "exiting with status 3" in proc.log(10**6)


def test_fastllava_serve_restarts_a_worker_that_exits():
    tmp = Path(tempfile.mkdtemp(prefix="fastllava-test-supervise-"))
    job = Proc("serve", module_cmd("launcher", "--no-web", "--model-path", random_model_path(),
                                   "--log-dir", tmp / "logs"), tmp)  # fmt: skip
    try:
        _wait(lambda: "ready:" in job.log(10**6), job, 180)
        out = job.log(10**6)
        ctl = out.split("controller  ")[1].split()[0]
        pid = int(re.findall(r"worker pid (\d+)", out)[-1])
        os.kill(pid, signal.SIGKILL)
        _wait(lambda: "worker exited (-9); restarting it in 1s" in job.log(10**6), job, 30)
        _wait(lambda: {int(p) for p in re.findall(r"worker pid (\d+)", job.log(10**6))} - {pid}, job, 30)

        def answered() -> bool:
            r = httpx.post(ctl + "/v1/chat/completions", json={"messages": msgs(RED), "max_tokens": 2}, timeout=30)
            return r.status_code == 200

        _wait(answered, job, 120)  # the new worker loaded and registered again
        assert httpx.get(ctl + "/health").json()["workers"] == 1
    finally:
        assert job.stop() == 0


def _wait(cond, job: Proc, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert job.alive(), job.log()
        assert time.monotonic() < deadline, job.log()
        time.sleep(0.5)
