"""The embedded benchmark: the default model's two held-out splits, in one command.

    python -m eval.embedded                                  # the embedded default model, through the engine
    python -m eval.embedded --model-path DIR --out results/embedded
    python -m eval.embedded --server-url http://localhost:8000     # a running OpenAI-compatible server (/v1 optional)

Two splits of ``fastllava.data.synthetic`` (generated once into ``--data-dir``, the same images and questions the
recipe scores):

* ``heldout``: today's split, ``eval.json`` for ``--seed`` / ``--n-eval``: the canonical question, image first,
  " Answer with a single word.", 48 px scenes on the dark background (per question kind);
* ``robust``: ``robust.json`` for ``--seed`` / ``--n-robust``: the ways people ask -- paraphrases x order (the
  image before or after the text) x suffix x background x image size (per variant group).

Questions are answered greedily, locally by the continuous-batching engine (``eval.runner.EngineBackend``, the
prompt rendered by the model's template as the worker does) or by the server's ``/v1/chat/completions`` (the
image part placed before or after the text part as the split says). An answer is right when its first word,
lower-cased and without punctuation, is the true answer (``synthetic.normalize_answer``, as ``train.evaluate``
scores). Writes ``{split}_answers.jsonl``, ``metrics.json`` and ``summary.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from fastllava.constants import DEFAULT_IMAGE_TOKEN
from fastllava.conversation import conv_templates

from .answers import AnswerWriter
from .questions import Question
from .runner import EngineBackend, GenParams, Prompter, ServerBackend, _image_url, answer_all
from .summary import to_markdown

SPLITS = ("heldout", "robust")


def held_out_split(data_dir: str | Path, seed: int = 0, n_eval: int = 500) -> Path:
    """Today's split as a JSON list of LLaVA records (``eval.json``, generated on first use); returns its path."""
    from fastllava.data.synthetic import generate

    path = Path(data_dir) / "eval.json"
    if not path.is_file():
        generate(data_dir, seed=seed, n_train=0, n_eval=n_eval)
    return path


def robust_split(data_dir: str | Path, seed: int = 0, n_robust: int = 1000) -> Path:
    """The robustness split (``robust.json``, generated on first use); returns its path."""
    from fastllava.data.synthetic import robustness_split

    path = Path(data_dir) / "robust.json"
    return path if path.is_file() else robustness_split(data_dir, seed=seed, n=n_robust)


def split_questions(records_file: str | Path, image_folder: str | Path) -> list[Question]:
    """The records' first human turn as questions: the text without ``<image>``; ``extra["order"]`` says
    where the image goes ("text first" for ``text\\n<image>``), the other fields ride along for scoring."""
    out = []
    for r in json.loads(Path(records_file).read_text()):
        turn = r["conversations"][0]["value"]
        text = turn.replace(DEFAULT_IMAGE_TOKEN, "").strip()
        order = "text first" if turn.strip().endswith(DEFAULT_IMAGE_TOKEN) else "image first"
        extra = {k: v for k, v in r.items() if k not in ("id", "image", "conversations")} | {"order": order}
        out.append(Question(r["id"], text, text, str(Path(image_folder) / r["image"]), extra))
    return out


@dataclass
class PlacedPrompter(Prompter):
    """``Prompter`` that puts the image after the text for questions asked text first: the prompt a
    fastllava server renders for an OpenAI request whose text part comes before the image part."""

    def prompt(self, q: Question) -> str:
        if q.image is None or q.extra.get("order") != "text first":
            return super().prompt(q)
        conv = conv_templates[self.conv_mode].copy()
        conv.append_message(conv.roles[0], q.text + "\n" + DEFAULT_IMAGE_TOKEN)
        conv.append_message(conv.roles[1], None)
        return conv.get_prompt()


@dataclass
class PlacedEngineBackend(EngineBackend):
    def prompter(self, params: GenParams) -> Prompter:
        return PlacedPrompter(self.tokenizer, self.image_processor, self.model.config, self.conv_mode, params.seed)


@dataclass
class PlacedServerBackend(ServerBackend):
    """``ServerBackend`` that sends the image part after the text part for questions asked text first (its
    base class always sends the image first, as LLaVA's evaluation prompts put it)."""

    def run(self, questions, params: GenParams):
        client = self.client()
        self.resolve_model()

        def ask(i: int, q: Question) -> tuple[int, str, dict]:
            parts = [{"type": "text", "text": q.text}, {"type": "image_url", "image_url": {"url": _image_url(q.image)}}]
            content = parts if q.extra.get("order") == "text first" else parts[::-1]
            resp = client.chat.completions.create(
                model=self.model,
                messages=[{"role": "user", "content": content}],
                temperature=0,
                max_tokens=params.max_new_tokens,
            )
            return i, resp.choices[0].message.content or "", {}

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            for fut in as_completed([pool.submit(ask, i, q) for i, q in enumerate(questions)]):
                yield fut.result()


