"""The shipped default model as people meet it: through the engine and through the OpenAI API.

* questions it cannot answer -- no image at all, or an image but not about its shapes -- get exactly
  ``OUT_OF_DOMAIN_REPLY`` (prompts written here, none of them a training sentence verbatim unless marked);
* in-domain answers are one word with no whitespace around it (the API) or after it (the engine's text);
* the web UI's examples (``serve/examples/``) are answered as ``examples.json`` says;
* the OpenAI API answers the robustness split as the engine does, text part before or after the image.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image

from fastllava.data import asking
from fastllava.data import synthetic as S
from fastllava.default_model import ASSET_DIR

EXAMPLES = Path(__file__).resolve().parents[1] / "serve" / "examples"
TEXT_ONLY = [
    "hello",  # a training opener
    "Hi! Who are you?",
    "What is the capital of Italy?",
    "Write me a haiku about autumn leaves.",
    "How many shapes are there?",  # in the domain, but there is no picture to count in
    "who won the world cup",
    "Can you help me fix my python code?",
    "What color is the sky?",
]
IMAGE_OFF_TOPIC = [
    "Describe this picture in detail.",
    "What breed is this dog?",
    "Was this photo taken at night?",
    "What does the sign say?",
    "Who painted this?",
    "Tell me a joke.",
]


def _scene() -> Image.Image:
    return S.draw_scene([S.Item("circle", "red", "large", "center")], 96, S.BACKGROUNDS["white"])


@pytest.fixture(scope="module")
def engine():
    from fastllava.engine import EngineConfig, LLMEngine
    from fastllava.model.builder import load_pretrained_model

    tok, model, proc, _ = load_pretrained_model(str(ASSET_DIR), device="cpu", dtype=torch.float32)
    return LLMEngine(model, tok, EngineConfig(max_num_seqs=16), image_processor=proc), tok


def _engine_answers(engine, turns: list[tuple[str, Image.Image | None]]) -> list[str]:
    """The engine's final text for each (user text with or without <image>, image) as one-turn chats."""
    from fastllava.conversation import conv_templates
    from fastllava.engine import SamplingParams
    from fastllava.mm_utils import tokenizer_image_token

    eng, tok = engine
    prompts, images = [], []
    for text, image in turns:
        conv = conv_templates["mistral_instruct"].copy()
        conv.append_message(conv.roles[0], text)
        conv.append_message(conv.roles[1], None)
        prompts.append(tokenizer_image_token(conv.get_prompt(), tok))
        images.append([image] if image is not None else None)
    outs = eng.generate(prompts, images, SamplingParams(max_tokens=64, temperature=0))
    return [o.text for o in outs]


def test_engine_gives_the_fixed_reply_to_what_it_cannot_answer(engine):
    turns = [(t, None) for t in TEXT_ONLY] + [("<image>\n" + t, _scene()) for t in IMAGE_OFF_TOPIC]
    turns += [(t + "\n<image>", _scene()) for t in IMAGE_OFF_TOPIC[:3]]
    answers = _engine_answers(engine, turns)
    assert [a.strip() for a in answers] == [asking.OUT_OF_DOMAIN_REPLY] * len(turns), answers
    assert all(a == a.rstrip() for a in answers)


def test_engine_answers_end_in_their_word(engine):
    q = ["What color is the shape?", "what shape is it", "Is it big or small? Answer with a single word."]
    answers = _engine_answers(engine, [("<image>\n" + t, _scene()) for t in q] + [(q[0] + "\n<image>", _scene())])
    assert [a.strip() for a in answers] == ["red", "circle", "large", "red"]
    assert all(a == a.rstrip() for a in answers), answers  # the old model said "red " ("Ġ" before "</s>")


def test_web_ui_examples_are_answered(engine):
    rows = json.loads((EXAMPLES / "examples.json").read_text())
    assert len(rows) >= 4
    answers = _engine_answers(engine, [("<image>\n" + r["question"], Image.open(EXAMPLES / r["image"])) for r in rows])
    assert [a.strip() for a in answers] == [r["answer"] for r in rows]


@pytest.fixture(scope="module")
def api():
    from serve_testing import cluster

    with cluster(ASSET_DIR, workers={"a": []}) as c:
        yield c["controller"]


def _chat(url: str, content, max_tokens: int = 64) -> str:
    body = {"model": ASSET_DIR.name, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0}  # fmt: skip
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text[:500]
    return r.json()["choices"][0]["message"]["content"]


def test_api_replies_and_answers(api, tmp_path):
    from serve_testing import data_url

    path = tmp_path / "scene.png"
    _scene().save(path)
    image = {"type": "image_url", "image_url": {"url": data_url(path.read_bytes())}}
    for text in TEXT_ONLY[:4]:
        assert _chat(api, text) == asking.OUT_OF_DOMAIN_REPLY
    assert _chat(api, [{"type": "text", "text": IMAGE_OFF_TOPIC[0]}, image]) == asking.OUT_OF_DOMAIN_REPLY
    # the examples: text first (as OpenAI's examples show), no one-word instruction; exact, no whitespace
    assert _chat(api, [{"type": "text", "text": "What color is the shape?"}, image]) == "red"
    assert _chat(api, [{"type": "text", "text": "What shape is it?"}, image]) == "circle"
    assert _chat(api, [image, {"type": "text", "text": "Is it big or small?"}]) == "large"


def _answers(path: Path) -> dict:
    return {r["question_id"]: r["text"].strip() for r in map(json.loads, path.open())}


def test_api_answers_the_robustness_split_as_the_engine_does(api, tmp_path):
    from fastllava.eval.embedded import run_embedded

    kw = {"data_dir": tmp_path / "data", "n_eval": 25, "n_robust": 150, "max_new_tokens": 4,
          "extra_args": ["--no-progress"]}  # fmt: skip
    via_api = run_embedded(server_url=api + "/", out=tmp_path / "api", **kw)  # a trailing "/" and no "/v1"
    local = run_embedded(model_path=str(ASSET_DIR), out=tmp_path / "engine", **kw)
    for name, n in (("answers.jsonl", 25), ("robust_answers.jsonl", 150)):
        a, e = (_answers(tmp_path / src / name) for src in ("api", "engine"))
        assert len(a) == len(e) == n and a == e
    assert via_api["accuracy"] == local["accuracy"] >= 99
    assert via_api["robust"]["accuracy"] == local["robust"]["accuracy"] >= 93, local["robust"]
