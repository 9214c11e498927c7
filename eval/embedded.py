"""The embedded benchmark: the default model's two held-out splits, in one command.

    python -m eval.embedded                                  # the embedded default model, through the engine
    python -m eval.embedded --model-path DIR --out results/embedded
    python -m eval.embedded --server-url http://localhost:8000      # an OpenAI-compatible server (/v1 optional)

* today's split: ``fastllava.data.synthetic``'s ``eval.json`` for ``--seed`` / ``--n-eval`` (generated once into
  ``--data-dir``, the same images and questions the recipe scores), turned into LLaVA's question jsonl and
  answered by ``eval.model_vqa`` (greedy): the canonical question, image first, " Answer with a single word.",
  48 px scenes on the dark background; scored per question kind;
* the robustness split: ``robust.json`` for ``--seed`` / ``--n-robust`` (``synthetic.robustness_split``): the
  ways people ask -- paraphrases x order (the image before or after the text) x suffix x background x image
  size; answered by the same engine (``eval.runner.EngineBackend``) or server, the image placed before or after
  the text as the split says; scored per variant group.

An answer is right when its first word, lower-cased and without punctuation, is the true answer
(``synthetic.normalize_answer``, as ``train.evaluate`` scores). Writes ``answers.jsonl`` (today's split),
``robust_answers.jsonl``, ``metrics.json`` and ``summary.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from fastllava.constants import DEFAULT_IMAGE_TOKEN
from fastllava.conversation import conv_templates

from .answers import AnswerWriter, read_jsonl
from .questions import Question
from .runner import EngineBackend, GenParams, Prompter, ServerBackend, answer_all, image_url_of
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


def robust_split(data_dir: str | Path, seed: int = 0, n_robust: int = 1000) -> Path:
    """The robustness split (``robust.json``, generated on first use); returns its path."""
    from fastllava.data.synthetic import robustness_split

    path = Path(data_dir) / "robust.json"
    if path.is_file() and len(json.loads(path.read_text())) == n_robust:
        return path
    return robustness_split(data_dir, seed=seed, n=n_robust)


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
            parts = [
                {"type": "text", "text": q.text},
                {"type": "image_url", "image_url": {"url": image_url_of(q.image)}},
            ]
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


def run_robust(backend, questions_file: Path, image_folder: Path, answers_file: Path, model_name: str,
               max_new_tokens: int = 8) -> dict:  # fmt: skip
    """Answer the robustness split with ``backend`` (a placed engine or server backend); returns its metrics."""
    from fastllava.data.synthetic import ROBUST_GROUPS, group_accuracy

    questions = split_questions(questions_file, image_folder)
    answers_file.unlink(missing_ok=True)
    texts: dict[int, str] = {}
    start = time.perf_counter()
    with AnswerWriter(answers_file) as writer:
        for i, text, _ in answer_all(questions, backend, GenParams(temperature=0, max_new_tokens=max_new_tokens)):
            texts[i], q = text, questions[i]
            writer.write(
                {"question_id": q.question_id, "prompt": q.text, "text": text, "model_id": model_name} | q.extra
            )
    records = [q.extra for q in questions]
    acc = group_accuracy(records, [texts.get(i, "") for i in range(len(questions))], ROBUST_GROUPS)
    groups = {g: 100.0 * v for g, v in acc.items()}
    return {"samples": len(questions), "accuracy": groups.pop("all"), "groups": groups,
            "seconds": time.perf_counter() - start}  # fmt: skip


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
    n_robust: int = 0,
) -> dict:
    """Answer and score today's split and, with ``n_robust`` > 0 (the command's default: 1,000), the robustness
    split; returns the metrics, the robustness split's under ``"robust"`` (also written to ``out/metrics.json``).

    ``conv_mode`` None: LLaVA's guess from the model's folder name, as the worker makes it (the default model's
    name picks the template it was trained with). A server applies its own template to the chat requests, so
    ``conv_mode`` does not change what it is asked. ``server_url``: ``http://HOST:PORT``, ``/v1`` optional.
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
        server_url = openai_base_url(server_url)
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
    row = {"Embedded": metrics["accuracy"], **{f"{k}": v for k, v in metrics["per_kind"].items()}}
    if n_robust:
        backend, name = make_backend(args.model_path, server_url, conv_mode, batch_size)
        robust = robust_split(data_dir, seed, n_robust)
        metrics["robust"] = run_robust(backend, robust, data_dir / "images", out / "robust_answers.jsonl", name,
                                       max_new_tokens)  # fmt: skip
        row["Robust"] = metrics["robust"]["accuracy"]
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    (out / "summary.md").write_text(to_markdown({Path(metrics["model"]).name or metrics["model"]: row}))
    return metrics


def make_backend(model_path: str | None, server_url: str | None, conv_mode: str, batch_size: int | None):
    """(backend, model name) for the robustness split: the server's client, or the local model behind the
    engine (loaded as the worker loads it)."""
    if server_url:
        backend = PlacedServerBackend(openai_base_url(server_url), concurrency=batch_size or 16)
        return backend, backend.resolve_model()
    import torch

    from fastllava.mm_utils import get_model_name_from_path
    from fastllava.model.builder import load_pretrained_model

    tokenizer, model, processor, _ = load_pretrained_model(model_path, device="cpu", dtype=torch.float32)
    backend = PlacedEngineBackend(model, tokenizer, processor, conv_mode, batch_size=batch_size or 16)
    return backend, get_model_name_from_path(model_path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model-path", default=None, help="default: the embedded default model")
    src.add_argument("--server-url", default=None, help="an OpenAI-compatible server: http://host:8000 (or .../v1)")
    p.add_argument("--out", default="results/embedded")
    p.add_argument("--data-dir", default=None, help="where the split is generated (default: the fastllava cache)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-eval", type=int, default=500)
    p.add_argument("--n-robust", type=int, default=1000, help="questions of the robustness split (0: skip it)")
    p.add_argument("--conv-mode", default=None, help="default: guessed from the model's name, as LLaVA does")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--max_new_tokens", type=int, default=8)
    p.add_argument("--resume", action="store_true", help="keep the answers already in --out (same model only)")
    a, rest = p.parse_known_args(argv)
    m = run_embedded(
        a.model_path, a.server_url, a.out, a.data_dir, a.seed, a.n_eval, a.conv_mode, a.batch_size,
        a.max_new_tokens, rest, a.resume, a.n_robust,
    )  # fmt: skip
    shown = {k: m[k] for k in ("samples", "accuracy", "per_kind", "seconds")}
    if "robust" in m:
        shown["robust"] = {k: m["robust"][k] for k in ("samples", "accuracy", "groups", "seconds")}
    print(json.dumps(shown, indent=1))


if __name__ == "__main__":
    main()
