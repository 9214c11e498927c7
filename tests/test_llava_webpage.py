"""``eval.generate_webpage_data_from_table`` against LLaVA's own script (the same ``data.json`` from the same
tables, with ``--llava-order``), and the ``eval/webpage/`` page showing it in Chromium: the question, the two
answers side by side, the review with the assistants in bold, the scores, navigation."""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from fastllava.eval import generate_webpage_data_from_table as gen

pytest.importorskip("llava.eval.generate_webpage_data_from_table")  # llava-torch 1.2.2, --no-deps
WEBPAGE = Path(gen.__file__).parent / "webpage"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def tables(tmp_path):
    ids = list(range(1, 81))
    cats = ["generic", "knowledge", "math"]
    _write_jsonl(
        tmp_path / "table/question.jsonl",
        [{"question_id": i, "text": f"Question {i}?", "category": cats[i % 3]} for i in ids[::-1]],
    )
    _write_jsonl(
        tmp_path / "table/answer/answer_vicuna-13b.jsonl", [{"question_id": i, "text": f"vicuna says {i}"} for i in ids]
    )
    _write_jsonl(
        tmp_path / "table/results/llama-13b-hf-alpaca.jsonl",
        [{"question_id": i, "text": f"ours says {i}"} for i in ids],
    )
    reviews = [{"question_id": i, "content": f"{i % 10} {(i + 3) % 10}\nAssistant 1 is terse; Assistant 2 rambles.",
                "tuple": [i % 10, (i + 3) % 10]} for i in ids]  # fmt: skip
    reviews[4]["content"] = "No scores on this line.\nAssistant 2 wins."
    _write_jsonl(tmp_path / "table/review/review_vicuna-13b_llama-13b-hf-alpaca.jsonl", reviews)
    (tmp_path / "webpage").mkdir()
    return tmp_path


def test_data_json_matches_llavas(tables, monkeypatch):
    subprocess.run([sys.executable, "-m", "llava.eval.generate_webpage_data_from_table"], cwd=tables, check=True)
    monkeypatch.chdir(tables)
    gen.main(["--llava-order", "--out", "webpage/ours.json"])  # LLaVA's default table paths
    theirs = json.loads((tables / "webpage/data.json").read_text())
    assert json.loads((tables / "webpage/ours.json").read_text()) == theirs
    assert theirs["questions"][0]["evaluations"]["vicuna"].startswith("**Assistant 1** is terse")
    plain = gen.main(["--out", "webpage/by_id.json"])
    assert [q["id"] for q in plain["questions"]] == list(range(1, 81))


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package")
def test_webpage_shows_answers_side_by_side(tables, monkeypatch, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    site = tmp_path / "site"
    shutil.copytree(WEBPAGE, site)
    monkeypatch.chdir(tables)
    gen.main(["--out", str(site / "data.json")])
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{server.server_port}/index.html")
            page.wait_for_function("document.getElementById('status').textContent.includes('80 questions')")
            assert page.text_content("#question-text") == "Question 1?"
            assert page.text_content("#other-answer") == "vicuna says 1"
            assert page.text_content("#our-answer") == "ours says 1"
            assert page.text_content("#review strong") == "Assistant 1"
            assert (page.text_content("#other-score"), page.text_content("#our-score")) == ("1", "4")
            page.click("#next")
            assert page.text_content("#question-text") == "Question 2?"
            page.select_option("#category", "math")  # questions 2, 5, 8, ...
            assert page.text_content("#question-text") == "Question 2?"
            page.click("#next")
            assert page.text_content("#question-text") == "Question 5?"
            assert page.text_content("#our-answer") == "ours says 5"
            browser.close()
    finally:
        server.shutdown()


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass
