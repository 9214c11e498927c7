"""GPT review: LLaVA-Bench (``eval_gpt_review_bench.py`` + ``summarize_gpt_review.py``) and MM-Vet grading,
through the ``openai`` client against any OpenAI-compatible judge (``--base-url``, ``--judge-model``).

    python -m eval.gpt_review llava-bench --question questions.jsonl --context context.jsonl \
        --answer-list answers_gpt4.jsonl answers/llava.jsonl --output reviews/llava.jsonl \
        --base-url http://localhost:8000/v1 --judge-model gpt-4-0314
    python -m eval.gpt_review summarize reviews/llava.jsonl
    python -m eval.gpt_review mmvet-convert --src answers/llava.jsonl --dst results/llava.json
    python -m eval.gpt_review mmvet --mmvet-json mm-vet.json --results results/llava.json --output grades.jsonl

LLaVA-Bench: for each question the judge sees the image's context captions, the question, the reference answer
(Assistant 1) and the model's (Assistant 2) and the category's rule prompt; the first line of its reply holds the
two scores. Reviews are appended as they come (a rerun resumes). The summary is LLaVA's: per category, the mean
model score over the mean reference score, in % (failed parses count as ``[-1, -1]``, as in LLaVA).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from fastllava import envs
from fastllava.optional import HAS_OPENAI

from .answers import read_jsonl

log = logging.getLogger(__name__)

SYSTEM_PROMPT = "You are a helpful and precise assistant for checking the quality of the answer."
_LLAVA_BENCH_RULE = (
    "We would like to request your feedback on the performance of two AI assistants in response to the user "
    "question displayed above. The user asks the question on observing an image. For your reference, the visual "
    "content in the image is represented with a few sentences describing the image. \nPlease rate the helpfulness, "
    "relevance, accuracy, level of details of their responses. Each assistant receives an overall score on a scale "
    "of 1 to 10, where a higher score indicates better overall performance.\nPlease first output a single line "
    "containing only two values indicating the scores for Assistant 1 and 2, respectively. The two scores are "
    "separated by a space.\nIn the subsequent line, please provide a comprehensive explanation of your evaluation, "
    "avoiding any potential bias and ensuring that the order in which the responses were presented does not affect "
    "your judgment."
)
# LLaVA's llava/eval/table/rule.json entries for LLaVA-Bench (the three categories share one prompt)
DEFAULT_RULES = {
    f"llava_bench_{c}": {"role": "Assistant", "prompt": _LLAVA_BENCH_RULE} for c in ("conv", "detail", "complex")
}


def openai_client(base_url: str | None, api_key: str | None = None, timeout: float = 300.0, max_retries: int = 2):
    """An ``openai.OpenAI`` client for ``base_url`` (None: the OpenAI API, key from ``OPENAI_API_KEY``)."""
    if not HAS_OPENAI:
        raise ImportError("GPT review needs the openai client: pip install openai (or pip install 'fastllava[eval]')")
    import openai

    key = api_key or envs.OPENAI_API_KEY or "EMPTY"  # local servers accept any key
    return openai.OpenAI(base_url=base_url, api_key=key, timeout=timeout, max_retries=max_retries)


class Judge:
    """One chat call per review, retried ``retries`` times (``sleep`` seconds apart) on any API error."""

    def __init__(self, client, model: str, temperature: float = 0.2, max_tokens: int = 1024, retries: int = 5,
                 sleep: float = 0.5) -> None:  # fmt: skip
        self.client, self.model = client, model
        self.temperature, self.max_tokens, self.retries, self.sleep = temperature, max_tokens, retries, sleep

    def __call__(self, content: str, system: str | None = SYSTEM_PROMPT, temperature: float | None = None) -> str:
        import openai

        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                resp = self.client.chat.completions.create(
                    model=self.model,
                    messages=messages,
                    temperature=self.temperature if temperature is None else temperature,
                    max_tokens=self.max_tokens,
                )
                return resp.choices[0].message.content or ""
            except openai.OpenAIError as e:
                last = e
                log.warning("judge call failed (attempt %d/%d): %s", attempt + 1, self.retries + 1, e)
                time.sleep(self.sleep)
        raise RuntimeError(f"the judge failed {self.retries + 1} times") from last


def parse_score(review: str) -> list[float]:
    """LLaVA's parser: the first line, commas as spaces, exactly two space-separated numbers; else [-1, -1]."""
    try:
        parts = review.split("\n")[0].replace(",", " ").split(" ")
        if len(parts) == 2:
            return [float(parts[0]), float(parts[1])]
    except ValueError:
        pass
    log.warning("cannot parse scores from review %r", review[:200])
    return [-1.0, -1.0]


