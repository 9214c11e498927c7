"""``eval.qa_baseline_gpt35`` and ``eval.model_qa`` (LLaVA's names and arguments) beside LLaVA's own scripts.

qa_baseline_gpt35: LLaVA's script (pre-1.0 ``openai.ChatCompletion`` recorded here, ``shortuuid`` stubbed) and
ours (a local OpenAI-compatible stub server) write the same answers file, answer ids aside. model_qa: LLaVA's
needs CUDA and a plain causal LM, so ours is checked for LLaVA's format and prompt (LLaVA's default conversation;
ours adds the assistant header, the named difference)."""

from __future__ import annotations

import json
import runpy
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest

from fastllava.eval import model_qa, qa_baseline_gpt35

llava_conv = pytest.importorskip("llava.conversation")  # `pip install --no-deps llava-torch==1.2.2.post1`
openai = pytest.importorskip("openai")

QUESTIONS = [(3, "What is 2+2?"), (1, "Name a colour."), (2, "FAIL please"), (10, "Why is the sky blue?")]


def _reply(question: str) -> str:
    if "FAIL" in question:
        raise RuntimeError("the stub refuses")
    return f"answer to {question} ({len(question)})"


class _Chat(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert body["messages"][0] == {"role": "system", "content": "You are a helpful assistant."}
        assert body["model"] == "gpt-3.5-turbo" and body["max_tokens"] == 64
        try:
            text, status = _reply(body["messages"][1]["content"]), 200
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            out = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"], "choices": [choice]}
        except RuntimeError as e:
            status, out = 400, {"error": {"message": str(e), "type": "invalid_request_error"}}
        data = json.dumps(out).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_qa_baseline_gpt35_writes_llavas_file(tmp_path, monkeypatch):
    qfile = tmp_path / "question.jsonl"
    qfile.write_text(
        "".join(json.dumps({"question_id": i, "text": t, "category": "generic"}) + "\n" for i, t in QUESTIONS)
    )

    class ChatCompletion:
        @staticmethod
        def create(model, messages, max_tokens):
            return {"choices": [{"message": {"content": _reply(messages[1]["content"])}}]}

    monkeypatch.setattr(openai, "ChatCompletion", ChatCompletion, raising=False)
    monkeypatch.setitem(sys.modules, "shortuuid", SimpleNamespace(uuid=lambda: "id"))
    monkeypatch.setattr("time.sleep", lambda s: None)
    monkeypatch.setattr(sys, "argv", ["x", "-q", str(qfile), "-o", str(tmp_path / "llava.jsonl"), "--max-tokens", "64"])
    runpy.run_module("llava.eval.qa_baseline_gpt35", run_name="__main__")

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Chat)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        qa_baseline_gpt35.main(["-q", str(qfile), "-o", str(tmp_path / "ours.jsonl"), "--max-tokens", "64",
                                "--base-url", f"http://127.0.0.1:{server.server_port}/v1"])  # fmt: skip
    finally:
        server.shutdown()

    def load(name):
        text = (tmp_path / name).read_text()
        assert not text.endswith("\n")  # LLaVA joins the lines without a final newline
        rows = [json.loads(x) for x in text.split("\n")]
        assert all(r.pop("answer_id") for r in rows)
        return rows

    ours, theirs = load("ours.jsonl"), load("llava.jsonl")
    assert ours == theirs
    assert [r["question_id"] for r in ours] == [1, 2, 3, 10] and ours[1]["text"] == "#ERROR#"


def test_model_qa_writes_llavas_format(tmp_path):
    from fastllava.default_model import default_model_path

    qfile = tmp_path / "question.jsonl"
    qfile.write_text(
        "".join(json.dumps({"question_id": i, "text": t, "category": "generic"}) + "\n" for i, t in QUESTIONS[:2])
    )
    out = tmp_path / "answer.jsonl"
    assert model_qa.main(["--model-name", str(default_model_path()), "--question-file", str(qfile),
                          "--answers-file", str(out), "--max_new_tokens", "8", "--no-progress"]) == 0  # fmt: skip
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [3, 1]
    from fastllava.eval.questions import Question
    from fastllava.eval.runner import Prompter

    prompter = Prompter(None, None, SimpleNamespace(), model_qa.DEFAULT_CONV_MODE)
    for (qid, text), r in zip(QUESTIONS[:2], rows, strict=True):
        assert set(r) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
        assert r["model_id"] == default_model_path().name and len(r["answer_id"]) == 22 and r["text"]
        conv = llava_conv.default_conversation.copy()
        conv.append_message(conv.roles[0], text)  # LLaVA's model_qa prompt: the user turn only
        ours = prompter.prompt(Question(qid, text, text))
        assert ours == conv.get_prompt() + conv.roles[1] + ":"  # ours ends with the assistant's header
