"""GQA: LLaVA's prediction file (``convert_gqa_for_eval.py``) and the accuracy breakdown of GQA's ``eval.py``.

    python -m eval.gqa convert --src merge.jsonl --dst testdev_balanced_predictions.json
    python -m eval.gqa score --questions testdev_balanced_questions.json --predictions testdev_balanced_predictions.json

Predictions are the answer text with trailing periods stripped and lower-cased; a question is right when the
prediction equals its answer exactly. Scored over balanced questions: accuracy, binary (every structural type but
``query``) and open (``query``) accuracy, accuracy per structural and semantic type, and consistency (accuracy on
the entailed questions of each correctly answered one, where those have predictions).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .answers import read_jsonl


def gqa_prediction(text: str) -> str:
    return text.rstrip(".").lower()


def convert_for_eval(src: str | Path, dst: str | Path) -> list[dict]:
    preds = [{"questionId": r["question_id"], "prediction": gqa_prediction(r["text"])} for r in read_jsonl(src)]
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    Path(dst).write_text(json.dumps(preds))
    return preds


def _pct(xs: list[float]) -> float:
    return 100.0 * sum(xs) / len(xs) if xs else 0.0


def score_gqa(questions: dict, predictions: list[dict]) -> dict:
    """GQA's scores (in %) for ``questions`` (the official ``{qid: question}`` JSON) and predictions."""
    pred = {str(p["questionId"]): p["prediction"] for p in predictions}
    acc, binary, open_, consistency = [], [], [], []
    structural: dict[str, list[float]] = {}
    semantic: dict[str, list[float]] = {}
    missing = 0
    for qid, q in questions.items():
        if not q.get("isBalanced", True):
            continue
        missing += qid not in pred
        ok = float(pred.get(qid) == q["answer"])
        acc.append(ok)
        types = q.get("types", {})
        (open_ if types.get("structural") == "query" else binary).append(ok)
        structural.setdefault(types.get("structural", "unknown"), []).append(ok)
        semantic.setdefault(types.get("semantic", "unknown"), []).append(ok)
        entailed = [e for e in q.get("entailed", []) if e != qid and e in questions and e in pred]
        if ok and entailed:
            consistency.append(sum(float(pred[e] == questions[e]["answer"]) for e in entailed) / len(entailed))
    return {
        "benchmark": "gqa",
        "samples": len(acc),
        "missing": missing,
        "accuracy": _pct(acc),
        "binary": _pct(binary),
        "open": _pct(open_),
        "consistency": _pct(consistency),
        "per_structural": {k: _pct(v) for k, v in sorted(structural.items())},
        "per_semantic": {k: _pct(v) for k, v in sorted(semantic.items())},
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert")
    c.add_argument("--src", required=True)
    c.add_argument("--dst", required=True)
    s = sub.add_parser("score")
    s.add_argument("--questions", required=True)
    s.add_argument("--predictions", required=True)
    s.add_argument("--metrics", default=None, help="also write the metrics as JSON here (for eval.summary)")
    a = p.parse_args(argv)
    if a.cmd == "convert":
        print(f"wrote {len(convert_for_eval(a.src, a.dst))} predictions to {a.dst}")
    else:
        r = score_gqa(json.loads(Path(a.questions).read_text()), json.loads(Path(a.predictions).read_text()))
        for k in ("binary", "open", "accuracy", "consistency"):
            print(f"{k.capitalize()}: {r[k]:.2f}%")
        if a.metrics:
            Path(a.metrics).write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
