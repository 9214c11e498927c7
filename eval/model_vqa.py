"""LLaVA's ``model_vqa`` family with its arguments and files, answered in batches through the engine.

    python -m eval.model_vqa --model-path DIR --question-file q.jsonl --image-folder imgs/ --answers-file a.jsonl \
        --conv-mode llava_v1 --temperature 0
    python -m eval.model_vqa_loader ...        # same, --max_new_tokens defaults to 128 (LLaVA's loader script)
    python -m eval.model_vqa_science ... --single-pred-prompt       # ScienceQA json
    python -m eval.model_vqa_mmbench ... --single-pred-prompt [--all-rounds] [--lang cn]   # MMBench tsv

    # several GPUs: one process per chunk, then merge (LLaVA's scripts), or torchrun (chunks + merge built in)
    CUDA_VISIBLE_DEVICES=0 python -m eval.model_vqa ... --num-chunks 2 --chunk-idx 0 --answers-file a/2_0.jsonl &
    CUDA_VISIBLE_DEVICES=1 python -m eval.model_vqa ... --num-chunks 2 --chunk-idx 1 --answers-file a/2_1.jsonl
    python -m eval.answers merge --output a/merge.jsonl a/2_0.jsonl a/2_1.jsonl
    torchrun --nproc-per-node 8 -m eval.model_vqa ... --answers-file a/merge.jsonl

Differences from LLaVA, all on purpose: questions run through the continuous-batching engine (``--backend
static`` gives padded ``generate`` batches, ``--batch-size 1`` LLaVA's one-at-a-time loop); a partially written
answers file is resumed, not overwritten (``--overwrite`` to start again); answers are written in question order;
each question samples with its own seed (``--seed``), so answers do not depend on batching; ``--server-url``
answers through an OpenAI-compatible server instead of a local model.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from .answers import AnswerWriter, chunk_file, get_chunk, load_done, merge_files, remaining, short_uuid
from .questions import Question, load_mmbench, load_science_qa, load_vqa_jsonl
from .runner import EngineBackend, GenParams, ServerBackend, StaticBackend, answer_all

FORMATS = ("jsonl", "science", "mmbench")


def build_parser(fmt: str = "jsonl", max_new_tokens: int = 1024) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", type=str, default=None)
    p.add_argument("--model-base", type=str, default=None)
    p.add_argument("--image-folder", type=str, default="")
    p.add_argument("--question-file", type=str, default="tables/question.jsonl")
    p.add_argument("--answers-file", type=str, default="answer.jsonl")
    p.add_argument("--conv-mode", type=str, default="llava_v0" if fmt == "science" else "llava_v1")
    p.add_argument("--num-chunks", type=int, default=1)
    p.add_argument("--chunk-idx", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--num_beams", type=int, default=1)
    p.add_argument("--max_new_tokens", type=int, default=max_new_tokens)
    p.add_argument("--single-pred-prompt", action="store_true")
    p.add_argument("--all-rounds", action="store_true", help="MMBench: every circular rotation of the options")
    p.add_argument("--lang", type=str, default="en", help="MMBench: en | cn")
    p.add_argument("--answer-prompter", action="store_true", help="accepted for LLaVA compatibility; ignored")
    # fastllava additions
    p.add_argument("--backend", choices=("engine", "static"), default="engine")
    p.add_argument("--batch-size", type=int, default=None, help="engine max_num_seqs / static batch size")
    p.add_argument("--device", type=str, default=None, help="default: cuda when available, else cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="start a fresh answers file instead of resuming")
    p.add_argument("--server-url", type=str, default=None, help="answer through an OpenAI-compatible server")
    p.add_argument("--server-model", type=str, default=None, help="default: the first model the server lists")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(format=fmt)
    return p


def load_questions(args) -> list[Question]:
    if args.format == "science":
        return load_science_qa(args.question_file, args.image_folder, args.single_pred_prompt)
    if args.format == "mmbench":
        return load_mmbench(args.question_file, args.all_rounds, args.single_pred_prompt, args.lang)
    return load_vqa_jsonl(args.question_file, args.image_folder)


def _distributed() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) under torchrun, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))
    return None


def _conv_mode(args, model_name: str) -> str:
    from fastllava.conversation import conv_templates

    mode = args.conv_mode
    # LLaVA's loader/mmbench scripts: a pretrain-only ("plain") model gets the mmtag variant of the template
    if "plain" in model_name and "finetune" not in model_name.lower() and "mmtag" not in mode:
        if mode + "_mmtag" in conv_templates:
            mode = mode + "_mmtag"
            print(f"It seems that this is a plain model, but it is not using a mmtag prompt, auto switching to {mode}.")
    if mode not in conv_templates:
        raise SystemExit(f"error: --conv-mode {mode!r} is unknown; choose from {sorted(conv_templates)}")
    return mode


def make_backend(args, device: str):
    """(backend, model name) for the arguments: a server client, or a local model behind the engine / generate."""
    if args.server_url:
        backend = ServerBackend(args.server_url, args.server_model, concurrency=args.batch_size or 16)
        return backend, backend.resolve_model()
    if not args.model_path:
        raise SystemExit("error: --model-path (or --server-url) is required")
    from fastllava.mm_utils import get_model_name_from_path
    from fastllava.model.builder import load_pretrained_model

    model_path = os.path.expanduser(args.model_path)
    model_name = get_model_name_from_path(model_path)
    tokenizer, model, image_processor, _ = load_pretrained_model(model_path, args.model_base, model_name, device=device)
    conv_mode = _conv_mode(args, model_name)
    batch = args.batch_size or (64 if device.startswith("cuda") else 16)
    cls = EngineBackend if args.backend == "engine" else StaticBackend
    return cls(model, tokenizer, image_processor, conv_mode, batch_size=batch), model_name


def run(args) -> Path:
    """Answer the chunk's questions not yet in the answers file; returns the answers file written."""
    dist = _distributed()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    answers_file = Path(os.path.expanduser(args.answers_file))
    if dist is not None and args.num_chunks == 1:
        rank, world, local = dist
        args.num_chunks, args.chunk_idx = world, rank
        if device == "cuda":
            device = f"cuda:{local}"
            torch.cuda.set_device(local)
        out_file = chunk_file(answers_file, world, rank)
    else:
        out_file = answers_file
    all_questions = load_questions(args)
    questions = list(get_chunk(all_questions, args.num_chunks, args.chunk_idx))
    if args.overwrite and out_file.exists():
        out_file.unlink()
    done = load_done(out_file)
    todo = remaining(questions, done)
    params = GenParams(args.temperature, args.top_p, args.max_new_tokens, args.num_beams, args.seed)
    print(
        f"{len(questions)} questions in chunk {args.chunk_idx}/{args.num_chunks}: {len(questions) - len(todo)} "
        "already answered"
    )
    if todo:
        backend, model_name = make_backend(args, device)
        _answer(todo, backend, params, model_name, out_file, len(questions), len(questions) - len(todo), args)
    else:
        out_file.parent.mkdir(parents=True, exist_ok=True)
        out_file.touch()
    if dist is not None and out_file != answers_file:
        _merge_ranks(answers_file, all_questions, dist)
    return answers_file


