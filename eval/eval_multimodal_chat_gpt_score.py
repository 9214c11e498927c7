"""LLaVA-Med's ``eval_multimodal_chat_gpt_score.py``: a judge scores the reference answer (``gpt4_answer`` in the
question file) against the model's, given the figure's caption and in-text mention; any OpenAI-compatible judge.

    python -m eval.eval_multimodal_chat_gpt_score --question-file llava_med_eval_qa50_qa.jsonl \
        --answers-file answers.jsonl --scores-file scores.jsonl [--base-url URL] [--judge-model gpt-4-0314]

The judge's input and the scores file are LLaVA-Med's: each question record (``text`` also copied to
``question``, the reference to ``ans1``, the model's answer to ``ans2``) plus ``gpt_eval``, the judge's reply
(first line: the two scores, read by ``eval.gpt_review.parse_score``). Questions and answers pair up in file order,
as in LLaVA-Med.

Token budgeting: the judge's context (``--max-context-tokens``, gpt-4-0314's 8192 by default) must hold the
prompt and the reply (``--max-tokens``). A prompt estimated past it (4 characters a token, or the judge model's
tokenizer when ``tiktoken`` knows it) has its figure context, then its caption, shortened with " ..." until it
fits; LLaVA-Med sends it whole and the request fails. Replies are appended as they come; a rerun resumes.
"""

from __future__ import annotations

import argparse
import json
from copy import deepcopy
from pathlib import Path

from fastllava.optional import HAS_TIKTOKEN

from .answers import read_jsonl
from .gpt_review import Judge, add_judge_args, judge_from_args, parse_score

ROLE = "Assistant"
# LLaVA-Med's texts, as they are (the system prompt's leading quote included: its published scores used it)
SYSTEM = "'You are a helpful and precise assistant for checking the quality of the answer."
INSTRUCT_PROMPT = (
    "We would like to request your feedback on the performance of two AI assistants in response to the user "
    "question displayed above. The user asks the question on observing an image. For your reference, the visual "
    "content in the image is represented with caption describing the same image.\n  Please rate the helpfulness, "
    "relevance, accuracy, level of details of their responses. Each assistant receives an overall score on a scale "
    "of 1 to 10, where a higher score indicates better overall performance.\n  Please first output a single line "
    "containing only two values indicating the scores for Assistant 1 and 2, respectively. The two scores are "
    "separated by a space. In the subsequent line, please provide a comprehensive explanation of your evaluation, "
    "avoiding any potential bias and ensuring that the order in which the responses were presented does not affect "
    "your judgment."
)


def conv_to_str(fig_label, fig_caption, fig_context, question, ans1, ans2) -> str:
    """The judge's user message, LLaVA-Med's layout."""
    return (
        f"[Context]\nFigure Caption:\n{fig_label}: {fig_caption}\n\nFigure Context:\n\t- {fig_context}\n\n"
        f"[Question]\n{question}\n\n"
        f"[{ROLE} 1]\n{ans1}\n\n[End of {ROLE} 1]\n\n[{ROLE} 2]\n{ans2}\n\n[End of {ROLE} 2]\n\n"
        f"[System]\n{INSTRUCT_PROMPT}\n\n"
    )


def token_counter(model: str):
    """Tokens of a text for ``model``: tiktoken's count when it knows the model, else ~4 characters a token."""
    if HAS_TIKTOKEN:
        import tiktoken

        try:
            enc = tiktoken.encoding_for_model(model)
            return lambda text: len(enc.encode(text))
        except KeyError:
            pass
    return lambda text: (len(text) + 3) // 4


def fit_prompt(sample: dict, budget: int, count) -> str:
    """The judge's message for ``sample``, its figure context then caption shortened until ``count`` fits
    ``budget`` (the answers and the question are never cut)."""
    texts = {"context": sample.get("in_text_mention", ""), "caption": sample.get("fig_caption", "")}

    def render() -> str:
        return conv_to_str(sample.get("fig_label", ""), texts["caption"], texts["context"], sample["question"],
                           sample["ans1"], sample["ans2"])  # fmt: skip

    text = render()
    for field in ("context", "caption"):
        while count(text) + count(SYSTEM) > budget and texts[field]:
            current = texts[field]
            cut = current[: max(0, len(current) - max(16, len(current) // 4))].rstrip()
            texts[field] = cut + " ..." if cut else ""
            text = render()
    return text


def samples_from(question_file: str, answers_file: str) -> list[dict]:
    """LLaVA-Med's pairing: questions and answers in file order."""
    samples = []
    for question, answer in zip(read_jsonl(question_file), read_jsonl(answers_file), strict=False):
        copy = deepcopy(question)
        question["question"] = copy["text"]
        question["ans1"] = copy.pop("gpt4_answer")
        question["ans2"] = answer["text"]
        samples.append(question)
    return samples


def score(samples: list[dict], scores_file: str, judge: Judge, budget: int, count) -> int:
    """Append ``gpt_eval`` rows for the samples not yet in ``scores_file``; returns how many were judged now."""
    out = Path(scores_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = len(read_jsonl(out)) if out.exists() else 0
    with open(out, "a", encoding="utf-8") as f:
        for sample in samples[done:]:
            sample["gpt_eval"] = judge(fit_prompt(sample, budget, count), system=SYSTEM).strip()
            f.write(json.dumps(sample) + "\n")
            f.flush()
    return len(samples) - done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser("GPT-4 Multimodal Chat Scoring")
    p.add_argument("--answers-file", required=True, metavar="FILE", help="path to model answer file")
    p.add_argument("--question-file", default="data/questions/llava_med_eval_qa50_qa.jsonl", metavar="FILE")
    p.add_argument("--scores-file", required=True, metavar="FILE", help="path to save the judge's score file")
    p.add_argument("--max-context-tokens", type=int, default=8192, help="the judge's context (gpt-4-0314: 8192)")
    add_judge_args(p)
    a = p.parse_args(argv)
    samples = samples_from(a.question_file, a.answers_file)
    n = score(
        samples, a.scores_file, judge_from_args(a), a.max_context_tokens - a.max_tokens, token_counter(a.judge_model)
    )
    rows = read_jsonl(a.scores_file)
    pairs = [parse_score(r["gpt_eval"]) for r in rows]
    ref, ours = (sum(x[i] for x in pairs) / len(pairs) for i in (0, 1)) if pairs else (0.0, 0.0)
    print(f"{n} judged now; {len(rows)} in {a.scores_file}; mean scores {ref:.2f} (reference) {ours:.2f} (model)")
    return n


if __name__ == "__main__":
    main()
