"""LLaVA's ``summarize_gpt_review.py`` under its name and arguments: per review file and category, the model's
score relative to the reference (%), and both mean scores (x10), printed as LLaVA prints them. The numbers come
from ``eval.gpt_review.summarize_reviews`` (the one implementation).

    python -m eval.summarize_gpt_review -f reviews/llava-bench/llava.jsonl
    python -m eval.summarize_gpt_review -d reviews/ [-s llava] [-v 0314] [-i 3 7]
"""

from __future__ import annotations

import argparse
import os

from .gpt_review import summarize_reviews


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="ChatGPT-based QA evaluation.")
    p.add_argument("-d", "--dir", default=None)
    p.add_argument("-v", "--version", default=None)
    p.add_argument("-s", "--select", nargs="*", default=None)
    p.add_argument("-f", "--files", nargs="*", default=[])
    p.add_argument("-i", "--ignore", nargs="*", type=int, default=[])
    return p.parse_args(argv)


def review_files(args: argparse.Namespace) -> list[str]:
    """LLaVA's selection: ``--files``, else the ``.jsonl`` review files of ``--dir``."""
    if args.files:
        return list(args.files)
    return [
        x
        for x in os.listdir(args.dir)
        if x.endswith(".jsonl") and (x.startswith(("gpt4_text", "reviews_", "review_")) or "review" in args.dir)
    ]


def main(argv: list[str] | None = None) -> dict[str, dict]:
    args = parse_args(argv)
    out = {}
    for review_file in sorted(review_files(args)):
        config = os.path.basename(review_file).replace("gpt4_text_", "").replace(".jsonl", "")
        if args.select is not None and any(x not in config for x in args.select):
            continue
        version = "0613" if "0613" in config else "0314"
        if args.version is not None and args.version != version:
            continue
        print(config)
        path = os.path.join(args.dir, review_file) if args.dir is not None else review_file
        out[config] = summary = summarize_reviews(path, set(args.ignore))
        for k, v in summary.items():
            print(k, v["relative"], round(v["reference"], 1), round(v["model"], 1))
        print("=================================")
    return out


if __name__ == "__main__":
    main()
