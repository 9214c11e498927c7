"""LLaVA's ``model_vqa_science``: same arguments and answers file, answered through the engine (see ``eval.model_vqa``).

python -m eval.model_vqa_science --model-path DIR --question-file ... --answers-file ... --temperature 0
"""

from __future__ import annotations

import sys

from .model_vqa import main as _main


def main(argv: list[str] | None = None) -> int:
    return _main(argv, fmt="science", max_new_tokens=1024)


if __name__ == "__main__":
    sys.exit(main())
