"""LLaVA's ``eval_textvqa.py``: TextVQA accuracy of one answers file or of every ``.jsonl`` in a folder, with
LLaVA's arguments and printout (through ``eval.vqa_eval``, the one implementation).

    python -m eval.eval_textvqa --annotation-file TextVQA_0.5.1_val.json --result-file answers/llava.jsonl
    python -m eval.eval_textvqa --annotation-file TextVQA_0.5.1_val.json --result-dir answers/
"""

from __future__ import annotations

import argparse
import os

from .vqa_eval import score_textvqa, textvqa_question_from_prompt

prompt_processor = textvqa_question_from_prompt  # LLaVA's name


def eval_single(annotation_file: str, result_file: str) -> dict:
    """Print the experiment name, sample count and accuracy as LLaVA does; return the metrics."""
    print(os.path.splitext(os.path.basename(result_file))[0])
    r = score_textvqa(annotation_file, result_file)
    print("Samples: {}\nAccuracy: {:.2f}%\n".format(r["samples"], r["accuracy"]))
    return r


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--annotation-file", required=True)
    p.add_argument("--result-file", default=None)
    p.add_argument("--result-dir", default=None)
    a = p.parse_args(argv)
    if a.result_file is not None:
        eval_single(a.annotation_file, a.result_file)
    if a.result_dir is not None:
        for name in sorted(os.listdir(a.result_dir)):
            if not name.endswith(".jsonl"):
                print(f"Skipping {name}")
                continue
            eval_single(a.annotation_file, os.path.join(a.result_dir, name))


if __name__ == "__main__":
    main()