def _answers(role: str, ans1: dict, ans2: dict) -> str:
    return f"[{role} 1]\n{ans1['text']}\n\n[End of {role} 1]\n\n[{role} 2]\n{ans2['text']}\n\n[End of {role} 2]\n\n"


def llava_bench_content(question: dict, context: dict | None, ans1: dict, ans2: dict, rule: dict) -> str:
    """LLaVA-Bench (``eval_gpt_review_bench.py``): the image's caption(s) as context."""
    caption = context["caption"]
    captions = "\n".join(caption) if isinstance(caption, list) else caption
    return (
        f"[Context]\n{captions}\n\n[Question]\n{question['text']}\n\n"
        + _answers(rule["role"], ans1, ans2)
        + f"[System]\n{rule['prompt']}\n\n"
    )


def visual_content(question: dict, context: dict | None, ans1: dict, ans2: dict, rule: dict) -> str:
    """``eval_gpt_review_visual.py`` (COCO-based LLaVA-Bench): captions, then ``category: bbox`` per object."""
    captions = "\n".join(context["captions"])
    boxes = "\n".join(f"{inst['category']}: {inst['bbox']}" for inst in context["instances"])
    return (
        f"[Context]\n{captions}\n\n{boxes}\n\n[Question]\n{question['text']}\n\n"
        + _answers(rule["role"], ans1, ans2)
        + f"[System]\n{rule['prompt']}\n\n"
    )


def text_content(question: dict, context: dict | None, ans1: dict, ans2: dict, rule: dict) -> str:
    """``eval_gpt_review.py`` (text-only QA): no context."""
    system = f"[System]\n{rule['prompt']}\n\n"
    return f"[Question]\n{question['text']}\n\n" + _answers(rule["role"], ans1, ans2) + system


# how each of LLaVA's review scripts builds the judge's input and names the category
REVIEW_KINDS = {
    "bench": (llava_bench_content, "llava_bench_"),
    "visual": (visual_content, ""),
    "text": (text_content, ""),
}


def review_llava_bench(
    question_file, context_file, answer_files, output, judge: Judge, rules: dict | None = None, kind: str = "bench"
) -> int:
    """Review every question not yet in ``output``; returns how many reviews were made now.

    ``kind``: ``bench`` (LLaVA-Bench, ``eval_gpt_review_bench.py``), ``visual`` (``eval_gpt_review_visual.py``)
    or ``text`` (``eval_gpt_review.py``: no context file, a category missing from the rules uses ``default``).
    """
    content_fn, prefix = REVIEW_KINDS[kind]
    rules = rules or DEFAULT_RULES
    questions = read_jsonl(question_file)
    ans1, ans2 = read_jsonl(answer_files[0]), read_jsonl(answer_files[1])
    contexts = {c["image"]: c for c in read_jsonl(context_file)} if context_file else {}
    out = Path(output)
    done = len(read_jsonl(out)) if out.exists() else 0
    out.parent.mkdir(parents=True, exist_ok=True)
    made = 0
    with open(out, "a", encoding="utf-8") as f:
        for idx, (q, a1, a2) in enumerate(zip(questions, ans1, ans2, strict=False)):
            if idx < done:
                continue
            category = prefix + q["category"]
            rule = rules.get(category, rules.get("default") if kind == "text" else None)
            if rule is None:
                raise KeyError(f"Visual QA category not found in rule file: {category}")
            review = judge(content_fn(q, contexts.get(q.get("image")), a1, a2, rule))
            rec = {
                "id": idx + 1,
                "question_id": q["question_id"],
                "answer1_id": a1.get("answer_id", a1["question_id"]),
                "answer2_id": a2.get("answer_id", a2["question_id"]),
                "category": category,
                "content": review,
                "tuple": parse_score(review),
            }
            f.write(json.dumps(rec) + "\n")
            f.flush()
            made += 1
    return made