def openai_base_url(server_url: str) -> str:
    """The OpenAI client's base URL for a server given as ``http://HOST:PORT`` or ``http://HOST:PORT/v1``."""
    url = server_url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def make_backend(model_path: str | None, server_url: str | None, conv_mode: str | None, batch_size: int | None):
    """(backend, model name): the server's client, or the local model behind the engine."""
    if server_url:
        backend = PlacedServerBackend(openai_base_url(server_url), concurrency=batch_size or 16)
        return backend, backend.resolve_model()
    import torch

    from fastllava.conversation import guess_conv_mode
    from fastllava.default_model import default_model_path
    from fastllava.mm_utils import get_model_name_from_path
    from fastllava.model.builder import load_pretrained_model

    model_path = str(model_path or default_model_path())
    name = get_model_name_from_path(model_path)
    tokenizer, model, processor, _ = load_pretrained_model(model_path, device="cpu", dtype=torch.float32)
    # None: LLaVA's guess from the folder name, as the worker makes it (the default model's name picks the
    # template it was trained with)
    conv_mode = conv_mode or guess_conv_mode(name)
    return PlacedEngineBackend(model, tokenizer, processor, conv_mode, batch_size=batch_size or 16), name


def score(questions: list[Question], answers: dict) -> dict:
    """Exact-match accuracy (%) overall and per question kind / variant group; unanswered counts as wrong."""
    from fastllava.data.synthetic import ROBUST_GROUPS, group_accuracy

    records = [{"answer": q.extra["answer"], **q.extra} for q in questions]
    keys = tuple(k for k in ROBUST_GROUPS if any(k in r for r in records))  # today's split: kind (and order)
    acc = group_accuracy(records, [answers.get(i, "") for i in range(len(questions))], keys)
    groups = {g: 100.0 * v for g, v in acc.items()}
    return {"samples": len(questions), "accuracy": groups.pop("all"), "groups": groups}


def run_embedded(
    model_path: str | None = None,
    server_url: str | None = None,
    out: str | Path = "results/embedded",
    data_dir: str | Path | None = None,
    seed: int = 0,
    n_eval: int = 500,
    n_robust: int = 1000,
    conv_mode: str | None = None,
    batch_size: int | None = None,
    max_new_tokens: int = 8,
    splits: tuple[str, ...] = SPLITS,
) -> dict:
    """Answer and score the splits; returns ``{split: metrics}`` (also written to ``out/metrics.json``)."""
    from fastllava.default_model import cache_dir

    data_dir = Path(data_dir) if data_dir else cache_dir() / f"shapes-heldout-seed{seed}-n{n_eval}-r{n_robust}"
    files = {"heldout": held_out_split(data_dir, seed, n_eval), "robust": robust_split(data_dir, seed, n_robust)}
    backend, name = make_backend(model_path, server_url, conv_mode, batch_size)
    out = Path(out)
    metrics = {}
    for split in splits:
        questions = split_questions(files[split], data_dir / "images")
        answers_file = out / f"{split}_answers.jsonl"
        answers_file.unlink(missing_ok=True)
        answers = {}
        start = time.perf_counter()
        with AnswerWriter(answers_file) as writer:
            for i, text, _ in answer_all(questions, backend, GenParams(temperature=0, max_new_tokens=max_new_tokens)):
                answers[i], q = text, questions[i]
                writer.write({"question_id": q.question_id, "prompt": q.text, "text": text, "model_id": name} | q.extra)
        metrics[split] = score(questions, answers) | {"seconds": time.perf_counter() - start}
    metrics["model"] = server_url or name
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    rows = {f"{name} {s}": {"accuracy": m["accuracy"], **m["groups"]} for s, m in metrics.items() if s in splits}
    (out / "summary.md").write_text(to_markdown(rows))
    return metrics


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model-path", default=None, help="default: the embedded default model")
    src.add_argument("--server-url", default=None, help="an OpenAI-compatible server: http://host:8000 (or .../v1)")
    p.add_argument("--out", default="results/embedded")
    p.add_argument("--data-dir", default=None, help="where the splits are generated (default: the fastllava cache)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-eval", type=int, default=500)
    p.add_argument("--n-robust", type=int, default=1000)
    p.add_argument("--splits", nargs="+", choices=SPLITS, default=list(SPLITS))
    p.add_argument("--conv-mode", default=None, help="default: guessed from the model's name, as LLaVA does")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--max_new_tokens", type=int, default=8)
    a = p.parse_args(argv)
    m = run_embedded(
        a.model_path, a.server_url, a.out, a.data_dir, a.seed, a.n_eval, a.n_robust, a.conv_mode, a.batch_size,
        a.max_new_tokens, tuple(a.splits),
    )  # fmt: skip
    print(json.dumps({s: {k: m[s][k] for k in ("samples", "accuracy", "seconds")} for s in a.splits}, indent=1))


if __name__ == "__main__":
    main()
