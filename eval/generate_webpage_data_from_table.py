"""LLaVA's ``generate_webpage_data_from_table.py``: the ``data.json`` that ``eval/webpage/index.html`` shows —
each question with the models' answers side by side, the judge's review and scores.

    python -m eval.generate_webpage_data_from_table --question table/question.jsonl \
        --answers vicuna=table/answer/answer_vicuna-13b.jsonl --ours table/results/ours.jsonl \
        --review vicuna=table/review/review_vicuna-13b_ours.jsonl --out eval/webpage/data.json
    python -m http.server -d eval/webpage 8000     # then open http://127.0.0.1:8000

LLaVA hard-codes one reference model (vicuna) and its file paths; here each ``--answers NAME=FILE`` adds a
model, ``--review NAME=FILE`` its review against ours (``eval.gpt_review`` / ``eval_gpt_review*`` output). The
records are LLaVA's (``id, category, question, answers, evaluations, scores``; a review's first line of scores
dropped and "Assistant 1/2" in bold). ``--llava-order`` applies LLaVA's reordering of its 80 questions; without it
the records are in question-id order.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path


def read_jsonl(path: str, key: str | None = None):
    data = [json.loads(line) for line in open(os.path.expanduser(path)) if line.strip()]
    if key is not None:
        data.sort(key=lambda x: x[key])
        return {item[key]: item for item in data}
    return data


def clean_review(text: str) -> str:
    """LLaVA's cleanup: drop a first line of two scores; embolden the assistants' names."""
    lines = text.strip().split("\n")
    if re.match(r"\d+[, ]+\d+", lines[0]):
        lines = lines[1:]
    return "\n".join(lines).replace("Assistant 1", "**Assistant 1**").replace("Assistant 2", "**Assistant 2**")


def llava_order(records: list[dict]) -> None:
    """LLaVA's reordering of its question table (ids 1-80), in place."""
    for r in records:
        r["id"] = r["id"] + 60 if r["id"] <= 20 else r["id"] - 20
    for r in records:
        if r["id"] <= 50:
            r["id"] += 10
        elif 50 < r["id"] <= 60:
            r["id"] -= 50
    for r in records:
        if r["id"] == 7:
            r["id"] = 1
        elif r["id"] < 7:
            r["id"] += 1


def build_records(questions: dict, answers: dict[str, dict], ours: dict, reviews: dict[str, dict]) -> list[dict]:
    records = []
    for qid, q in questions.items():
        records.append({
            "id": qid,
            "category": q["category"],
            "question": q["text"],
            "answers": {**{name: a[qid]["text"] for name, a in answers.items()}, "ours": ours[qid]["text"]},
            "evaluations": {name: clean_review(r[qid]["content"]) for name, r in reviews.items()},
            "scores": {name: r[qid]["tuple"] for name, r in reviews.items()},
        })  # fmt: skip
    return records


def _named(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            raise SystemExit(f"error: expected NAME=FILE, got {item!r}")
        out[name] = path
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--question", default="table/question.jsonl")
    p.add_argument("--answers", nargs="+", default=["vicuna=table/answer/answer_vicuna-13b.jsonl"])
    p.add_argument("--ours", default="table/results/llama-13b-hf-alpaca.jsonl")
    p.add_argument("--review", nargs="*", default=["vicuna=table/review/review_vicuna-13b_llama-13b-hf-alpaca.jsonl"])
    p.add_argument("--out", default="webpage/data.json")
    p.add_argument("--llava-order", action="store_true", help="LLaVA's reordering of its 80-question table")
    a = p.parse_args(argv)
    answer_files, review_files = _named(a.answers), _named(a.review)
    records = build_records(
        read_jsonl(a.question, key="question_id"),
        {name: read_jsonl(f, key="question_id") for name, f in answer_files.items()},
        read_jsonl(a.ours, key="question_id"),
        {name: read_jsonl(f, key="question_id") for name, f in review_files.items()},
    )
    if a.llava_order:
        llava_order(records)
    records.sort(key=lambda x: x["id"])
    data = {"questions": records, "models": list(answer_files)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(data, f, indent=2)
    return data


if __name__ == "__main__":
    main()
