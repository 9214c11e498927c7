"""The embedded benchmark: the held-out split of the synthetic shapes set, in one command.

    python -m eval.embedded                                  # the embedded default model
    python -m eval.embedded --model-path DIR --out results/embedded
    python -m eval.embedded --server-url http://localhost:8000/v1     # a running OpenAI-compatible server

The split is ``fastllava.data.synthetic``'s ``eval.json`` for ``--seed`` / ``--n-eval`` (generated once into
``--data-dir``, the same images and questions the training issue evaluates on), turned into LLaVA's question
jsonl and answered by ``eval.model_vqa`` (greedy). An answer is right when its first word, lower-cased and without
punctuation, is the true answer (``synthetic.normalize_answer``, as ``train.evaluate`` scores). Writes
``answers.jsonl``, ``metrics.json`` and ``summary.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

from .answers import read_jsonl
from .summary import to_markdown


def held_out_split(data_dir: str | Path, seed: int = 0, n_eval: int = 500) -> Path:
    """LLaVA question jsonl of the synthetic eval split (generated on first use); returns its path."""
    from fastllava.data.synthetic import generate

    data_dir = Path(data_dir)
    questions = data_dir / "llava_questions.jsonl"
    if questions.is_file():
        return questions
    _, eval_json = generate(data_dir, seed=seed, n_train=0, n_eval=n_eval)
    records = json.loads(Path(eval_json).read_text())
    tmp = questions.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            text = r["conversations"][0]["value"].replace("<image>", "").strip()
            row = {"question_id": r["id"], "image": r["image"], "text": text, "answer": r["answer"], "kind": r["kind"]}
            f.write(json.dumps(row) + "\n")
    tmp.replace(questions)
    return questions


def score_embedded(question_file: str | Path, answers_file: str | Path) -> dict:
    """Exact-match accuracy (%) overall and per question kind; unanswered questions count as wrong."""
    from fastllava.data.synthetic import normalize_answer

    answers = {json.dumps(a["question_id"]): a["text"] for a in read_jsonl(answers_file)}
    right, total = Counter(), Counter()
    for q in read_jsonl(question_file):
        ok = normalize_answer(answers.get(json.dumps(q["question_id"]), "")) == normalize_answer(q["answer"])
        for k in ("all", q.get("kind", "all")):
            right[k] += ok
            total[k] += 1
    n = total["all"]
    return {
        "benchmark": "embedded",
        "samples": n,
        "accuracy": 100.0 * right["all"] / n if n else 0.0,
        "per_kind": {k: 100.0 * right[k] / total[k] for k in sorted(total) if k != "all"},
    }


def run_embedded(
    model_path: str | None = None,
    server_url: str | None = None,
    out: str | Path = "results/embedded",
    data_dir: str | Path | None = None,
    seed: int = 0,
    n_eval: int = 500,
    conv_mode: str | None = None,
    batch_size: int | None = None,
    max_new_tokens: int = 8,
    extra_args: list[str] | None = None,
    resume: bool = False,
) -> dict:
    """Answer and score the held-out split; returns the metrics (also written to ``out/metrics.json``).

    ``conv_mode`` None: LLaVA's guess from the model's folder name, as the worker makes it (the default model's
    name picks the template it was trained with). A server applies its own template to the chat requests, so
    ``conv_mode`` does not change what it is asked.
    """
    from fastllava.conversation import guess_conv_mode
    from fastllava.default_model import cache_dir, default_model_path
    from fastllava.mm_utils import get_model_name_from_path

    from .model_vqa import build_parser, run

    data_dir = Path(data_dir) if data_dir else cache_dir() / f"shapes-heldout-seed{seed}-n{n_eval}"
    questions = held_out_split(data_dir, seed, n_eval)
    out = Path(out)
    if not server_url:
        model_path = str(model_path or default_model_path())
    conv_mode = conv_mode or ("llava_v1" if server_url else guess_conv_mode(get_model_name_from_path(model_path)))
    argv = ["--question-file", str(questions), "--image-folder", str(data_dir / "images")]
    argv += ["--answers-file", str(out / "answers.jsonl"), "--conv-mode", conv_mode, "--temperature", "0"]
    argv += ["--max_new_tokens", str(max_new_tokens)] + ([] if resume else ["--overwrite"])
    if server_url:
        argv += ["--server-url", server_url]
    else:
        argv += ["--model-path", model_path]
    if batch_size:
        argv += ["--batch-size", str(batch_size)]
    args = build_parser().parse_args(argv + list(extra_args or []))
    start = time.perf_counter()
    answers = run(args)
    seconds = time.perf_counter() - start
    metrics = score_embedded(questions, answers)
    metrics.update({"model": server_url or str(args.model_path), "seconds": seconds})
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    row = {"Embedded": metrics["accuracy"], **{f"{k}": v for k, v in metrics["per_kind"].items()}}
    (out / "summary.md").write_text(to_markdown({Path(metrics["model"]).name or metrics["model"]: row}))
    return metrics


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model-path", default=None, help="default: the embedded default model")
    src.add_argument("--server-url", default=None, help="an OpenAI-compatible server, e.g. http://host:8000/v1")
    p.add_argument("--out", default="results/embedded")
    p.add_argument("--data-dir", default=None, help="where the split is generated (default: the fastllava cache)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-eval", type=int, default=500)
    p.add_argument("--conv-mode", default=None, help="default: guessed from the model's name, as LLaVA does")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--max_new_tokens", type=int, default=8)
    p.add_argument("--resume", action="store_true", help="keep the answers already in --out (same model only)")
    a, rest = p.parse_known_args(argv)
    m = run_embedded(
        a.model_path, a.server_url, a.out, a.data_dir, a.seed, a.n_eval, a.conv_mode, a.batch_size,
        a.max_new_tokens, rest, a.resume,
    )  # fmt: skip
    print(json.dumps({k: m[k] for k in ("samples", "accuracy", "per_kind", "seconds")}, indent=1))


if __name__ == "__main__":
    main()
