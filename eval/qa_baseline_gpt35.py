"""LLaVA's ``qa_baseline_gpt35.py``: answers from a chat model (GPT-3.5 in LLaVA; here any OpenAI-compatible
endpoint, ``--base-url``), in LLaVA's answers format, sorted by question id.

    python -m eval.qa_baseline_gpt35 -q table/question.jsonl -o table/answer/answer_gpt35.jsonl \
        [--base-url http://localhost:8000/v1] [--model gpt-3.5-turbo] [--model-id gpt-3.5-turbo:20230327]

Each question is asked with LLaVA's system prompt ("You are a helpful assistant."), three tries, ``#ERROR#`` as
the answer when all fail (as LLaVA); 32 requests in flight. The call goes through ``eval.gpt_review``'s client.
"""

from __future__ import annotations

import argparse
import json
import os
from concurrent.futures import ThreadPoolExecutor

from .answers import short_uuid
from .gpt_review import Judge, openai_client

MODEL = "gpt-3.5-turbo"
MODEL_ID = "gpt-3.5-turbo:20230327"
SYSTEM = "You are a helpful assistant."


def get_answer(judge: Judge, question_id, question: str, model_id: str = MODEL_ID) -> dict:
    """One answer record; ``#ERROR#`` when the endpoint failed every try."""
    ans = {"answer_id": short_uuid(), "question_id": question_id, "model_id": model_id}
    try:
        ans["text"] = judge(question, system=SYSTEM)
    except RuntimeError as e:
        print("[ERROR]", e.__cause__ or e)
        ans["text"] = "#ERROR#"
    return ans


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description="ChatGPT answer generation.")
    p.add_argument("-q", "--question", required=True)
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--max-tokens", type=int, default=1024, help="maximum number of tokens produced in the output")
    p.add_argument("--base-url", default=None, help="OpenAI-compatible endpoint (default: OpenAI's)")
    p.add_argument("--api-key", default=None, help="default: $OPENAI_API_KEY")
    p.add_argument("--model", default=MODEL)
    p.add_argument("--model-id", default=MODEL_ID, help="what the answers' model_id says")
    p.add_argument("--temperature", type=float, default=1.0, help="LLaVA sends none: the API's default, 1")
    p.add_argument("--concurrency", type=int, default=32)
    a = p.parse_args(argv)
    questions = {}
    with open(os.path.expanduser(a.question)) as f:
        for line in f:
            if line.strip():
                q = json.loads(line)
                questions[q["question_id"]] = q["text"]
    judge = Judge(
        openai_client(a.base_url, a.api_key, max_retries=0), a.model, a.temperature, a.max_tokens, retries=2, sleep=1.0
    )  # fmt: skip  (three tries, a second apart, as LLaVA)
    with ThreadPoolExecutor(max_workers=a.concurrency) as pool:
        answers = list(pool.map(lambda item: get_answer(judge, item[0], item[1], a.model_id), questions.items()))
    answers.sort(key=lambda x: x["question_id"])
    with open(os.path.expanduser(a.output), "w") as f:
        f.write("\n".join(json.dumps(ans) for ans in answers))
    return answers


if __name__ == "__main__":
    main()
