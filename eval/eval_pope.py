"""LLaVA's ``eval_pope.py`` under its name: the same arguments and printout per category (confusion counts,
accuracy, precision, recall, F1, yes-ratio), computed by ``eval.pope`` (the one implementation).

    python -m eval.eval_pope --annotation-dir coco/ --question-file llava_pope_test.jsonl --result-file answers.jsonl

Differences from LLaVA, on purpose: answers are put in question-file order before they meet the labels (LLaVA
takes the answers file's order, so merged chunk files must be in order); categories print in sorted order
(LLaVA: ``os.listdir`` order); a ratio with a zero denominator prints 0.0 (LLaVA raises ZeroDivisionError).
"""

from __future__ import annotations

import argparse
import json

from .answers import read_jsonl
from .pope import parse_yes_no, pope_metrics, score_pope


def print_metrics(m: dict) -> None:
    """One category's block, line for line LLaVA's."""
    print("TP\tFP\tTN\tFN\t")
    print("{}\t{}\t{}\t{}".format(m["TP"], m["FP"], m["TN"], m["FN"]))
    print("Accuracy: {}".format(m["accuracy"]))
    print("Precision: {}".format(m["precision"]))
    print("Recall: {}".format(m["recall"]))
    print("F1 score: {}".format(m["f1"]))
    print("Yes ratio: {}".format(m["yes_ratio"]))
    print(", ".join(f"{m[k]:.3f}" for k in ("f1", "accuracy", "precision", "recall", "yes_ratio")))


def eval_pope(answers: list[dict], label_file: str) -> dict:
    """LLaVA's function: score ``answers`` (in order) against the labels of ``label_file`` and print them."""
    labels = [r["label"] for r in read_jsonl(label_file)]
    m = pope_metrics([parse_yes_no(a["text"]) for a in answers], labels)
    print_metrics(m)
    return m


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--annotation-dir", required=True)
    p.add_argument("--question-file", required=True)
    p.add_argument("--result-file", required=True)
    p.add_argument("--metrics", default=None, help="also write the metrics as JSON here (for eval.summary)")
    a = p.parse_args(argv)
    r = score_pope(a.annotation_dir, a.question_file, a.result_file)
    for category, m in r["categories"].items():
        print("Category: {}, # samples: {}".format(category, m["samples"]))
        print_metrics(m)
        print("====================================")
    if a.metrics:
        with open(a.metrics, "w") as f:
            json.dump(r, f, indent=1)
    return r


if __name__ == "__main__":
    main()