def summarize_reviews(review_file, ignore: set | None = None) -> dict[str, dict]:
    """Per category (and ``all``): relative score (model / reference, %), and both mean scores on a 0-100 scale."""
    scores: dict[str, list[list[float]]] = defaultdict(list)
    for r in read_jsonl(review_file):
        if ignore and r["question_id"] in ignore:
            continue
        pair = r.get("tuple", r.get("score"))
        if "category" in r:
            scores[r["category"]].append(pair)
        scores["all"].append(pair)
    out = {}
    for k, v in sorted(scores.items()):
        # LLaVA's arithmetic: numpy means rounded to 3 digits, then the ratio (printed numbers depend on it)
        m1, m2 = (round(x, 3) for x in np.asarray(v, dtype=np.float64).mean(0).tolist())
        out[k] = {"relative": round(m2 / m1 * 100, 1) if m1 else 0.0, "reference": m1 * 10, "model": m2 * 10}
    return out


# ------------------------------------------------------------------------------------------------- MM-Vet
MMVET_PROMPT = (
    "Compare the ground truth and prediction from AI models, to give a correctness score for the prediction. "
    "<AND> in the ground truth means it is totally right only when all elements in the ground truth are present in "
    "the prediction, and <OR> means it is totally right when any one element in the ground truth is present in the "
    "prediction. The correctness score is 0.0 (totally wrong), 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, or 1.0 "
    "(totally right). Just complete the last space of the correctness score.\n\n"
    "Question | Ground truth | Prediction | Correctness\n--- | --- | --- | ---\n"
    "What is x in the equation? | -1 <AND> -5 | x = 3 | 0.0\n"
    "What is x in the equation? | -1 <AND> -5 | x = -1 | 0.5\n"
    "What is x in the equation? | -1 <AND> -5 | x = -5 or 5 | 0.5\n"
    "What is x in the equation? | -1 <AND> -5 | x = -5 or -1 | 1.0\n"
    "Can you explain this meme? | This meme is poking fun at the fact that the names of the countries Iceland and "
    "Greenland are misleading. | The meme talks about Iceland and Greenland. | 0.4\n"
)


def convert_mmvet(src, dst) -> dict:
    """LLaVA's ``convert_mmvet_for_eval.py``: ``{"v1_<question_id>": answer}`` for MM-Vet's grader."""
    results = {f"v1_{r['question_id']}": r["text"] for r in read_jsonl(src)}
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    Path(dst).write_text(json.dumps(results, indent=2))
    return results


def _mmvet_score(reply: str) -> float | None:
    m = re.search(r"\d+(\.\d+)?", reply.strip())
    if m is None:
        return None
    v = float(m.group(0))
    return v if 0.0 <= v <= 1.0 else None


def grade_mmvet(mmvet_json, results_json, output, judge: Judge, tries: int = 5) -> dict:
    """MM-Vet's GPT grader: a 0-1 correctness per question (retried at rising temperature until it parses),
    then the mean per capability and in total, in %. Grades already in ``output`` are reused."""
    data = json.loads(Path(mmvet_json).read_text())
    results = json.loads(Path(results_json).read_text())
    out = Path(output)
    graded = {r["id"]: r for r in read_jsonl(out)} if out.exists() else {}
    with open(out, "a", encoding="utf-8") as f:
        for qid, item in data.items():
            if qid in graded or qid not in results:
                continue
            gt = item["answer"].replace("<AND>", " <AND> ").replace("<OR>", " <OR> ")
            content = MMVET_PROMPT + f"{item['question']} | {gt} | {results[qid]} | "
            score = None
            for t in range(tries):
                score = _mmvet_score(judge(content, system=None, temperature=0.0 if t == 0 else 0.2 * t))
                if score is not None:
                    break
            rec = {"id": qid, "score": 0.0 if score is None else score, "capability": item.get("capability", [])}
            f.write(json.dumps(rec) + "\n")
            f.flush()
            graded[qid] = rec
    per_cap: dict[str, list[float]] = defaultdict(list)
    for qid in data:
        s = graded[qid]["score"] if qid in graded else 0.0
        caps = data[qid].get("capability", [])
        for c in caps if isinstance(caps, list) else [caps]:
            per_cap[c].append(s)
    total = [graded[q]["score"] if q in graded else 0.0 for q in data]
    return {
        "benchmark": "mmvet",
        "total": 100.0 * sum(total) / len(total) if total else 0.0,
        "per_capability": {k: 100.0 * sum(v) / len(v) for k, v in sorted(per_cap.items())},
    }


