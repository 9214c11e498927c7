"""Exact-match accuracy of a checkpoint on held-out single-question samples (the synthetic set's ``eval.json``).

    python -m train.evaluate --model /tmp/run --data /tmp/shapes/eval.json --image_folder /tmp/shapes/images

Prompts are rendered with the conversation template exactly as at evaluation time (``fastllava.prompting``: LLaVA's
``conv.get_prompt()`` with the assistant turn left open) and answered greedily by the engine; the first word of the
answer is compared with the record's ``answer`` (or its last ``gpt`` turn).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch

from fastllava.data.synthetic import normalize_answer
from fastllava.engine import SamplingParams
from fastllava.generation import engine_for
from fastllava.image_io import load_image
from fastllava.mm_utils import process_images, tokenizer_image_token
from fastllava.packing import ImageInput
from fastllava.prompting import question_prompt


@torch.no_grad()
def greedy_answers(model, tokenizer, processor, prompts: list[str], images: list, max_new_tokens: int = 4) -> list[str]:
    """Greedy continuation of each prompt (one image each, or None), all prompts at once through the engine
    (``fastllava.generation.engine_for``: sized for the batch), stopping at the tokenizer's EOS (not in the text)."""
    seqs = [tokenizer_image_token(p, tokenizer) for p in prompts]
    pixels = process_images([im for im in images if im is not None], processor, model.config) if any(images) else []
    inputs, k = [], 0
    for im in images:
        if im is None:
            inputs.append([])
        else:
            inputs.append([ImageInput(pixels[k], (im.height, im.width))])
            k += 1
    eos = tokenizer.eos_token_id
    params = SamplingParams(max_tokens=max_new_tokens, temperature=0, stop_token_ids=[eos] if eos is not None else [])
    was_training = model.training
    try:
        outs = engine_for(model, seqs, inputs, max_new_tokens).generate(seqs, inputs, params)
    finally:
        model.train(was_training)  # the engine puts the model in eval mode
    ids = [o.token_ids[:-1] if o.token_ids and o.token_ids[-1] == eos else o.token_ids for o in outs]
    return [tokenizer.decode(t, skip_special_tokens=True) for t in ids]


def predict(model, tokenizer, processor, records: list[dict], image_folder, template: str = "llava_v1",
            batch_size: int = 64, max_new_tokens: int = 4) -> list[str]:  # fmt: skip
    """Greedy answers to each record's first human turn (rendered by ``template`` as at serving time)."""
    model.eval()
    preds = []
    for s in range(0, len(records), batch_size):
        chunk = records[s : s + batch_size]
        prompts, images = [], []
        for r in chunk:
            prompts.append(question_prompt(template, r["conversations"][0]["value"]))  # its <image> is in the text
            images.append(load_image(str(Path(image_folder) / r["image"])) if r.get("image") else None)
        preds += greedy_answers(model, tokenizer, processor, prompts, images, max_new_tokens)
    return preds


def evaluate(model, tokenizer, processor, data_path, image_folder, template: str = "llava_v1", batch_size: int = 64):
    """Returns (accuracy, per-kind accuracy, n)."""
    records = json.loads(Path(data_path).read_text())
    preds = predict(model, tokenizer, processor, records, image_folder, template, batch_size)
    correct, per_kind, total_kind = 0, Counter(), Counter()
    for r, pred in zip(records, preds, strict=True):
        ok = normalize_answer(pred) == normalize_answer(r.get("answer") or r["conversations"][-1]["value"])
        correct += ok
        kind = r.get("kind", "all")
        per_kind[kind] += ok
        total_kind[kind] += 1
    n = len(records)
    return correct / max(n, 1), {k: per_kind[k] / total_kind[k] for k in total_kind}, n


def main(argv: list[str] | None = None) -> None:
    from fastllava.model.builder import load_pretrained_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--image_folder", required=True)
    p.add_argument("--template", default="llava_v1")
    a = p.parse_args(argv)
    tok, model, proc, _ = load_pretrained_model(a.model, device="cpu", dtype=torch.float32)
    acc, kinds, n = evaluate(model, tok, proc, a.data, a.image_folder, a.template)
    print(json.dumps({"accuracy": round(acc, 4), "n": n, "per_kind": {k: round(v, 4) for k, v in kinds.items()}}))


if __name__ == "__main__":
    main()
