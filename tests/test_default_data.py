"""The default model's training data: how people ask (``fastllava.data.asking``), the varied synthetic split, the
robustness split, the image kept where the text puts it, and answers that end in their last word.

Oracles: the scene the generator drew (answers follow from it, not from the phrasing), the pixels of the image
(background and shape colours), and the tokenizer's own decoding of the training targets.
"""

from __future__ import annotations

import json
import random
import re

import pytest

from fastllava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from fastllava.data import asking
from fastllava.data import synthetic as S
from fastllava.data.preprocess import SampleError, preprocess
from fastllava.tiny import build_tokenizer
from fastllava.train.make_tiny_base import tokenizer_for_answers


@pytest.fixture(scope="module")
def tok():
    return tokenizer_for_answers(build_tokenizer())


def _targets(tok, out) -> list[str]:
    """The decoded runs of consecutive target tokens (one per answer)."""
    runs, cur = [], []
    for lab in out.labels:
        if lab != IGNORE_INDEX:
            cur.append(lab)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    return runs + ([tok.decode(cur)] if cur else [])


def test_every_phrasing_fills_and_the_canonical_one_is_the_sets_own():
    rng = random.Random(0)
    for n in (1, 2, 3):
        for _ in range(30):
            items = S.random_scene(rng, n)
            for kind in S.question_kinds(items):
                assert asking.ask(items, kind, rng, canonical_share=1.0) == S.question(items, kind)[0]
                for template in asking.PHRASINGS[kind]:
                    text = asking._fill(template, items, rng)
                    assert "{" not in text and "}" not in text, text
                    # the names it uses are the scene's: a question never names another shape or colour
                    assert not (set(re.findall(r"[a-z]+", text.lower())) & (set(S.COLORS) - {items[0].color}))
                    assert not (set(re.findall(r"[a-z]+", text.lower())) & (set(S.SHAPES) - {items[0].shape}))
    with pytest.raises(ValueError, match="one shape"):
        asking.ask(S.random_scene(rng, 2), "position", rng)


def test_dress_keeps_the_words():
    rng = random.Random(1)
    seen_suffix = set()
    for _ in range(300):
        text = asking.dress("Where is the shape?", rng)
        assert text.lower().startswith("where is the shape")
        seen_suffix.add(any(text.lower().endswith(s.strip().lower()) for s in asking.SUFFIXES))
    assert seen_suffix == {True, False}  # with and without the one-word instruction


def test_varied_split(tmp_path, tok):
    from PIL import Image

    train_json, eval_json = S.generate(tmp_path / "v", seed=5, n_train=120, n_eval=10, turns=5, varied=True)
    records = json.loads(train_json.read_text())
    text_only = [r for r in records if "image" not in r]
    assert len(text_only) == 120 // 12
    assert all(t["value"] == asking.OUT_OF_DOMAIN_REPLY for r in text_only for t in r["conversations"][1::2])
    firsts = [r["conversations"][0]["value"] for r in records if "image" in r]
    assert all(r["keep_image_position"] for r in records if "image" in r)
    assert any(f.startswith("<image>\n") for f in firsts) and any(f.endswith("\n<image>") for f in firsts)
    sizes = {Image.open(tmp_path / "v" / "images" / r["image"]).size for r in records if "image" in r}
    assert len(sizes) > 10 and all(w == h for w, h in sizes)
    # the eval split does not depend on how the train split is asked
    _, plain_eval = S.generate(tmp_path / "p", seed=5, n_train=3, n_eval=10)
    assert json.loads(plain_eval.read_text()) == json.loads(eval_json.read_text())
    # every sample tokenizes and masks (no LLaVA mismatch), each answer a target that ends in its last word
    for r in records:
        out = preprocess(r["conversations"], tok, "mistral_instruct", "image" in r, keep_image_position=True)
        answers = [t["value"] for t in r["conversations"][1::2]]
        assert [a.strip() for a in _targets(tok, out)] == [a + "</s>" for a in answers]
        assert all(not a.endswith((" </s>", "\n</s>")) for a in _targets(tok, out))


