"""LLaVA's GPT-review modules under LLaVA's names (``eval.eval_gpt_review_bench``, ``eval_gpt_review_visual``,
``summarize_gpt_review``) against LLaVA's own scripts on the same files: the judge sees the same text, the review
files are the same lines, the summary prints the same numbers.

LLaVA's scripts call the pre-1.0 ``openai.ChatCompletion``; here that name is a recorder returning a review made
from the content, and ours gets the same judge through ``Judge.__call__``. (``eval_gpt_review.py`` imports ray,
which is not installed; its text-only prompt is checked against LLaVA's format by hand.)
"""

from __future__ import annotations

import json
import random
import runpy
import subprocess
import sys

import openai
import pytest

pytest.importorskip("llava.eval.summarize_gpt_review")  # `pip install --no-deps llava-torch==1.2.2.post1`

from fastllava.eval import eval_gpt_review, eval_gpt_review_bench, eval_gpt_review_visual, gpt_review  # noqa: E402

RULE = {"role": "Assistant", "prompt": "Rate both answers; first line: two scores."}


def _review(content: str) -> str:
    n = len(content)
    return f"{n % 9 + 1} {n % 7 + 2}\nAssistant 2 is fine." if n % 5 else f"{n % 9 + 1}, {n % 4 + 1} no newline"


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def files(tmp_path):
    rng = random.Random(0)
    questions, contexts, ref, ans = [], [], [], []
    for i in range(6):
        image = f"{i:012d}.jpg"
        cat = ["conv", "detail", "complex"][i % 3]
        questions.append({"question_id": i, "image": image, "text": f"What is in picture {i}?", "category": cat})
        contexts.append({
            "image": image,
            "caption": [f"caption {i} a", f"caption {i} b"] if i % 2 else f"one caption {i}",
            "captions": [f"coco caption {i}", "another"],
            "instances": [{"category": "dog", "bbox": [rng.random(), 0.1, 0.5, 0.5]}],
        })  # fmt: skip
        ref.append({"question_id": i, "answer_id": f"ref{i}", "text": f"reference {i}"})
        ans.append({"question_id": i, "answer_id": f"ans{i}", "text": f"model answer {i} " * rng.randint(1, 4)})
    rules = {f"llava_bench_{c}": RULE for c in ("conv", "detail", "complex")}
    rules.update({c: RULE for c in ("conv", "detail", "complex")})
    (tmp_path / "rule.json").write_text(json.dumps(rules))
    return {
        "q": _write_jsonl(tmp_path / "q.jsonl", questions),
        "c": _write_jsonl(tmp_path / "c.jsonl", contexts),
        "a": [_write_jsonl(tmp_path / "ref.jsonl", ref), _write_jsonl(tmp_path / "ans.jsonl", ans)],
        "r": str(tmp_path / "rule.json"),
        "dir": tmp_path,
    }


@pytest.mark.parametrize("kind", ["bench", "visual"])
def test_review_scripts_match_llava(kind, files, monkeypatch, capsys):
    seen = {"llava": [], "ours": []}

    class ChatCompletion:  # the pre-1.0 openai API LLaVA's scripts call
        @staticmethod
        def create(model, messages, temperature, max_tokens):
            assert messages[0]["content"] == gpt_review.SYSTEM_PROMPT and temperature == 0.2
            seen["llava"].append(messages[1]["content"])
            return {"choices": [{"message": {"content": _review(messages[1]["content"])}}]}

    def ours_judge(self, content, system=gpt_review.SYSTEM_PROMPT, temperature=None):
        assert system == gpt_review.SYSTEM_PROMPT and self.temperature == 0.2
        seen["ours"].append(content)
        return _review(content)

    monkeypatch.setattr(openai, "ChatCompletion", ChatCompletion, raising=False)
    monkeypatch.setattr(gpt_review.Judge, "__call__", ours_judge)
    common = ["-q", files["q"], "-c", files["c"], "-a", *files["a"], "-r", files["r"]]
    llava_out, ours_out = files["dir"] / "llava.jsonl", files["dir"] / "ours.jsonl"
    monkeypatch.setattr(sys, "argv", ["x", *common, "-o", str(llava_out)])
    runpy.run_module(f"llava.eval.eval_gpt_review_{kind}", run_name="__main__")
    module = eval_gpt_review_bench if kind == "bench" else eval_gpt_review_visual
    assert module.main([*common, "-o", str(ours_out)]) == 6
    capsys.readouterr()
    assert seen["ours"] == seen["llava"] and len(seen["ours"]) == 6
    assert [json.loads(x) for x in ours_out.read_text().splitlines()] == [
        json.loads(x) for x in llava_out.read_text().splitlines()
    ]
    assert module.main([*common, "-o", str(ours_out)]) == 0  # resumes: nothing left to review