def add_judge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default=None, help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1")
    p.add_argument("--api-key", default=None, help="default: $OPENAI_API_KEY")
    p.add_argument("--judge-model", default="gpt-4-0314")
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--retries", type=int, default=5)
    p.add_argument("--timeout", type=float, default=300.0)


def judge_from_args(a) -> Judge:
    client = openai_client(a.base_url, a.api_key, a.timeout, max_retries=0)
    return Judge(client, a.judge_model, a.temperature, a.max_tokens, a.retries)


def review_main(kind: str, argv: list[str] | None = None, judge_model: str = "gpt-4-0314") -> int:
    """The command line of LLaVA's ``eval_gpt_review{,_bench,_visual}.py`` (``kind``: text, bench, visual), plus
    the judge's endpoint options (``--base-url``, ``--judge-model`` ...)."""
    p = argparse.ArgumentParser(description="GPT-based QA review (any OpenAI-compatible judge)")
    p.add_argument("-q", "--question", required=True)
    if kind != "text":
        p.add_argument("-c", "--context", required=True)
    p.add_argument("-a", "--answer-list", nargs="+", required=True, help="reference answers, then the model's")
    p.add_argument("-r", "--rule", required=True, help="LLaVA's rule.json")
    p.add_argument("-o", "--output", required=True)
    add_judge_args(p)
    p.set_defaults(judge_model=judge_model)
    a = p.parse_args(argv)
    if len(a.answer_list) < 2:
        p.error("--answer-list needs two files: the reference answers and the model's")
    rules = json.loads(Path(a.rule).expanduser().read_text())
    context = getattr(a, "context", None)
    n = review_llava_bench(a.question, context, a.answer_list[:2], a.output, judge_from_args(a), rules, kind=kind)
    print(f"{n} new reviews in {a.output}")
    return n


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    lb = sub.add_parser("llava-bench")
    lb.add_argument("-q", "--question", required=True)
    lb.add_argument("-c", "--context", required=True)
    lb.add_argument("-a", "--answer-list", nargs=2, required=True)
    lb.add_argument("-r", "--rule", default=None, help="LLaVA's rule.json (default: the LLaVA-Bench rules)")
    lb.add_argument("-o", "--output", required=True)
    add_judge_args(lb)
    sm = sub.add_parser("summarize")
    sm.add_argument("files", nargs="+")
    sm.add_argument("-i", "--ignore", nargs="*", type=int, default=None)
    sm.add_argument("--metrics", default=None, help="write the (last file's) summary as JSON here")
    cv = sub.add_parser("mmvet-convert")
    cv.add_argument("--src", required=True)
    cv.add_argument("--dst", required=True)
    mv = sub.add_parser("mmvet")
    mv.add_argument("--mmvet-json", required=True)
    mv.add_argument("--results", required=True)
    mv.add_argument("--output", required=True)
    mv.add_argument("--metrics", default=None, help="also write the scores as JSON here")
    add_judge_args(mv)
    a = p.parse_args(argv)
    if a.cmd == "llava-bench":
        rules = json.loads(Path(a.rule).read_text()) if a.rule else None
        n = review_llava_bench(a.question, a.context, a.answer_list, a.output, judge_from_args(a), rules)
        print(f"{n} new reviews in {a.output}")
    elif a.cmd == "summarize":
        for f in a.files:
            print(Path(f).name)
            summary = summarize_reviews(f, set(a.ignore or []))
            for k, v in summary.items():
                print(k, v["relative"], round(v["reference"], 1), round(v["model"], 1))
            print("=================================")
            if a.metrics:
                Path(a.metrics).write_text(json.dumps({"benchmark": "llava_bench", **summary}, indent=1))
    elif a.cmd == "mmvet-convert":
        print(f"{len(convert_mmvet(a.src, a.dst))} answers written to {a.dst}")
    else:
        r = grade_mmvet(a.mmvet_json, a.results, a.output, judge_from_args(a))
        print(json.dumps(r, indent=1))
        if a.metrics:
            Path(a.metrics).write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
