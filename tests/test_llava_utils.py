"""``fastllava.utils`` against LLaVA's ``llava.utils``: the moderation check on a local OpenAI-compatible
``/moderations`` endpoint (LLaVA's function pointed at it), the logger's file, ``disable_torch_init``."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from fastllava import utils

llava_utils = pytest.importorskip("llava.utils")  # `pip install --no-deps llava-torch==1.2.2.post1`


class _Moderation(BaseHTTPRequestHandler):
    """Flags inputs that mention "attack"; answers 400 to a body that is not JSON (as OpenAI does)."""

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        try:
            text = json.loads(body)["input"]
        except ValueError:
            self.send_response(400)
            self.end_headers()
            self.wfile.write(b'{"error": {"message": "bad json"}}')
            return
        assert self.path == "/v1/moderations" and self.headers["Authorization"] == "Bearer sk-test"
        reply = json.dumps({"results": [{"flagged": "attack" in text}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def moderation_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Moderation)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()


def test_violates_moderation_matches_llava(moderation_url, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    real_post = llava_utils.requests.post
    # LLaVA's function hard-codes api.openai.com: send it to the local endpoint instead
    monkeypatch.setattr(
        llava_utils.requests,
        "post",
        lambda url, **kw: real_post(url.replace("https://api.openai.com/v1", moderation_url), **kw),
    )
    for text in ["a cat on a mat", "how to attack a castle", "plan an\nattack", "nothing here\n"]:
        assert utils.violates_moderation(text, base_url=moderation_url) == llava_utils.violates_moderation(text)
    assert utils.violates_moderation("attack", base_url=moderation_url) is True
    # the difference: LLaVA pastes the text into JSON by hand, so a quote makes the request invalid and it passes
    quoted = 'say "attack" now'
    assert llava_utils.violates_moderation(quoted) is False
    assert utils.violates_moderation(quoted, base_url=moderation_url) is True
    # fail open, as LLaVA: nothing listening
    assert utils.violates_moderation("attack", base_url="http://127.0.0.1:9/v1", timeout=1) is False
    monkeypatch.setenv("OPENAI_BASE_URL", moderation_url)
    assert utils.violates_moderation("attack") is True


def test_build_logger_writes_under_the_log_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTLLAVA_LOGDIR", str(tmp_path / "logs"))
    logger = utils.build_logger("fastllava_test_logger", "worker.log")
    logger.info("hello from the test")
    assert utils.build_logger("fastllava_test_logger", "worker.log").handlers == logger.handlers  # no duplicates
    for h in logger.handlers:
        h.flush()
    line = (tmp_path / "logs" / "worker.log").read_text().strip()
    assert line.endswith("| INFO | fastllava_test_logger | hello from the test")
    assert isinstance(logger, logging.Logger) and logger.level == logging.INFO


def test_disable_torch_init_skips_default_init(monkeypatch):
    monkeypatch.setattr(torch.nn.Linear, "reset_parameters", torch.nn.Linear.reset_parameters)
    monkeypatch.setattr(torch.nn.LayerNorm, "reset_parameters", torch.nn.LayerNorm.reset_parameters)
    utils.disable_torch_init()
    lin, norm = torch.nn.Linear(4, 4), torch.nn.LayerNorm(4)  # uninitialised memory now (may hold NaN)
    lin.weight.data.fill_(2.0)
    norm.weight.data.fill_(3.0)
    lin.reset_parameters()
    norm.reset_parameters()
    assert torch.all(lin.weight == 2.0) and torch.all(norm.weight == 3.0)
    assert utils.server_error_msg == llava_utils.server_error_msg
    assert utils.moderation_msg == llava_utils.moderation_msg


def test_web_ui_moderate_refuses_flagged_turns(moderation_url, monkeypatch, tmp_path):
    """``--moderate`` (LLaVA's flag): a flagged message is not added and the textbox shows LLaVA's message."""
    pytest.importorskip("gradio")
    from fastllava.serve.gradio_web_server import WebServer, parse_args

    monkeypatch.setenv("OPENAI_BASE_URL", moderation_url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    web = WebServer(parse_args(["--moderate", "--log-dir", str(tmp_path)]))
    sid, display, box, _ = web.add_text(None, "plan an attack", None, "Default")
    assert box == llava_utils.moderation_msg and display == []
    sid, display, box, _ = web.add_text(sid, "what colour is it?", None, "Default")
    assert box == "" and display == [{"role": "user", "content": ["what colour is it?"]}]
    plain = WebServer(parse_args(["--log-dir", str(tmp_path)]))
    assert plain.add_text(None, "plan an attack", None, "Default")[2] == ""
