"""ScienceQA: LLaVA's answer extraction (``eval_science_qa.py``, v1.5) and overall / image-only accuracy.

    python -m eval.science_qa --base-dir ScienceQA/data/scienceqa --result-file answers.jsonl \
        --output-file sqa_output.json --output-result sqa_result.json

``--base-dir`` holds ``problems.json`` and ``pid_splits.json``. A problem with no prediction counts as wrong; an
answer that cannot be parsed, or names a letter past the problem's choices, is wrong (never a random guess).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from .answers import read_jsonl

OPTIONS = ("A", "B", "C", "D", "E")
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")  # sic: '.' is any character, so a letter at the very end fails


def extract_answer(text: str, options: tuple[str, ...] = OPTIONS) -> str:
    """The option letter a prediction gives, or ``"FAILED"``: the whole text is a letter; it starts with
    ``"X. "``; or it holds exactly one ``"The answer is X"`` followed by some character."""
    if text in options:
        return text
    if len(text) >= 3 and text[0] in options and text[1:3] == ". ":
        return text[0]
    found = _ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else "FAILED"


def pred_index(answer: str, num_choices: int, options: tuple[str, ...] = OPTIONS) -> int:
    """Index of the chosen option, -1 when it is not one of the first ``num_choices`` letters."""
    return options.index(answer) if answer in options[:num_choices] else -1


def score_science_qa(base_dir: str | Path, result_file: str | Path, split: str = "test") -> tuple[dict, dict]:
    """Returns (summary, LLaVA's per-problem analysis ``{"correct": [...], "incorrect": [...]}``)."""
    base = Path(base_dir)
    split_ids = json.loads((base / "pid_splits.json").read_text())[split]
    problems = json.loads((base / "problems.json").read_text())
    preds = {str(p["question_id"]): p for p in read_jsonl(result_file)}
    results: dict[str, list] = {"correct": [], "incorrect": []}
    outputs, parsed = {}, {}
    for pid in split_ids:
        prob = problems[pid]
        pred = preds.get(pid, {"text": "FAILED", "prompt": "Unknown"})
        answer = extract_answer(pred["text"])
        idx = pred_index(answer, len(prob["choices"]))
        analysis = {
            "question_id": pid,
            "parsed_ans": answer,
            "ground_truth": OPTIONS[prob["answer"]],
            "question": pred["prompt"],
            "pred": pred["text"],
            "is_multimodal": "<image>" in pred["prompt"],
        }
        outputs[pid], parsed[pid] = pred["text"], idx
        results["correct" if idx == prob["answer"] else "incorrect"].append(analysis)
    correct, total = len(results["correct"]), len(results["correct"]) + len(results["incorrect"])
    img_correct = sum(a["is_multimodal"] for a in results["correct"])
    img_total = img_correct + sum(a["is_multimodal"] for a in results["incorrect"])
    summary = {
        "benchmark": "scienceqa",
        "count": total,
        "correct": correct,
        "acc": 100.0 * correct / total if total else 0.0,
        "img_count": img_total,
        "img_correct": img_correct,
        "img_acc": 100.0 * img_correct / img_total if img_total else 0.0,
        "results": parsed,
        "outputs": outputs,
    }
    return summary, results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-dir", required=True)
    p.add_argument("--result-file", required=True)
    p.add_argument("--output-file", default=None, help="per-problem analysis (correct / incorrect)")
    p.add_argument(
        "--output-result", "--metrics", dest="output_result", default=None, help="accuracy, counts, parsed answers"
    )
    p.add_argument("--split", default="test")
    a = p.parse_args(argv)
    summary, results = score_science_qa(a.base_dir, a.result_file, a.split)
    print(
        f"Total: {summary['count']}, Correct: {summary['correct']}, Accuracy: {summary['acc']:.2f}%, "
        f"IMG-Accuracy: {summary['img_acc']:.2f}%"
    )
    if a.output_file:
        Path(a.output_file).write_text(json.dumps(results, indent=2))
    if a.output_result:
        Path(a.output_result).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
