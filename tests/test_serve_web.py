"""The main job (``fastllava serve``: controller + worker + web UI in one command) and the web UI in a real
browser: headless Chromium (Debian's ``chromium``) driven by Playwright, with the system browser as its
executable. Upload an image, ask, see the streamed answer; vote and find the conversation logged with the
image stored by hash; stop the job and see every part exit.

The web UI's failure messages (no worker, controller down) are checked in-process, without a browser.
"""

from __future__ import annotations

import json
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("gradio")
httpx = pytest.importorskip("httpx")
from PIL import Image  # noqa: E402

from fastllava.serve.launcher import Proc, free_port, module_cmd  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


@pytest.fixture(scope="module")
def main_job():
    tmp = Path(tempfile.mkdtemp(prefix="fastllava-test-web-"))
    port = free_port()
    job = Proc("fastllava-serve", module_cmd("main", "serve", "--port", port, "--log-dir", tmp / "logs"), tmp)
    deadline = time.monotonic() + 240
    while "ready:" not in job.log() and time.monotonic() < deadline:
        assert job.alive(), job.log()
        time.sleep(0.5)
    assert "ready:" in job.log(), job.log()
    try:
        yield {"job": job, "url": f"http://127.0.0.1:{port}", "logs": tmp / "logs", "tmp": tmp}
    finally:
        job.stop()


def test_main_job_prints_urls(main_job):
    out = main_job["job"].log()
    for part in ("controller  http://127.0.0.1:", "worker      http://127.0.0.1:", f"web UI      {main_job['url']}"):
        assert part in out
    ctl = out.split("controller  ")[1].split()[0]
    assert httpx.get(ctl + "/health").json()["workers"] == 1
    assert httpx.get(main_job["url"] + "/").status_code == 200


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package (apt-get install -y chromium)")
def test_web_ui_in_chromium(main_job):
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright Python package")
    image = main_job["tmp"] / "shape.png"
    Image.new("RGB", (64, 48), (0, 0, 255)).save(image)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(main_job["url"], wait_until="domcontentloaded")  # a Gradio page never reaches network idle
            page.wait_for_selector("#textbox textarea", timeout=60_000)
            selected = "(() => { const e = document.querySelector('#model_selector input'); return e && e.value; })()"
            page.wait_for_function(selected, timeout=30_000)
            page.set_input_files("#imagebox input[type=file]", str(image))
            page.wait_for_selector("#imagebox img", timeout=20_000)
            page.fill("#textbox textarea", "What color is the shape?")
            page.click("#send_btn")
            page.wait_for_selector("#chatbot .message.bot", timeout=60_000)
            page.wait_for_selector("#chatbot img", timeout=20_000)  # the upload is shown in the chat
            # streamed: the answer grows while the status says so, and is complete when it says "answered"
            page.wait_for_function("/generating|answered/.test(document.querySelector('#status').innerText)",
                                   timeout=60_000)  # fmt: skip
            page.wait_for_function("document.querySelector('#status').innerText.includes('answered')", timeout=120_000)
            answer = page.locator("#chatbot .message.bot").last.inner_text().strip()
            assert answer and "failed" not in answer and "No model" not in answer
            page.click("#upvote_btn")
            logs = main_job["logs"] / "web"
            deadline = time.monotonic() + 20
            while not list(logs.glob("conv-*.jsonl")) and time.monotonic() < deadline:
                time.sleep(0.2)
            record = json.loads(next(logs.glob("conv-*.jsonl")).read_text().splitlines()[-1])
            assert record["type"] == "upvote" and record["model"]
            sha = record["messages"][0]["content"][0]["sha256"]
            assert (logs / "images" / f"{sha}.png").is_file()
            assert "base64" not in json.dumps(record)  # images by hash, not inline
            assert [m["role"] for m in record["messages"]] == ["user", "assistant"]
            page.click("#clear_btn")
            page.wait_for_function("document.querySelectorAll('#chatbot .message').length === 0", timeout=20_000)
        finally:
            browser.close()


def test_web_ui_failure_messages(tmp_path):
    """No worker up, or the controller down: the chat says so (not LLaVA's 'NETWORK ERROR')."""
    from fastllava.serve import gradio_web_server as web

    dead = f"http://127.0.0.1:{free_port()}"
    args = web.parse_args(["--controller-url", dead, "--log-dir", str(tmp_path)])
    server = web.WebServer(args)
    sid, display, text, image = server.add_text(None, "hello", Image.new("RGB", (8, 8)), "Pad")
    assert text == "" and image is None and len(display) == 1
    *_, (sid, display, _) = list(server.bot(sid, None, 0.2, 0.7, 16))
    assert display[-1]["content"] == web.NO_MODEL and server.session(sid).messages == []
    sid, display, *_ = server.add_text(sid, "hello", None, "Pad")
    *_, (sid, display, status) = list(server.bot(sid, "some-model", 0.2, 0.7, 16))
    assert status == "request failed"
    assert "cannot reach the controller" in display[-1]["content"]
    assert [m["role"] for m in server.session(sid).messages] == []  # failed turns can be sent again


def test_main_job_stops_cleanly(main_job):
    """Last: Ctrl-C stops the worker (drained), the web UI and the controller, and the job exits 0."""
    job = main_job["job"]
    ctl = job.log().split("controller  ")[1].split()[0]
    job.popen.send_signal(signal.SIGINT)
    assert job.popen.wait(60) == 0
    assert "stopped" in job.log()
    with pytest.raises(httpx.ConnectError):
        httpx.get(ctl + "/health")
    with pytest.raises(httpx.ConnectError):
        httpx.get(main_job["url"] + "/")
    assert "drained" in (Path(job.log_path).parent / "logs" / "worker.log").read_text()
