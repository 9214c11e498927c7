"""LLaVA's ``model_qa.py``: text-only questions answered by a model (``--model-name`` is the checkpoint folder),
in LLaVA's answers format, run by ``eval.model_vqa``'s pipeline (the engine, resumable, chunked).

    python -m eval.model_qa --model-name DIR --question-file table/question.jsonl --answers-file answer.jsonl

LLaVA's defaults are kept: its default conversation (Vicuna v1), sampling at temperature 0.7, up to 1024 new
tokens. Differences from LLaVA, on purpose: the prompt ends with the assistant's role header (LLaVA stops after the
user's turn and cuts the model's own "ASSISTANT:" off the answer by length); answer lines also carry the
``prompt``; every ``eval.model_vqa`` option works (``--temperature``, ``--seed``, ``--server-url`` ...).
"""

from __future__ import annotations

import sys

from .model_vqa import build_parser, run

DEFAULT_CONV_MODE = "vicuna_v1"  # llava.conversation.default_conversation


def main(argv: list[str] | None = None) -> int:
    p = build_parser("jsonl", max_new_tokens=1024)
    p.add_argument("--model-name", dest="model_path", help="the checkpoint folder (LLaVA's name for --model-path)")
    p.set_defaults(conv_mode=DEFAULT_CONV_MODE, temperature=0.7)
    args = p.parse_args(argv)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
