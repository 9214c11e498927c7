"""LLaVA's ``eval_gpt_review_visual.py`` under its name and arguments (``-q -c -a REF MODEL -r rule.json -o out.jsonl
--max-tokens``), judged by any OpenAI-compatible endpoint (``--base-url``, ``--judge-model``, default
gpt-4-0314 as LLaVA's); the reviews are LLaVA's lines. Run by ``eval.gpt_review`` (the one implementation).

    python -m eval.eval_gpt_review_visual -q questions.jsonl -c context.jsonl -a answers_gpt4.jsonl answers.jsonl \
        -r rule.json -o reviews.jsonl --base-url http://localhost:8000/v1

Difference from LLaVA: a judge that keeps failing stops the run after ``--retries`` (LLaVA retries forever);
a rerun resumes where the output file ends.
"""

from __future__ import annotations

from .gpt_review import parse_score, review_main

__all__ = ["main", "parse_score"]


def main(argv: list[str] | None = None) -> int:
    return review_main("visual", argv)


if __name__ == "__main__":
    main()