def _answer(todo, backend, params, model_name, out_file, total, initial, args) -> None:
    """Answer ``todo`` and append the records to ``out_file`` in question order, one flushed line each."""
    from tqdm import tqdm

    buffered: dict[int, tuple[str, dict]] = {}
    next_write = 0
    bar = tqdm(total=total, initial=initial, disable=args.no_progress, unit="q", dynamic_ncols=True)
    with AnswerWriter(out_file) as writer:
        for index, text, meta in answer_all(todo, backend, params):
            buffered[index] = (text, meta)
            bar.update(1)
            while next_write in buffered:
                text, meta = buffered.pop(next_write)
                writer.write(answer_record(todo[next_write], text, model_name, meta))
                next_write += 1
    bar.close()


def answer_record(q: Question, text: str, model_name: str, metadata: dict | None = None) -> dict:
    """An answers-file line in LLaVA's field order (MMBench's extra fields where it puts them)."""
    rec: dict = {"question_id": q.question_id}
    if "round_id" in q.extra:
        rec["round_id"] = q.extra["round_id"]
    rec["prompt"] = q.prompt
    rec["text"] = text
    rec.update({k: v for k, v in q.extra.items() if k != "round_id"})
    rec.update({"answer_id": short_uuid(), "model_id": model_name, "metadata": metadata or {}})
    return rec


def _merge_ranks(answers_file: Path, all_questions: list[Question], dist: tuple[int, int, int]) -> None:
    """torchrun: each rank marks its chunk done; rank 0 waits for every mark, then merges in question order."""
    rank, world, _ = dist
    chunk_file(answers_file, world, rank).with_suffix(".done").touch()
    if rank != 0:
        return
    marks = [chunk_file(answers_file, world, r).with_suffix(".done") for r in range(world)]
    while not all(m.exists() for m in marks):
        time.sleep(1.0)
    files = [chunk_file(answers_file, world, r) for r in range(world)]
    n = merge_files(files, answers_file, order=[q.key for q in all_questions])
    for m in marks:
        m.unlink()
    print(f"merged {n} answers from {world} ranks into {answers_file}")


def main(argv: list[str] | None = None, fmt: str = "jsonl", max_new_tokens: int = 1024) -> int:
    args = build_parser(fmt, max_new_tokens).parse_args(argv)
    if args.num_beams != 1:
        print("error: beam search is not supported; use --num_beams 1 (LLaVA's default)", file=sys.stderr)
        return 2
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
