"""GPT review through the ``openai`` client: against a scripted OpenAI-compatible stub (exact request contents,
retries, resume, LLaVA's score parsing and summary, MM-Vet grading) and end to end against fastllava's own
server (``serve.worker`` with a tiny model), which also answers the embedded benchmark through ``--server-url``
exactly as the same model does locally through the engine (temperature 0).
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytest.importorskip("openai")

from fastllava.eval import answers as A  # noqa: E402
from fastllava.eval import embedded, gpt_review  # noqa: E402

FIX = Path(__file__).parent / "fixtures" / "eval" / "llava_bench"


class _Stub:
    """A minimal ``/v1/chat/completions`` server: fails the first ``fail_first`` calls with a 500, then answers
    ``reply(request_body)``. Every request body is kept."""

    def __init__(self, reply, fail_first: int = 0) -> None:
        self.requests: list[dict] = []
        self.fail_left = fail_first
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def do_GET(self) -> None:  # /v1/models
                self._send(200, {"object": "list", "data": [{"id": "stub-model", "object": "model", "created": 0,
                                                             "owned_by": "test"}]})  # fmt: skip

            def _send(self, code: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append(body)
                if stub.fail_left > 0:
                    stub.fail_left -= 1
                    payload, code = {"error": {"message": "overloaded", "type": "server_error"}}, 500
                else:
                    text = reply(body)
                    payload, code = {
                        "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": text}}],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                    }, 200  # fmt: skip
                self._send(code, payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    servers = []

    def make(reply, fail_first=0):
        servers.append(_Stub(reply, fail_first))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


@pytest.mark.parametrize(
    "review, expected",
    [
        ("8 6\nAssistant 1 is better.", [8.0, 6.0]),
        ("8,6\n...", [8.0, 6.0]),
        ("8, 6\n...", [-1.0, -1.0]),  # LLaVA turns ", " into two spaces, so three fields: a failed parse
        ("7.5 9", [7.5, 9.0]),
        ("Scores: 8 6", [-1.0, -1.0]),
        ("eight six", [-1.0, -1.0]),
    ],
)
def test_parse_score(review, expected):
    assert gpt_review.parse_score(review) == expected


def _llava_bench(url, out, *extra):
    gpt_review.main(
        [
            "llava-bench",
            "-q",
            str(FIX / "questions.jsonl"),
            "-c",
            str(FIX / "context.jsonl"),
            "-a",
            str(FIX / "answers_gpt4.jsonl"),
            str(FIX / "answers_model.jsonl"),
            "-o",
            str(out),
            "--base-url",
            url,
            *extra,
        ]  # fmt: skip
    )


def test_llava_bench_review_against_stub(stub, tmp_path):
    s = stub(lambda body: "8 6\nAssistant 1 gives more detail.", fail_first=1)
    out = tmp_path / "reviews" / "review_llava.jsonl"
    _llava_bench(s.url, out, "--judge-model", "judge-x", "--retries", "2", "--max-tokens", "77")
    reviews = A.read_jsonl(out)
    assert [r["question_id"] for r in reviews] == [0, 1, 2] and [r["id"] for r in reviews] == [1, 2, 3]
    assert [r["category"] for r in reviews] == ["llava_bench_conv", "llava_bench_detail", "llava_bench_complex"]
    assert all(r["tuple"] == [8.0, 6.0] for r in reviews)
    assert (reviews[0]["answer1_id"], reviews[0]["answer2_id"]) == ("ref0", "ans0")
    assert len(s.requests) == 4  # one 500, retried, then one call per question
    body = s.requests[1]
    assert (body["model"], body["temperature"], body["max_tokens"]) == ("judge-x", 0.2, 77)
    assert body["messages"][0] == {"role": "system", "content": gpt_review.SYSTEM_PROMPT}
    content = body["messages"][1]["content"]
    assert content.startswith(
        "[Context]\nA large rock formation by the sea.\nWaves hit the rocks.\n\n"
        "[Question]\nWhat is the name of this famous sight?\n\n"
        "[Assistant 1]\nreference answer 0\n\n[End of Assistant 1]\n\n"
        "[Assistant 2]\nmodel answer 0\n\n[End of Assistant 2]\n\n[System]\nWe would like to request"
    )
    assert content.endswith("does not affect your judgment.\n\n")
    _llava_bench(s.url, out, "--judge-model", "judge-x")  # resumes: everything is reviewed already
    assert len(s.requests) == 4 and len(A.read_jsonl(out)) == 3
    summary = gpt_review.summarize_reviews(out)
    assert summary["all"] == {"relative": 75.0, "reference": 80.0, "model": 60.0}
    assert set(summary) == {"all", "llava_bench_conv", "llava_bench_detail", "llava_bench_complex"}
    gpt_review.main(["summarize", str(out), "--metrics", str(tmp_path / "lb.json")])
    assert json.loads((tmp_path / "lb.json").read_text())["all"]["relative"] == 75.0


def test_summary_counts_failed_parses_like_llava(tmp_path):
    f = tmp_path / "r.jsonl"
    f.write_text("".join(json.dumps({"question_id": i, "category": "c", "tuple": t}) + "\n"
                         for i, t in enumerate([[8, 6], [-1, -1], [10, 9]])))  # fmt: skip
    # means (8 - 1 + 10) / 3 = 17/3 and (6 - 1 + 9) / 3 = 14/3 -> 14/17 = 82.4 %
    assert gpt_review.summarize_reviews(f)["all"]["relative"] == 82.4
    assert gpt_review.summarize_reviews(f, ignore={1})["all"]["relative"] == round(15 / 18 * 100, 1)


def test_judge_gives_up_after_retries(stub):
    s = stub(lambda body: "1 1", fail_first=10)
    judge = gpt_review.Judge(gpt_review.openai_client(s.url, max_retries=0), "j", retries=2, sleep=0.0)
    with pytest.raises(RuntimeError, match="failed 3 times"):
        judge("hello")
    assert len(s.requests) == 3


def test_mmvet_convert_and_grade(stub, tmp_path):
    results = gpt_review.convert_mmvet(FIX / "mmvet_answers.jsonl", tmp_path / "results.json")
    assert results == {"v1_0": "x = -1", "v1_1": "adidas"}
    replies = iter(["0.5", "no idea", "0.0"])  # v1_0: 0.5; v1_1: unparseable once, then 0.0
    s = stub(lambda body: next(replies))
    judge = gpt_review.Judge(gpt_review.openai_client(s.url, max_retries=0), "j", sleep=0.0)
    r = gpt_review.grade_mmvet(FIX / "mm-vet.json", tmp_path / "results.json", tmp_path / "grades.jsonl", judge)
    assert r["total"] == 25.0 and r["per_capability"] == {"math": 50.0, "ocr": 25.0}
    first = s.requests[0]["messages"]
    assert len(first) == 1 and first[0]["content"].endswith("What is x in the equation? | -1 <AND> -5 | x = -1 | ")
    assert [q["temperature"] for q in s.requests] == [0.0, 0.0, 0.2]  # a retry samples a little
    assert gpt_review.grade_mmvet(FIX / "mm-vet.json", tmp_path / "results.json", tmp_path / "grades.jsonl",
                                  judge)["total"] == 25.0  # fmt: skip
    assert len(s.requests) == 3  # grades were reused


def test_embedded_through_a_server(stub, tmp_path):
    """``--server-url``: every question goes to the server as an image + text message; scored as usual."""
    s = stub(lambda body: "Red.")
    data = tmp_path / "shapes"
    m = embedded.run_embedded(server_url=s.url, out=tmp_path / "out", data_dir=data, seed=0, n_eval=10,
                              extra_args=["--no-progress"])  # fmt: skip
    qs = A.read_jsonl(data / "llava_questions.jsonl")
    expected = 100 * sum(q["answer"] == "red" for q in qs) / len(qs)
    assert m["samples"] == 10 and m["accuracy"] == pytest.approx(expected)
    assert len(s.requests) == 10 and {r["model"] for r in s.requests} == {"stub-model"}
    assert A.read_jsonl(tmp_path / "out" / "answers.jsonl")[0]["model_id"] == "stub-model"
    parts = s.requests[0]["messages"][0]["content"]
    assert parts[0]["type"] == "image_url" and parts[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert parts[1]["type"] == "text" and parts[1]["text"] in {q["text"] for q in qs}
    assert all(r["temperature"] == 0 for r in s.requests)


@pytest.fixture(scope="module")
def fastllava_server(tmp_path_factory):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    pytest.importorskip("httpx")
    from fastllava.model.export import save_llava_hf
    from fastllava.serve.launcher import Proc, free_port, module_cmd, wait_http
    from fastllava.tiny import build_tiny_llava, build_tokenizer, tiny_config, tiny_image_processor

    tmp = tmp_path_factory.mktemp("server")
    port = free_port()
    # random weights scaled up (std 0.2) so that answers differ from question to question
    cfg = tiny_config("llama")
    model = save_llava_hf(build_tiny_llava(cfg, seed=1, std=0.2), tmp / "tiny-llava", build_tokenizer(),
                          tiny_image_processor(cfg))  # fmt: skip
    worker = Proc("worker", module_cmd("worker", "--no-register", "--port", port, "--model-path", model,
                                       "--device", "cpu", "--conv-mode", "llava_v1"), tmp)  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{port}/health", worker)
        yield {"url": f"http://127.0.0.1:{port}/v1", "model": model}
    finally:
        worker.stop()


def test_gpt_review_end_to_end_with_fastllava_server(fastllava_server, tmp_path):
    import openai

    name = openai.OpenAI(base_url=fastllava_server["url"], api_key="x").models.list().data[0].id
    out = tmp_path / "review.jsonl"
    _llava_bench(fastllava_server["url"], out, "--judge-model", name, "--max-tokens", "16", "--retries", "0")
    reviews = A.read_jsonl(out)
    assert [r["question_id"] for r in reviews] == [0, 1, 2]
    for r in reviews:  # the tiny judge writes whatever it writes; its first line is parsed as LLaVA would
        assert isinstance(r["content"], str) and r["tuple"] == gpt_review.parse_score(r["content"])


def test_embedded_server_matches_local_model(fastllava_server, tmp_path):
    data = tmp_path / "shapes"
    # the worker runs --conv-mode llava_v1 (the folder name "tiny-llava" would make both guess llava_v0)
    local = embedded.run_embedded(str(fastllava_server["model"]), out=tmp_path / "local", data_dir=data, n_eval=10,
                                  conv_mode="llava_v1", extra_args=["--no-progress"])  # fmt: skip
    served = embedded.run_embedded(server_url=fastllava_server["url"], out=tmp_path / "served", data_dir=data,
                                   n_eval=10, extra_args=["--no-progress"])  # fmt: skip
    texts = [[r["text"] for r in A.read_jsonl(tmp_path / d / "answers.jsonl")] for d in ("local", "served")]
    assert len(set(texts[0])) > 2 and texts[0] == texts[1] and served["accuracy"] == local["accuracy"]
