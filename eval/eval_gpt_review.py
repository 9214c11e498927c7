"""LLaVA's ``eval_gpt_review.py`` (text-only QA review) under its name and arguments (``-q -a REF MODEL
-r rule.json -o out.jsonl --max-tokens``), judged by any OpenAI-compatible endpoint (``--base-url``,
``--judge-model``, default gpt-4 as LLaVA's). Run by ``eval.gpt_review`` (the one implementation).

    python -m eval.eval_gpt_review -q question.jsonl -a answers_ref.jsonl answers.jsonl -r rule.json -o review.jsonl

Differences from LLaVA, on purpose: one request at a time instead of ray workers; reviews are appended and a
rerun resumes (LLaVA rewrites the file); a judge that keeps failing stops the run after ``--retries``.
"""

from __future__ import annotations

from .gpt_review import parse_score, review_main

__all__ = ["main", "parse_score"]


def main(argv: list[str] | None = None) -> int:
    return review_main("text", argv, judge_model="gpt-4")


if __name__ == "__main__":
    main()
