"""LLaVA's scorer modules under LLaVA's names (``eval.eval_pope``, ``eval.eval_science_qa``,
``eval.eval_textvqa``, ``eval.m4c_evaluator``) against LLaVA's own (llava-torch 1.2.2) on the same files:
the printed numbers and the written files are equal.

LLaVA's scripts run as ``python -m llava.eval.X`` subprocesses; ours in-process. Differences named in the
modules' docstrings: POPE categories print sorted (LLaVA: ``os.listdir`` order, so blocks are compared per
category) and answers are matched to questions by id (the answers here are in question order, where both agree).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

pytest.importorskip("llava.eval.m4c_evaluator")  # `pip install --no-deps llava-torch==1.2.2.post1`

from fastllava.eval import eval_pope, eval_science_qa, eval_textvqa, m4c_evaluator  # noqa: E402

WORDS = ["yes", "no", "two", "2", "a red car", "the cat's", "Red car.", "ten", "dog", "it is not", "No, it is"]


def _llava(module: str, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", f"llava.eval.{module}", *args], capture_output=True, text=True, check=True
    )
    return out.stdout


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _blocks(text: str) -> dict[str, str]:
    return {b.strip().split("\n", 1)[0]: b.strip() for b in text.split("=" * 36) if b.strip()}


def test_eval_pope_prints_llavas_numbers(tmp_path, capsys):
    rng = random.Random(0)
    ann = tmp_path / "coco"
    ann.mkdir()
    questions, answers = [], []
    for cat in ("adversarial", "popular", "random"):
        labels = []
        for i in range(30):
            qid = len(questions)
            label = rng.choice(["yes", "no"])
            questions.append({"question_id": qid, "category": cat, "text": f"Is there a thing {i}?"})
            labels.append({"question_id": qid, "label": label})
            answers.append({"question_id": qid, "text": rng.choice(["Yes, there is.", "No.", "There is not a cat"])})
        _write_jsonl(ann / f"coco_pope_{cat}.json", labels)
    _write_jsonl(tmp_path / "q.jsonl", questions)
    _write_jsonl(tmp_path / "a.jsonl", answers)
    args = ["--annotation-dir", str(ann), "--question-file", str(tmp_path / "q.jsonl")]
    args += ["--result-file", str(tmp_path / "a.jsonl")]
    want = _llava("eval_pope", *args)
    eval_pope.main(args)
    got = capsys.readouterr().out
    assert _blocks(got) == _blocks(want) and len(_blocks(got)) == 3


def test_eval_science_qa_prints_and_writes_llavas_results(tmp_path, capsys):
    rng = random.Random(1)
    problems, split, preds = {}, [], []
    for i in range(40):
        pid = str(100 + i)
        n = rng.randint(2, 5)
        problems[pid] = {"choices": [f"c{j}" for j in range(n)], "answer": rng.randrange(n)}
        split.append(pid)
        if i % 9 == 8:
            continue  # no prediction: counted wrong
        letter = "ABCDE"[rng.randrange(5)]
        text = rng.choice([letter, f"{letter}. because", f"The answer is {letter}.", "I do not know", f"{letter}"])
        prompt = ("<image>\n" if i % 2 else "") + "Question?"
        preds.append({"question_id": pid, "prompt": prompt, "text": text})
    base = tmp_path / "sqa"
    base.mkdir()
    (base / "problems.json").write_text(json.dumps(problems))
    (base / "pid_splits.json").write_text(json.dumps({"test": split}))
    _write_jsonl(tmp_path / "a.jsonl", preds)

    def args(tag):
        out, res = str(tmp_path / f"{tag}_out.json"), str(tmp_path / f"{tag}_res.json")
        return ["--base-dir", str(base), "--result-file", str(tmp_path / "a.jsonl"),
                "--output-file", out, "--output-result", res]  # fmt: skip

    want = _llava("eval_science_qa", *args("llava"))
    eval_science_qa.main(args("ours"))
    assert capsys.readouterr().out == want
    assert (tmp_path / "ours_out.json").read_text() == (tmp_path / "llava_out.json").read_text()
    ours, theirs = (json.loads((tmp_path / f"{t}_res.json").read_text()) for t in ("ours", "llava"))
    assert {k: ours[k] for k in theirs} == theirs  # LLaVA's keys, equal; ours adds image-only counts


def _gt_answers(rng):
    return [rng.choice(WORDS) for _ in range(10)]


def test_eval_textvqa_prints_llavas_accuracy(tmp_path, capsys):
    rng = random.Random(2)
    data, results = [], []
    for i in range(40):
        q = f"what is written on sign {i}?"
        data.append({"image_id": f"img{i}", "question": q.capitalize(), "answers": _gt_answers(rng)})
        prompt = rng.choice([f"{q}\nAnswer the question using a single word or phrase.",
                             f"OCR tokens: a, b Question: {q} Short answer:"])  # fmt: skip
        results.append({"question_id": f"img{i}", "prompt": prompt, "text": rng.choice(WORDS)})
    (tmp_path / "ann.json").write_text(json.dumps({"data": data}))
    runs = tmp_path / "runs"
    runs.mkdir()
    _write_jsonl(runs / "llava-a.jsonl", results)
    _write_jsonl(runs / "llava-b.jsonl", results[::-1][:25])
    (runs / "notes.txt").write_text("x")
    args = ["--annotation-file", str(tmp_path / "ann.json"), "--result-dir", str(runs)]
    want = _llava("eval_textvqa", *args)
    eval_textvqa.main(args)
    assert capsys.readouterr().out == want


def test_m4c_evaluators_match_llavas():
    from llava.eval import m4c_evaluator as theirs

    rng = random.Random(3)
    texts = WORDS + ["It's  three!", "one hundred", "Don't", "a.b.c.", "1,000", "the answer is: none", "cant"]
    proc, ref = m4c_evaluator.EvalAIAnswerProcessor(), theirs.EvalAIAnswerProcessor()
    assert [proc(t) for t in texts] == [ref(t) for t in texts]
    preds = [
        {"pred_answer": rng.choice(texts), "gt_answers": [rng.choice(texts) for _ in range(10)]} for _ in range(60)
    ]
    for name in ("TextVQAAccuracyEvaluator", "STVQAAccuracyEvaluator"):
        assert getattr(m4c_evaluator, name)().eval_pred_list(preds) == getattr(theirs, name)().eval_pred_list(preds)
    # ANLS: LLaVA's needs the editdistance package; check its get_anls formula with ours as the distance
    anls, ref_anls = m4c_evaluator.STVQAANLSEvaluator(), object.__new__(theirs.STVQAANLSEvaluator)
    ref_anls.get_edit_distance = m4c_evaluator.edit_distance
    assert anls.eval_pred_list(preds) == theirs.STVQAANLSEvaluator.eval_pred_list(ref_anls, preds)
    # and the distance itself against its definition (brute force over small strings)
    for a, b, d in [("kitten", "sitting", 3), ("", "abc", 3), ("flaw", "lawn", 2), ("same", "same", 0)]:
        assert m4c_evaluator.edit_distance(a, b) == d
    if not m4c_evaluator.HAS_PYCOCOEVALCAP:
        with pytest.raises(ImportError, match="pycocoevalcap"):
            m4c_evaluator.TextCapsBleu4Evaluator()