def test_image_stays_where_the_text_puts_it_only_when_asked(tok):
    turns = [{"from": "human", "value": "What color is it?\n<image>"}, {"from": "gpt", "value": "red"}]
    kept = preprocess(turns, tok, "mistral_instruct", True, keep_image_position=True)
    moved = preprocess(turns, tok, "mistral_instruct", True)  # LLaVA: "<image>\n" first
    image_first = [{"from": "human", "value": "<image>\nWhat color is it?"}, turns[1]]
    front = preprocess(image_first, tok, "mistral_instruct", True)
    assert moved == front
    pos = kept.input_ids.index(IMAGE_TOKEN_INDEX)
    assert pos > front.input_ids.index(IMAGE_TOKEN_INDEX)
    assert tok.decode(kept.input_ids[pos + 1 :]).startswith(" [/INST]")  # right before the end of the instruction


def test_answers_end_in_their_last_word(tok):
    plain = build_tokenizer()  # "</s>" without lstrip: the space before it is a token that is trained on
    turns = [{"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "red"}] * 2
    before = preprocess(turns, plain, "mistral_instruct", True)
    assert [t.strip() for t in _targets(plain, before)] == ["red </s>"] * 2
    after = preprocess(turns, tok, "mistral_instruct", True)
    assert _targets(tok, after) == [" red</s>", " red</s>"]
    assert len(after.input_ids) == len(before.input_ids) - 2  # one whitespace token fewer per answer
    # the template's prompt still tokenizes the same (nothing else lost its space)
    prompt = "[INST] What color? [/INST]"
    assert tok(prompt).input_ids == plain(prompt).input_ids
    with pytest.raises(SampleError, match="mismatch"):  # LLaVA's count without the trim would be off by one
        from fastllava.data import preprocess as P

        orig = P._takes_space_before
        P._takes_space_before = lambda *_: False
        try:
            preprocess(turns, tok, "mistral_instruct", True)
        finally:
            P._takes_space_before = orig


def test_robustness_split_varies_every_factor_on_its_own(tmp_path):
    from PIL import Image

    path = S.robustness_split(tmp_path, seed=0, n=200)
    assert S.robustness_split(tmp_path / "again", seed=0, n=200).read_text() == path.read_text()
    records = json.loads(path.read_text())
    for key, values in (("background", set(S.BACKGROUNDS)), ("size", {str(s) for s in S.ROBUST_SIZES}),
                        ("order", {"image first", "text first"}), ("suffix", {"none", "canonical", "other"}),
                        ("phrasing", {"canonical", "paraphrase"}), ("kind", set(S.QUESTION_KINDS))):  # fmt: skip
        assert {r[key] for r in records} == values, key
    for r in records:
        q = r["conversations"][0]["value"]
        assert q.startswith("<image>\n") == (r["order"] == "image first")
        assert q.replace("<image>", "").strip().endswith(S.SUFFIX.strip()) == (r["suffix"] == "canonical")
        im = Image.open(tmp_path / "images" / r["image"]).convert("RGB")
        assert im.size == (int(r["size"]),) * 2
        assert im.getpixel((0, 0)) == S.BACKGROUNDS[r["background"]]  # corners are never covered
        if r["kind"] == "color":
            assert S.COLORS[r["answer"]] in {c for _, c in im.getcolors(1 << 16)}
        if r["background"] in ("white", "light grey", "beige", "pale cyan") and r["kind"] == "color":
            assert r["answer"] != "white"


def test_draw_scene_jitter_leaves_the_slot_and_size():
    rng = random.Random(3)
    for _ in range(50):
        items = [S.Item("square", rng.choice(list(S.COLORS)), rng.choice(S.SIZES), rng.choice(list(S.SLOTS)))]
        side = rng.randint(28, 288)
        im = S.draw_scene(items, side, (0, 0, 0), rng)
        fx, fy = S.SLOTS[items[0].slot]
        # the slot centre stays inside a square (the jitter, < 6% of the side, is below its smallest half side)
        inside = {im.getpixel((int(fx * side) + dx, int(fy * side) + dy)) for dx in (-1, 0, 1) for dy in (-1, 0, 1)}
        assert S.COLORS[items[0].color] in inside, (items, side)
