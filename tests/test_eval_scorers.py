"""Scorers on small fixtures in the official formats (tests/fixtures/eval/), with hand-checked expected metrics.

Every expected number below is worked out by hand in the comment beside it, from LLaVA's parsing rules.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fastllava.eval import gqa, mme, pope, science_qa, submission, vqa_eval
from fastllava.eval.answers import read_jsonl

FIX = Path(__file__).parent / "fixtures" / "eval"


# ------------------------------------------------------------------------------------------------ POPE
@pytest.mark.parametrize(
    "text, expected",
    [
        ("Yes, there is a dog.", "yes"),
        ("No, there is not.", "no"),
        ("There is no cat in the image.", "no"),
        ("NO", "yes"),  # case-sensitive word match: only "No" / "no" / "not"
        ("Not really", "yes"),  # "Not" is not "not"
        ("no\nthere isn't", "yes"),  # split on spaces only: "no\nthere" is one word
        ("Yes, but actually no. It is a cat.", "no"),  # first sentence only
        ("There is a dog in the image. No doubt", "yes"),  # the "No" is in the second sentence
        ("no", "no"),
        ("", "yes"),
    ],
)
def test_pope_parser(text, expected):
    assert pope.parse_yes_no(text) == expected


def test_pope_scores():
    r = pope.score_pope(FIX / "pope/coco", FIX / "pope/llava_pope_test.jsonl", FIX / "pope/answers.jsonl")
    rnd, adv = r["categories"]["random"], r["categories"]["adversarial"]
    # random: q1 yes/yes TP, q2 no/no TN, q3 no/yes FN, q4 yes/no FP
    assert (rnd["TP"], rnd["FP"], rnd["TN"], rnd["FN"]) == (1, 1, 1, 1)
    assert rnd["accuracy"] == rnd["precision"] == rnd["recall"] == rnd["f1"] == rnd["yes_ratio"] == 0.5
    # adversarial: q5 "NO"->yes/yes TP, q6 "Not really"->yes/yes TP, q7 "no\n.."->yes/no FP, q8 no/no TN, q9 yes/yes TP
    assert (adv["TP"], adv["FP"], adv["TN"], adv["FN"]) == (3, 1, 1, 0)
    assert adv["accuracy"] == pytest.approx(0.8) and adv["precision"] == pytest.approx(0.75)
    assert adv["recall"] == 1.0 and adv["f1"] == pytest.approx(6 / 7) and adv["yes_ratio"] == pytest.approx(0.8)
    assert r["f1"] == pytest.approx(100 * (0.5 + 6 / 7) / 2)  # 67.857


def test_pope_degenerate_all_no():
    m = pope.pope_metrics(["no", "no"], ["yes", "no"])
    assert m["precision"] == 0.0 and m["f1"] == 0.0 and m["accuracy"] == 0.5  # LLaVA would divide by zero


# ------------------------------------------------------------------------------------------- ScienceQA
@pytest.mark.parametrize(
    "text, expected",
    [
        ("B", "B"),
        ("A. the sun", "A"),
        ("The answer is C.", "C"),
        ("The answer is B", "FAILED"),  # the pattern needs a character after the letter
        ("The answer is A. The answer is B.", "FAILED"),  # two matches
        ("D", "D"),
        (" B", "FAILED"),
        ("Because ... The answer is E!", "E"),
        ("A.", "FAILED"),  # "A." is neither a bare letter nor "A. ..."
    ],
)
def test_science_qa_extraction(text, expected):
    assert science_qa.extract_answer(text) == expected


def test_science_qa_scores(tmp_path):
    summary, results = science_qa.score_science_qa(FIX / "scienceqa", FIX / "scienceqa/answers.jsonl")
    # test split p1..p7: right p1 (B), p2 ("A. ..."), p3 ("The answer is C."); wrong p4 (no char after B),
    # p5 (D of 3 choices), p6 (two answers), p7 (no prediction). p8 is in val and not scored.
    assert (summary["count"], summary["correct"]) == (7, 3)
    assert summary["acc"] == pytest.approx(300 / 7)
    # image questions (prompt has <image>): p1, p3, p4, p6 -> 2 of 4 right
    assert (summary["img_count"], summary["img_correct"], summary["img_acc"]) == (4, 2, 50.0)
    assert summary["results"]["p5"] == -1 and summary["results"]["p3"] == 2
    assert {a["question_id"] for a in results["correct"]} == {"p1", "p2", "p3"}
    science_qa.main(
        [
            "--base-dir",
            str(FIX / "scienceqa"),
            "--result-file",
            str(FIX / "scienceqa/answers.jsonl"),
            "--output-result",
            str(tmp_path / "r.json"),
        ]  # fmt: skip
    )
    assert json.loads((tmp_path / "r.json").read_text())["correct"] == 3


# ------------------------------------------------------------------------------------ VQA normalisation
@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Nokia.", "nokia"),
        ("Two", "2"),
        ("the stop sign", "stop sign"),
        ("Coca-Cola", "coca cola"),  # '-' not next to a space: becomes a space
        ("coca - cola", "coca cola"),  # next to a space: removed
        ("3.5", "3.5"),  # a period before a digit stays
        ("1,000", "1000"),  # commas go first
        ("dont know", "don't know"),
        ("It's a dog!", "it 's dog"),  # "'s" split off, "a" dropped, "!" spaced
        ("an apple", "apple"),
        ("(yes)", "yes"),
        ("none", "0"),
    ],
)
def test_normalize_answer(raw, expected):
    assert vqa_eval.normalize_answer(raw) == expected


def test_vqa_accuracy_leave_one_out():
    assert vqa_eval.vqa_accuracy("2", ["two"] * 2 + ["2"] + ["three"] * 7) == pytest.approx(0.9)  # (3*2/3+7)/10
    assert vqa_eval.vqa_accuracy("x", ["x"] * 1 + ["y"] * 9) == pytest.approx(0.3)  # (0 + 9*1/3)/10
    assert vqa_eval.vqa_accuracy("x", ["x"] * 4 + ["y"] * 6) == 1.0
    assert vqa_eval.vqa_accuracy("z", ["x"] * 10) == 0.0


def test_textvqa_scores():
    r = vqa_eval.score_textvqa(FIX / "textvqa/TextVQA_0.5.1_val.json", FIX / "textvqa/answers.jsonl")
    # 1.0 (nokia) + 0.9 (2) + 0.6 (coca cola: 2 of 10) + 0.9 (stop sign) + 0.3 (don't know) + 1.0 (3.5) + 0 = 4.7
    assert r["samples"] == 7 and r["accuracy"] == pytest.approx(100 * 4.7 / 7)


def test_textvqa_prompt_layouts():
    f = vqa_eval.textvqa_question_from_prompt
    assert f("What?\nReference OCR token: a\nAnswer briefly.") == "what?"
    assert f("Reference OCR token: a\nWhat?\nAnswer briefly.") == "what?"
    assert f("OCR tokens: a, b. Question: What is it? Short answer:") == "what is it?"
    with pytest.raises(ValueError):
        f("one line only")


def test_vqav2_scores_and_submission(tmp_path):
    out = tmp_path / "upload.json"
    stats = vqa_eval.vqav2_submission(FIX / "vqav2/llava_vqav2_test.jsonl", FIX / "vqav2/answers.jsonl", out)
    assert stats == {"results": 2, "split": 3, "error_lines": 1}  # the cut-off last line is counted, skipped
    assert json.loads(out.read_text()) == [
        {"question_id": 11, "answer": "yes"},
        {"question_id": 12, "answer": "2"},
        {"question_id": 13, "answer": ""},
    ]


def test_vqav2_accuracy(tmp_path):
    good = tmp_path / "a.jsonl"
    good.write_text("".join(line + "\n" for line in (FIX / "vqav2/answers.jsonl").read_text().splitlines()[:2]))
    r = vqa_eval.score_vqav2(FIX / "vqav2/annotations.json", good)
    # yes/no 1.0; number "two"->"2" with 2 of 10 annotators: (2*1/3 + 8*2/3)/10 = 0.6; other missing 0
    assert r["accuracy"] == pytest.approx(100 * 1.6 / 3)
    assert r["per_answer_type"] == pytest.approx({"number": 60.0, "other": 0.0, "yes/no": 100.0})


# ------------------------------------------------------------------------------------------------- GQA
def test_gqa(tmp_path):
    preds = gqa.convert_for_eval(FIX / "gqa/answers.jsonl", tmp_path / "pred.json")
    assert preds[0] == {"questionId": "q1", "prediction": "yes"} and preds[1]["prediction"] == "red"
    questions = json.loads((FIX / "gqa/testdev_balanced_questions.json").read_text())
    r = gqa.score_gqa(questions, json.loads((tmp_path / "pred.json").read_text()))
    # balanced q1 (yes ok), q2 (red ok), q3 (right vs left), q5 (yes vs no); q4 unbalanced
    assert r["samples"] == 4 and r["accuracy"] == 50.0
    assert r["open"] == 100.0 and r["binary"] == pytest.approx(100 / 3)  # binary: q1 ok, q3, q5 wrong
    assert r["consistency"] == 100.0  # q1 right and its entailed q2 right; q5 is wrong so not counted
    assert r["per_structural"] == {"choose": 0.0, "logical": 0.0, "query": 100.0, "verify": 100.0}
    assert r["per_semantic"] == {"attr": 100.0, "obj": 0.0, "rel": 0.0}


# ------------------------------------------------------------------------------------------------- MME
@pytest.mark.parametrize(
    "text, expected",
    [("Yes", "yes"), ("No, there is not.", "no"), ("There is no car", "other"), ("noo", "no"), ("Nope", "no"),
     ("The answer is yes", "other"), ("yes, a bench", "yes")],
)  # fmt: skip
def test_mme_parser(text, expected):
    assert mme.parse_pred(text) == expected


def test_mme_sheet(tmp_path):
    counts = mme.convert_answers(FIX / "mme/answers.jsonl", FIX / "mme/gt", tmp_path)
    assert counts == {"existence": 4, "artwork": 4, "code_reasoning": 2}
    lines = (tmp_path / "artwork.txt").read_text().splitlines()
    # the short-answer suffix is replaced by the yes/no one, with MME's double space where its GT has it
    assert lines[0].split("\t")[1:3] == ["Is this artwork created by Monet?  Please answer yes or no.", "Yes"]
    sheet = mme.score_mme(tmp_path)
    s = sheet["subtasks"]
    # existence: 3/4 right, image 1 both right, image 2 not -> 75 + 50
    assert (s["existence"]["acc"], s["existence"]["acc_plus"], s["existence"]["score"]) == (75.0, 50.0, 125.0)
    # artwork: 10001 both right, 10002 both wrong -> 50 + 50
    assert s["artwork"]["score"] == 100.0
    # code_reasoning: "The answer is yes" is "other" -> 50 + 0
    assert s["code_reasoning"]["score"] == 50.0
    assert sheet["perception"] == 225.0 and sheet["cognition"] == 50.0


# ------------------------------------------------------------------------------------------ submissions
def test_mmbench_submission(tmp_path):
    out = tmp_path / "sub.xlsx"
    n = submission.mmbench_submission(FIX / "mmbench/mmbench_dev.tsv", FIX / "mmbench/answers.jsonl", out)
    assert n == 2
    rows = submission.read_xlsx(out)
    assert rows[0] == ["index", "question", "A", "B", "C", "D", "prediction", "answer", "split"]
    assert rows[1][:2] == ["0", "What color is the square?"] and rows[1][6] == "A"  # round 0, not round 1's "D"
    assert rows[2][6] == "B"


def test_seed_submission(tmp_path):
    out = tmp_path / "seed.jsonl"
    s = submission.seed_submission(FIX / "seed/SEED-Bench.json", FIX / "seed/answers.jsonl", out)
    # type 1: 101 right, 102 wrong; type 2: 103 right, 104 missing
    assert s["per_type"] == {"Scene Understanding": 50.0, "Instance Identity": 50.0}
    assert s["accuracy"] == 50.0 and s["image"] == pytest.approx(200 / 3) and s["video"] == 0.0
    assert read_jsonl(out) == [
        {"question_id": "101", "prediction": "A"},
        {"question_id": "102", "prediction": "B"},
        {"question_id": "103", "prediction": "D"},
        {"question_id": "104", "prediction": ""},
    ]


def test_xlsx_escaping(tmp_path):
    submission.write_xlsx(tmp_path / "x.xlsx", ["a", "b"], [["<&>\x01", 3], [None, math.pi]])
    assert submission.read_xlsx(tmp_path / "x.xlsx") == [["a", "b"], ["<&>", "3"], ["", repr(math.pi)]]