def test_text_review_prompt_is_llavas_format(files, monkeypatch):
    seen = []
    monkeypatch.setattr(gpt_review.Judge, "__call__", lambda self, c, **kw: seen.append(c) or "7 8\nok")
    out = files["dir"] / "text.jsonl"
    rules = {"default": RULE}  # categories missing from the rules fall back to "default", as in LLaVA
    (files["dir"] / "text_rule.json").write_text(json.dumps(rules))
    eval_gpt_review.main(
        ["-q", files["q"], "-a", *files["a"], "-r", str(files["dir"] / "text_rule.json"), "-o", str(out)]
    )
    assert seen[0] == (
        "[Question]\nWhat is in picture 0?\n\n[Assistant 1]\nreference 0\n\n[End of Assistant 1]\n\n"
        f"[Assistant 2]\n{json.loads(open(files['a'][1]).readline())['text']}\n\n[End of Assistant 2]\n\n"
        f"[System]\n{RULE['prompt']}\n\n"
    )
    first = json.loads(out.read_text().splitlines()[0])
    assert first == {"id": 1, "question_id": 0, "answer1_id": "ref0", "answer2_id": "ans0", "category": "conv",
                     "content": "7 8\nok", "tuple": [7.0, 8.0]}  # fmt: skip


def test_summarize_gpt_review_prints_llavas_numbers(tmp_path, capsys):
    rng = random.Random(1)
    paths = []
    for name in ("review_llava_0314.jsonl", "gpt4_text_ours.jsonl"):
        rows = []
        for i in range(25):
            pair = [-1, -1] if i % 11 == 3 else [rng.randint(1, 10), rng.randint(1, 10)]
            rows.append({"question_id": i, "category": ["conv", "detail", "complex"][i % 3], "tuple": pair})
        paths.append(_write_jsonl(tmp_path / name, rows))
    for args in (["-f", *paths], ["-f", *paths, "-i", "2", "5"], ["-d", str(tmp_path), "-s", "llava"]):
        want = subprocess.run(
            [sys.executable, "-m", "llava.eval.summarize_gpt_review", *args], capture_output=True, text=True, check=True
        ).stdout
        from fastllava.eval import summarize_gpt_review

        summarize_gpt_review.main(args)
        assert capsys.readouterr().out == want, args


def test_multimodal_chat_gpt_score_llava_med_format_and_token_budget(tmp_path, monkeypatch, capsys):
    """LLaVA-Med's pairwise judge: its message layout and system prompt, its scores file, and a figure context
    too long for the judge's context shortened until prompt + reply fit (LLaVA-Med sends it whole)."""
    from fastllava.eval import eval_multimodal_chat_gpt_score as mm

    seen = []
    monkeypatch.setattr(
        gpt_review.Judge, "__call__", lambda self, c, system=None, **kw: seen.append((c, system)) or " 9 7\nfine "
    )
    questions = [
        {"question_id": 1, "fig_label": "Figure 2", "fig_caption": "CT of the chest.", "in_text_mention": "A mass.",
         "text": "What is shown?", "gpt4_answer": "A lung mass.", "domain": {"ct": True}},
        {"question_id": 2, "fig_label": "Fig. 1", "fig_caption": "MRI.", "in_text_mention": "word " * 5000,
         "text": "Which sequence?", "gpt4_answer": "T2.", "domain": {"mri": True}},
    ]  # fmt: skip
    _write_jsonl(tmp_path / "q.jsonl", questions)
    _write_jsonl(tmp_path / "a.jsonl", [{"question_id": 1, "text": "A tumour."}, {"question_id": 2, "text": "T1."}])
    args = ["--question-file", str(tmp_path / "q.jsonl"), "--answers-file", str(tmp_path / "a.jsonl"),
            "--scores-file", str(tmp_path / "out" / "scores.jsonl"), "--max-context-tokens", "2048"]  # fmt: skip
    assert mm.main(args) == 2
    assert seen[0] == (
        "[Context]\nFigure Caption:\nFigure 2: CT of the chest.\n\nFigure Context:\n\t- A mass.\n\n"
        "[Question]\nWhat is shown?\n\n[Assistant 1]\nA lung mass.\n\n[End of Assistant 1]\n\n"
        "[Assistant 2]\nA tumour.\n\n[End of Assistant 2]\n\n[System]\n" + mm.INSTRUCT_PROMPT + "\n\n",
        "'You are a helpful and precise assistant for checking the quality of the answer.",
    )
    long_prompt = seen[1][0]
    count = mm.token_counter("gpt-4-0314")
    assert count(long_prompt) + count(mm.SYSTEM) <= 2048 - 1024 and " ...\n\n[Question]\nWhich sequence?" in long_prompt
    assert "[Assistant 2]\nT1.\n\n" in long_prompt
    rows = [json.loads(x) for x in (tmp_path / "out" / "scores.jsonl").read_text().splitlines()]
    assert rows[0] == {**questions[0], "question": "What is shown?", "ans1": "A lung mass.", "ans2": "A tumour.",
                       "gpt_eval": "9 7\nfine"}  # fmt: skip
    assert "mean scores 9.00 (reference) 7.00 (model)" in capsys.readouterr().out
    assert mm.main(args) == 0  # resumes
