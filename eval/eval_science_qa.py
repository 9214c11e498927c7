"""LLaVA's ``eval_science_qa.py`` under its name: the same arguments (``--base-dir --result-file --output-file
--output-result --split``), printout and output files, run by ``eval.science_qa`` (the one implementation).

    python -m eval.eval_science_qa --base-dir ScienceQA/data/scienceqa --result-file answers.jsonl \
        --output-file sqa_output.json --output-result sqa_result.json

Differences from LLaVA, on purpose: the result file also has ``benchmark`` and the image-only counts beside
LLaVA's keys; with no ``--output-file`` / ``--output-result`` nothing is written (LLaVA fails on ``open(None)``).
"""

from __future__ import annotations

from .science_qa import OPTIONS, extract_answer, main, score_science_qa

__all__ = ["OPTIONS", "extract_answer", "get_pred_idx", "main", "score_science_qa"]


def get_pred_idx(prediction: str, choices: list, options=OPTIONS) -> int:
    """LLaVA's: the option's index, or -1 when it is not one of the problem's choices."""
    return list(options).index(prediction) if prediction in list(options)[: len(choices)] else -1


if __name__ == "__main__":
    main()
