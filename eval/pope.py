"""POPE (object hallucination): LLaVA's yes/no parsing and its per-category accuracy, precision, recall, F1, yes-ratio.

    python -m eval.pope --annotation-dir coco/ --question-file llava_pope_test.jsonl --result-file answers.jsonl

``--annotation-dir`` holds ``coco_pope_<category>.json`` (jsonl: one ``{"question_id", ..., "label"}`` per line);
each category's answers are matched to its labels in question-file order, as LLaVA's ``eval_pope.py`` does.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .answers import read_jsonl


def parse_yes_no(text: str) -> str:
    """LLaVA's POPE parser: keep the first sentence, drop commas, split on spaces; ``no`` if a word is exactly
    ``No``, ``no`` or ``not`` (case-sensitive: ``NO`` and ``Not`` read as yes), else ``yes``."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_metrics(preds: list[str], labels: list[str]) -> dict:
    """Confusion counts and metrics with "yes" as the positive class (0.0 where a ratio is undefined)."""
    pairs = list(zip(preds, labels, strict=False))  # LLaVA zips: extra labels or answers are ignored
    tp = sum(p == "yes" and g != "no" for p, g in pairs)
    fp = sum(p == "yes" and g == "no" for p, g in pairs)
    tn = sum(p == "no" and g == "no" for p, g in pairs)
    fn = sum(p == "no" and g != "no" for p, g in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n = len(pairs)
    return {
        "samples": n,
        "TP": tp,
        "FP": fp,
        "TN": tn,
        "FN": fn,
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": sum(p == "yes" for p in preds) / len(preds) if preds else 0.0,
    }


def score_pope(annotation_dir: str | Path, question_file: str | Path, result_file: str | Path) -> dict:
    """Per-category POPE metrics plus their mean (LLaVA reports the mean F1 over the three categories)."""
    questions = read_jsonl(question_file)
    category = {json.dumps(q["question_id"]): q["category"] for q in questions}
    position = {json.dumps(q["question_id"]): i for i, q in enumerate(questions)}
    answers = read_jsonl(result_file)
    answers.sort(key=lambda a: position.get(json.dumps(a["question_id"]), len(position)))
    per_cat = {}
    for f in sorted(Path(annotation_dir).iterdir()):
        if not (f.name.startswith("coco_pope_") and f.name.endswith(".json")):
            continue
        cat = f.name[len("coco_pope_") : -len(".json")]
        labels = [r["label"] for r in read_jsonl(f)]
        cur = [a for a in answers if category.get(json.dumps(a["question_id"])) == cat]
        per_cat[cat] = pope_metrics([parse_yes_no(a["text"]) for a in cur], labels)
    if not per_cat:
        raise FileNotFoundError(f"no coco_pope_<category>.json files in {annotation_dir}")
    keys = ("accuracy", "precision", "recall", "f1", "yes_ratio")
    mean = {k: sum(m[k] for m in per_cat.values()) / len(per_cat) for k in keys}
    return {"benchmark": "pope", "categories": per_cat, "mean": mean, "f1": 100 * mean["f1"]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--annotation-dir", required=True)
    p.add_argument("--question-file", required=True)
    p.add_argument("--result-file", required=True)
    p.add_argument("--output", "--metrics", dest="output", default=None, help="also write the metrics as JSON here")
    a = p.parse_args(argv)
    r = score_pope(a.annotation_dir, a.question_file, a.result_file)
    for cat, m in r["categories"].items():
        print(f"Category: {cat}, # samples: {m['samples']}")
        print("TP\tFP\tTN\tFN\t")
        print(f"{m['TP']}\t{m['FP']}\t{m['TN']}\t{m['FN']}")
        for k in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
            print(f"{k}: {m[k]:.4f}")
        print(f"{m['f1']:.3f}, {m['accuracy']:.3f}, {m['precision']:.3f}, {m['recall']:.3f}, {m['yes_ratio']:.3f}")
        print("====================================")
    print(f"mean F1: {r['f1']:.2f}")
    if a.output:
        Path(a.output).write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
