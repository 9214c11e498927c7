"""Benchmark questions in LLaVA's three input formats, as ``Question`` records the runner can answer.

- question jsonl (``model_vqa``, ``model_vqa_loader``): ``{"question_id", "image", "text", ...}`` per line;
- ScienceQA json (``model_vqa_science``): LLaVA-format records ``{"id", "image"?, "conversations": [...]}``;
- MMBench tsv (``model_vqa_mmbench``): ``index, question, hint, A..D, image`` (base64), optionally every circular
  rotation of the options (``--all-rounds``).

``Question.text`` is the user turn *without* the image token; ``Question.prompt`` is what LLaVA writes in the
answers file's ``prompt`` field; ``Question.extra`` holds the extra answer fields (MMBench's ``round_id``,
``options``, ``option_char``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from .answers import answer_key
from .submission import read_tsv

SINGLE_PRED_PROMPT = "Answer with the option's letter from the given choices directly."
SINGLE_PRED_PROMPT_CN = "请直接回答选项字母。"
MMBENCH_OPTIONS = ("A", "B", "C", "D")


@dataclass
class Question:
    question_id: Any
    text: str  # the user turn, no image token
    prompt: str  # the answers file's "prompt"
    image: str | None = None  # a local path, or base64 image data (MMBench)
    extra: dict = field(default_factory=dict)

    @property
    def key(self) -> tuple:
        return answer_key({"question_id": self.question_id, **self.extra})


def load_vqa_jsonl(question_file: str, image_folder: str = "") -> list[Question]:
    """LLaVA's question jsonl; every question has an image (``model_vqa.py``)."""
    out = []
    with open(os.path.expanduser(question_file), encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            q = json.loads(line)
            image = os.path.join(image_folder, q["image"]) if q.get("image") else None
            out.append(Question(q["question_id"], q["text"], q["text"], image))
    return out


def load_science_qa(question_file: str, image_folder: str = "", single_pred_prompt: bool = False) -> list[Question]:
    """ScienceQA in LLaVA's conversation json (``model_vqa_science.py``): the first human turn, ``<image>``
    removed; image questions get ``<image>\\n`` in their recorded prompt (the scorer's image-only split)."""
    with open(os.path.expanduser(question_file), encoding="utf-8") as f:
        records = json.load(f)
    out = []
    for line in records:
        qs = line["conversations"][0]["value"].replace("<image>", "").strip()
        prompt = qs
        image = None
        if "image" in line:
            image = os.path.join(image_folder, line["image"])
            prompt = "<image>\n" + prompt
        if single_pred_prompt:
            qs = qs + "\n" + SINGLE_PRED_PROMPT
            prompt = prompt + "\n" + SINGLE_PRED_PROMPT
        out.append(Question(line["id"], qs, prompt, image))
    return out


def _is_none(value) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.lower() in ("nan", "none", "")


def load_mmbench(
    question_file: str, all_rounds: bool = False, single_pred_prompt: bool = False, lang: str = "en"
) -> list[Question]:
    """MMBench tsv: hint + question + lettered options; with ``all_rounds`` one question per rotation."""
    out = []
    for row in read_tsv(os.path.expanduser(question_file)):
        options = []
        for letter in MMBENCH_OPTIONS:
            if letter not in row or _is_none(row[letter]):
                break
            options.append(row[letter])
        chars = list(MMBENCH_OPTIONS[: len(options)])
        index = int(row["index"]) if str(row["index"]).lstrip("-").isdigit() else row["index"]
        for round_idx in range(len(options) if all_rounds else 1):
            question = row["question"]
            if not _is_none(row.get("hint")):
                question = row["hint"] + "\n" + question
            for letter, option in zip(MMBENCH_OPTIONS, options, strict=False):
                question = question + "\n" + letter + ". " + option
            text = question
            if single_pred_prompt:
                text = text + "\n" + (SINGLE_PRED_PROMPT_CN if lang == "cn" else SINGLE_PRED_PROMPT)
            extra = {"round_id": round_idx, "options": list(options), "option_char": list(chars)}
            out.append(Question(index, text, question, row["image"], extra))
            options = options[1:] + options[:1]
            chars = chars[1:] + chars[:1]
    return out
