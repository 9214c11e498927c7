"""LLaVA's answers files: jsonl I/O, question chunks, resuming a partial file, merging chunk files.

An answer line is ``{"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}`` (MMBench adds
``round_id``, ``options``, ``option_char``). ``answer_id`` is a 22-character base57 id, the format of the
``shortuuid`` package LLaVA uses.

    python -m eval.answers merge --output merge.jsonl answers/8_0.jsonl answers/8_1.jsonl ...
"""

from __future__ import annotations

import argparse
import json
import math
import os
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

_B57 = "23456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"  # shortuuid's alphabet


def short_uuid() -> str:
    """A random 22-character base57 id (what ``shortuuid.uuid()`` returns)."""
    n, out = uuid.uuid4().int, []
    for _ in range(22):
        n, r = divmod(n, 57)
        out.append(_B57[r])
    return "".join(reversed(out))


def read_jsonl(path: str | Path) -> list[dict]:
    """Every non-empty line of a jsonl file, parsed."""
    with open(os.path.expanduser(str(path)), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def split_list(items: Sequence, n: int) -> list[Sequence]:
    """LLaVA's ``split_list``: ``ceil(len / n)`` items per chunk (so there may be fewer than n chunks)."""
    size = max(1, math.ceil(len(items) / n))
    return [items[i : i + size] for i in range(0, len(items), size)]


def get_chunk(items: Sequence, num_chunks: int, chunk_idx: int) -> Sequence:
    """Chunk ``chunk_idx`` of ``num_chunks`` (empty when the list is too short to have it)."""
    if not 0 <= chunk_idx < num_chunks:
        raise ValueError(f"--chunk-idx {chunk_idx} is outside [0, --num-chunks {num_chunks})")
    chunks = split_list(items, num_chunks)
    return chunks[chunk_idx] if chunk_idx < len(chunks) else items[:0]


def answer_key(record: dict) -> tuple:
    """What identifies an answer: the question id, and the round for MMBench's circular rounds."""
    return (json.dumps(record["question_id"]), record.get("round_id", 0))


def load_done(path: str | Path) -> Counter:
    """How many answers a (possibly partial) answers file already holds for each ``answer_key``.

    A run killed mid-write can leave a last line without its newline or cut in half: the file is truncated
    back to its last complete, parseable line, so appending resumes cleanly.
    """
    path = Path(os.path.expanduser(str(path)))
    if not path.exists():
        return {}
    raw = path.read_bytes()
    done: Counter = Counter()
    good_end = 0
    pos = 0
    for line in raw.splitlines(keepends=True):
        end = pos + len(line)
        pos = end
        if not line.endswith(b"\n"):
            break  # an unterminated last line was being written when the run died
        if not line.strip():
            good_end = end
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            break
        done[answer_key(rec)] += 1
        good_end = end
    if good_end != len(raw):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return done


class AnswerWriter:
    """Appends answer records to a jsonl file, flushing each line (so a killed run loses at most one)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(os.path.expanduser(str(path)))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> AnswerWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def remaining(questions: Sequence, done: Counter) -> list:
    """The questions still to answer: for each key, the first ``done[key]`` occurrences are answered already
    (question files may repeat an id; each occurrence is its own question)."""
    left = Counter(done)
    todo = []
    for q in questions:
        if left[q.key] > 0:
            left[q.key] -= 1
        else:
            todo.append(q)
    return todo


def chunk_file(answers_file: str | Path, num_chunks: int, chunk_idx: int) -> Path:
    """Where chunk ``chunk_idx`` writes when one command runs every chunk: ``<stem>.chunks/<n>_<i>.jsonl``
    (LLaVA's scripts name chunk files ``$CHUNKS_$IDX.jsonl``)."""
    p = Path(os.path.expanduser(str(answers_file)))
    return p.with_name(p.stem + ".chunks") / f"{num_chunks}_{chunk_idx}.jsonl"


def merge_files(inputs: Iterable[str | Path], output: str | Path, order: Sequence[tuple] | None = None) -> int:
    """Concatenate chunk answer files into ``output``, dropping repeated lines (the same ``answer_id``).

    With ``order`` (answer keys in question order), the merged file follows it (stable for repeated question
    ids). Returns the number of answers.
    """
    records: list[dict] = []
    ids: set[str] = set()
    for path in inputs:
        for rec in read_jsonl(path):
            aid = rec.get("answer_id")
            if aid is not None and aid in ids:
                continue
            ids.add(aid)
            records.append(rec)
    if order is not None:
        positions: dict[tuple, list[int]] = {}
        for i, k in enumerate(order):
            positions.setdefault(k, []).append(i)
        taken: Counter = Counter()
        ranks = []
        for r in records:  # the n-th answer of a key takes the n-th position of that key
            k = answer_key(r)
            slots = positions.get(k, [])
            ranks.append(slots[taken[k]] if taken[k] < len(slots) else len(order))
            taken[k] += 1
        records = [r for _, r in sorted(zip(ranks, records, strict=True), key=lambda x: x[0])]
    out = Path(os.path.expanduser(str(output)))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    tmp.replace(out)
    return len(records)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Merge chunked answers files (LLaVA's `cat $CHUNKS_*.jsonl`).")
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("merge")
    m.add_argument("--output", required=True)
    m.add_argument("inputs", nargs="+")
    a = p.parse_args(argv)
    n = merge_files(a.inputs, a.output)
    print(f"merged {n} answers into {a.output}")


if __name__ == "__main__":
    main()
