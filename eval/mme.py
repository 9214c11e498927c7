"""MME: answers to the eval_tool's per-subtask files (LLaVA's ``convert_answer_to_mme.py``) and its score sheet.

    python -m eval.mme convert --answers answers/llava-v1.5-13b.jsonl --gt-dir MME_Benchmark_release_version \
        --out-dir eval_tool/answers/llava-v1.5-13b
    python -m eval.mme score --results-dir eval_tool/answers/llava-v1.5-13b

Each subtask file has ``image \\t question \\t gt \\t prediction`` lines, two questions per image. A prediction
reads yes/no if it *is* "yes"/"no", else by which of the two appears in its first four characters (lower-cased),
else "other". Subtask score = 100 * (accuracy + accuracy+), accuracy+ counting images with both questions
right; perception and cognition totals are the sums over their subtasks.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from .answers import read_jsonl

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
SHORT_PROMPT = "Answer the question using a single word or phrase."
YES_NO = "Please answer yes or no."


def parse_pred(text: str) -> str:
    text = text.lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def load_gt(gt_dir: str | Path) -> dict[tuple[str, str, str], str]:
    """{(category, question-file name, question): answer} from the MME release folder (both layouts: txt files
    beside the images, or ``images/`` + ``questions_answers_YN/``)."""
    gt = {}
    for cat_dir in sorted(p for p in Path(gt_dir).iterdir() if p.is_dir()):
        qa = cat_dir / "questions_answers_YN" if (cat_dir / "questions_answers_YN").is_dir() else cat_dir
        for f in sorted(qa.glob("*.txt")):
            for line in f.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    question, answer = line.strip().split("\t")
                    gt[(cat_dir.name, f.name, question)] = answer
    return gt


def convert_answers(answers: str | Path, gt_dir: str | Path, out_dir: str | Path) -> dict[str, int]:
    """Write ``<category>.txt`` eval_tool files; question ids are ``<category>/<image file>``."""
    gt = load_gt(gt_dir)
    rows: dict[str, list[str]] = defaultdict(list)
    for a in read_jsonl(answers):
        category, image = a["question_id"].split("/")[0], a["question_id"].split("/")[-1]
        qfile = image.rsplit(".", 1)[0] + ".txt"
        prompt = a["prompt"].replace(SHORT_PROMPT, "").strip()
        if YES_NO not in prompt:
            prompt = prompt + " " + YES_NO
            if (category, qfile, prompt) not in gt:  # some MME questions have two spaces before it
                prompt = prompt.replace(" " + YES_NO, "  " + YES_NO)
        answer = gt[(category, qfile, prompt)]
        pred = a["text"].replace("\n", " ").replace("\t", " ")
        rows[category].append("\t".join((image, prompt, answer, pred)))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for category, lines in rows.items():
        (out / f"{category}.txt").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return {k: len(v) for k, v in rows.items()}


def score_subtask(lines: list[str]) -> dict:
    """Accuracy, accuracy+ and score of one subtask file's lines."""
    per_image: dict[str, list[bool]] = defaultdict(list)
    right = 0
    for line in lines:
        image, _question, gt, pred = line.rstrip("\n").split("\t")
        gt = gt.lower()
        if gt not in ("yes", "no"):
            raise ValueError(f"MME ground truth must be yes/no, got {gt!r}")
        ok = parse_pred(pred) == gt
        right += ok
        per_image[image].append(ok)
    acc = right / len(lines)
    acc_plus = sum(all(v) for v in per_image.values()) / len(per_image)
    return {"questions": len(lines), "images": len(per_image), "acc": 100 * acc, "acc_plus": 100 * acc_plus,
            "score": 100 * (acc + acc_plus)}  # fmt: skip


def score_mme(results_dir: str | Path) -> dict:
    """The score sheet: every subtask present, plus the perception and cognition totals."""
    results = Path(results_dir)
    sheet: dict = {"benchmark": "mme", "subtasks": {}}
    for group, names in (("perception", PERCEPTION), ("cognition", COGNITION)):
        total = 0.0
        for name in names:
            f = results / f"{name}.txt"
            if f.exists():
                lines = [x for x in f.read_text(encoding="utf-8").splitlines() if x.strip()]
                sheet["subtasks"][name] = score_subtask(lines)
                total += sheet["subtasks"][name]["score"]
        sheet[group] = total
    return sheet


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert")
    c.add_argument("--answers", required=True)
    c.add_argument("--gt-dir", required=True)
    c.add_argument("--out-dir", required=True)
    s = sub.add_parser("score")
    s.add_argument("--results-dir", required=True)
    s.add_argument("--output", "--metrics", dest="output", default=None, help="the sheet as JSON")
    a = p.parse_args(argv)
    if a.cmd == "convert":
        print(json.dumps(convert_answers(a.answers, a.gt_dir, a.out_dir)))
        return
    sheet = score_mme(a.results_dir)
    for group, names in (("Perception", PERCEPTION), ("Cognition", COGNITION)):
        print(f"=========== {group} ===========")
        print(f"total score: {sheet[group.lower()]:.2f}\n")
        for n in names:
            if n in sheet["subtasks"]:
                print(f"\t {n}  score: {sheet['subtasks'][n]['score']:.2f}")
    if a.output:
        Path(a.output).write_text(json.dumps(sheet, indent=1))


if __name__ == "__main__":
    main()
