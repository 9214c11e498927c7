"""``serve.register_worker`` and ``serve.test_message`` (LLaVA's names and arguments) against a running
controller + worker, beside LLaVA's own scripts (llava-torch 1.2.2) doing the same: both register the worker,
both find it through the controller and stream an answer, and they print the same discovery lines."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
pytest.importorskip("llava.serve")  # `pip install --no-deps llava-torch==1.2.2.post1`

from fastllava.default_model import default_model_path  # noqa: E402
from fastllava.serve import register_worker, test_message  # noqa: E402
from fastllava.serve.launcher import Proc, free_port, module_cmd, wait_http  # noqa: E402


@pytest.fixture(scope="module")
def stack():
    """A controller without a worker token (loopback registration, as LLaVA's) and an unregistered worker."""
    tmp = Path(tempfile.mkdtemp(prefix="fastllava-test-llava-serve-"))
    cport, wport = free_port(), free_port()
    ctl, wrk = f"http://127.0.0.1:{cport}", f"http://127.0.0.1:{wport}"
    procs = [
        Proc("controller", module_cmd("controller", "--port", cport), tmp),
        Proc(
            "worker",
            module_cmd(
                "worker", "--port", wport, "--no-register", "--model-path", default_model_path(), "--device", "cpu"
            ),
            tmp,
        ),  # fmt: skip
    ]
    try:
        wait_http(ctl + "/health", procs[0])
        wait_http(wrk + "/health", procs[1])
        yield ctl, wrk
    finally:
        for p in procs:
            p.stop()


def _llava(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"llava.serve.{module}", *args], capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def test_register_worker_and_test_message_match_llavas(stack, capsys):
    ctl, wrk = stack
    model = default_model_path().name
    assert httpx.post(ctl + "/list_models").json()["models"] == []
    assert register_worker.main(["--controller-address", ctl, "--worker-name", wrk]) == 0
    assert httpx.post(ctl + "/list_models").json()["models"] == [model]
    theirs = _llava("register_worker", "--controller-address", ctl, "--worker-name", wrk, "--check-heart-beat")
    assert theirs.returncode == 0, theirs.stderr  # LLaVA's asserts a 200
    assert httpx.post(ctl + "/list_models").json()["models"] == [model]

    args = ["--controller-address", ctl, "--model-name", model, "--message", "How many shapes?"]
    theirs = _llava("test_message", *args, "--max-new-tokens", "8")
    assert theirs.returncode == 0, theirs.stderr
    capsys.readouterr()
    assert test_message.main([*args, "--max-new-tokens", "8"]) == 0
    ours = capsys.readouterr().out
    assert ours.splitlines()[:3] == theirs.stdout.splitlines()[:3]  # Models, worker_addr, the prompt's first line
    assert f"worker_addr: {wrk}" in ours
    # greedy, straight to the worker: the answer is the worker's own
    assert test_message.main(["--worker-address", wrk, "--model-name", model, "--temperature", "0",
                              "--conv-mode", "mistral_instruct", "--message", "How many shapes?"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert printed.endswith("\r\n") and printed.split("\r")[-2].strip()  # the answer so far, redrawn per frame


def test_register_worker_reports_a_refusal(stack, capsys):
    ctl, _ = stack
    assert register_worker.main(["--controller-address", ctl, "--worker-name", "http://127.0.0.1:9"]) == 1
    assert "registration refused: HTTP 400" in capsys.readouterr().err
