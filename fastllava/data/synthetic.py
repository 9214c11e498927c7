"""A procedurally generated image-question set: coloured shapes on a plain background, single-word answers.

Every image holds one to three copies of one shape (same type, colour and size), each in its own *slot*
(left, right, top, bottom, center), so every question has exactly one answer:

    How many shapes are there?                -> one | two | three
    What color is the shape? / are the shapes? -> red | green | blue | yellow | purple | white
    What shape is it? / are they?             -> circle | square | triangle | cross
    Where is the shape?  (one-shape scenes)   -> left | right | top | bottom | center
    Is the shape / Are the shapes small or large? -> small | large

Why copies of one shape and not a mix: questions about one shape among several ("What color is the circle?")
need the language model to find an object by its shape and read another attribute -- a binding that the tiny
default model (2-layer tower, 2-layer LM, trained from scratch in minutes on 2 CPU cores) did not learn: it
stayed at chance on shape and position questions (~55% overall). Every question here reads one attribute of
the scene; the tower still has to see colour, shape, size, position and count.

Written in LLaVA's JSON format (``id``, ``image``, ``conversations`` with ``from``/``value``, ``<image>`` in the
first human turn), PNG images beside it. Train samples carry several questions about one image (multi-turn:
more supervision per image forward); eval samples carry one question each, an ``answer`` and a ``kind``
(the kinds take turns, so the eval split is balanced). Everything is a function of the seed.

    python -m fastllava.data.synthetic --out /tmp/shapes --seed 0 --n-train 4000 --n-eval 500 [--varied --n-robust 1000]
    # -> /tmp/shapes/{train.json, eval.json, [robust.json,] images/*.png}

``--varied`` (the default model's recipe) asks the train split the ways people ask (``fastllava.data.asking``:
paraphrases, the image before or after the text, with or without the one-word instruction, any case and
punctuation, off-topic questions and text-only chats answered with one fixed reply) on any of ``BACKGROUNDS``
at 28-288 px, drawn off the patch grid; ``robustness_split`` is the held-out split that measures it.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from fastllava.data import asking

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 190, 40),
    "blue": (40, 70, 230),
    "yellow": (235, 220, 30),
    "purple": (150, 40, 200),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "large")
# Slot centres as fractions of the side. With the default 48 px image and 16 px patches each slot is exactly
# one patch of the 3 x 3 grid, so a shape never straddles patches.
SLOTS = {
    "left": (1 / 6, 1 / 2),
    "right": (5 / 6, 1 / 2),
    "top": (1 / 2, 1 / 6),
    "bottom": (1 / 2, 5 / 6),
    "center": (1 / 2, 1 / 2),
}
COUNT_WORDS = ("zero", "one", "two", "three")
BACKGROUND = (40, 40, 40)
# Other backgrounds people's pictures have. None is one of the answer colours, so "what colour is it" never has
# the background as a plausible answer; white shapes are not drawn on the light ones (``colors_on``).
BACKGROUNDS = {
    "dark": BACKGROUND,
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "light grey": (200, 200, 200),
    "grey": (128, 128, 128),
    "beige": (230, 215, 180),
    "pale cyan": (190, 225, 225),
    "brown": (70, 45, 30),
    "dark teal": (20, 60, 60),
}
SUFFIX = asking.CANONICAL_SUFFIX  # " Answer with a single word."
QUESTION_KINDS = ("count", "color", "shape", "position", "size")
ROBUST_SIZES = (32, 48, 72, 100, 160, 256)  # image sides of the robustness split
ROBUST_GROUPS = ("kind", "phrasing", "order", "suffix", "background", "size")  # its variant groups


@dataclass
class Item:
    shape: str
    color: str
    size: str
    slot: str


def colors_on(background: tuple[int, int, int]) -> list[str]:
    """The shape colours drawn on ``background``: all but white on light backgrounds."""
    return [c for c in COLORS if not (c == "white" and min(background) > 170)]


def random_scene(rng: random.Random, n: int | None = None, colors: list[str] | None = None) -> list[Item]:
    """``n`` (default: 1-3 at random) copies of one shape, colour (from ``colors``, default all) and size, in
    distinct slots."""
    n = n or rng.randint(1, 3)
    shape, color, size = rng.choice(SHAPES), rng.choice(colors or list(COLORS)), rng.choice(SIZES)
    return [Item(shape, color, size, slot) for slot in rng.sample(list(SLOTS), n)]


def draw_scene(
    items: list[Item], side: int = 48, background: tuple[int, int, int] = BACKGROUND, rng: random.Random | None = None
) -> Image.Image:
    """Render the scene as an RGB image of ``side`` x ``side`` pixels on ``background``.

    With ``rng``, every shape is moved by up to 6% of the side and its size varied by -12%..+8% (small and large
    stay apart: radii 0.26-0.32 vs 0.40-0.49 of a cell), so the drawing is not aligned to the 48 px patch grid.
    """
    img = Image.new("RGB", (side, side), background)
    d = ImageDraw.Draw(img)
    cell = side / 3
    for it in items:
        fx, fy = SLOTS[it.slot]
        if rng is not None:
            fx, fy = fx + rng.uniform(-0.06, 0.06), fy + rng.uniform(-0.06, 0.06)
        cx, cy = fx * side, fy * side
        r = cell * (0.3 if it.size == "small" else 0.45) * (rng.uniform(0.88, 1.08) if rng is not None else 1.0)
        col = COLORS[it.color]
        if it.shape == "circle":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col)
        elif it.shape == "square":
            d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=col)
        elif it.shape == "triangle":
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=col)
        else:  # cross
            w = max(1.0, r * 0.4)
            d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=col)
            d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=col)
    return img


def question_kinds(items: list[Item]) -> tuple[str, ...]:
    """The kinds of question with one answer for this scene (position needs a single shape)."""
    return QUESTION_KINDS if len(items) == 1 else tuple(k for k in QUESTION_KINDS if k != "position")


def question(items: list[Item], kind: str, rng: random.Random | None = None) -> tuple[str, str]:
    """One (question, answer) pair of ``kind`` about the scene (``rng`` is unused: kept for callers)."""
    one, it = len(items) == 1, items[0]
    if kind == "count":
        return "How many shapes are there?", COUNT_WORDS[len(items)]
    if kind == "color":
        return ("What color is the shape?" if one else "What color are the shapes?"), it.color
    if kind == "shape":
        return ("What shape is it?" if one else "What shape are they?"), it.shape
    if kind == "position":
        if not one:
            raise ValueError("a position question needs a scene with one shape")
        return "Where is the shape?", it.slot
    if kind == "size":
        return ("Is the shape small or large?" if one else "Are the shapes small or large?"), it.size
    raise ValueError(f"unknown question kind {kind!r}")


def normalize_answer(text: str) -> str:
    """Exact-match normalisation: lower case, first word, punctuation stripped."""
    words = text.strip().lower().replace(".", " ").replace(",", " ").replace("!", " ").split()
    return words[0] if words else ""


def group_accuracy(records: list[dict], predictions: list[str], keys: tuple[str, ...] = ROBUST_GROUPS) -> dict:
    """Exact-match accuracy (0-1) overall (``"all"``) and per value of each of ``keys`` a record carries
    (``"background=white"``)."""
    right: dict[str, int] = {}
    total: dict[str, int] = {}
    for r, pred in zip(records, predictions, strict=True):
        ok = normalize_answer(pred) == normalize_answer(r["answer"])
        for g in ["all"] + [f"{k}={r[k]}" for k in keys if k in r]:
            right[g] = right.get(g, 0) + ok
            total[g] = total.get(g, 0) + 1
    return {g: right[g] / total[g] for g in sorted(total, key=lambda g: (g != "all", g))}


def robustness_split(out: str | Path, seed: int = 0, n: int = 1000) -> Path:
    """Write ``robust.json`` (and its images) under ``out``: held-out questions asked the ways people ask.

    Every record varies, independently and uniformly: the question ``kind`` (in turn), the ``phrasing``
    (the canonical question, or a paraphrase from ``asking.PHRASINGS`` with random capitalisation and
    punctuation), the ``order`` (image first, or text first as an OpenAI request with the text part first is
    rendered), the ``suffix`` (none, the canonical " Answer with a single word.", or another one-word
    instruction), the ``background`` (``BACKGROUNDS``) and the image ``size`` (``ROBUST_SIZES`` px, drawn
    off the patch grid). Scenes come from a random stream no train or eval split uses.
    """
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed * 1000003 + 2)
    records = []
    for i in range(n):
        kind = QUESTION_KINDS[i % len(QUESTION_KINDS)]
        bg_name, side = rng.choice(list(BACKGROUNDS)), rng.choice(ROBUST_SIZES)
        items = random_scene(rng, 1 if kind == "position" else None, colors_on(BACKGROUNDS[bg_name]))
        canonical_q, answer = question(items, kind)
        phrasing = "canonical" if rng.random() < 0.25 else "paraphrase"
        q = canonical_q if phrasing == "canonical" else asking.dress(asking.ask(items, kind, rng), rng, suffix=None)
        suffix = rng.choice(("none", "canonical", "other"))
        q += {"none": "", "canonical": SUFFIX, "other": rng.choice(asking.SUFFIXES[1:])}[suffix]
        order = rng.choice(("image first", "text first"))
        name = f"robust_{i:06d}.png"
        records.append(
            {
                "id": f"robust-{i}",
                "image": name,
                "kind": kind,
                "answer": answer,
                "phrasing": phrasing,
                "order": order,
                "suffix": suffix,
                "background": bg_name,
                "size": str(side),
                "conversations": [
                    {"from": "human", "value": "<image>\n" + q if order == "image first" else q + "\n<image>"},
                    {"from": "gpt", "value": answer},
                ],
            }
        )
        draw_scene(items, side, BACKGROUNDS[bg_name], rng).save(out / "images" / name)
    path = out / "robust.json"
    path.write_text(json.dumps(records, indent=1))
    return path


def _canonical_record(rng: random.Random, i: int, name: str, turns: int, side: int) -> tuple[dict, Image.Image]:
    """A train image asked the synthetic set's one way (image first, canonical question + ``SUFFIX``)."""
    items = random_scene(rng)
    kinds = question_kinds(items)
    conv = []
    for t, kind in enumerate(rng.sample(kinds, min(turns, len(kinds)))):
        q, a = question(items, kind)
        conv.append({"from": "human", "value": ("<image>\n" if t == 0 else "") + q + SUFFIX})
        conv.append({"from": "gpt", "value": a})
    return {"id": f"train-{i}", "image": name, "conversations": conv}, draw_scene(items, side)


def _varied_record(rng: random.Random, i: int, name: str, turns: int) -> tuple[dict, Image.Image]:
    """A train image asked the ways people ask (``asking``): any background and size, a drawing off the patch
    grid, the image before or after the first question, paraphrased and dressed questions (30% canonical), and
    now and then an off-topic question answered with ``OUT_OF_DOMAIN_REPLY``."""
    if rng.random() < 0.2:  # the canonical look: what the held-out split (and LLaVA's format) shows
        bg, side, jitter = BACKGROUND, 48, None
    else:
        bg, side, jitter = BACKGROUNDS[rng.choice(list(BACKGROUNDS))], rng.choice((48, rng.randint(28, 288))), rng
    items = random_scene(rng, colors=colors_on(bg))
    kinds = question_kinds(items)
    qa = []
    for kind in rng.sample(kinds, min(turns, len(kinds))):
        q, a = question(items, kind)
        qa.append((q + SUFFIX if rng.random() < 0.3 else asking.dress(asking.ask(items, kind, rng), rng), a))
    if rng.random() < 0.15:
        qa.insert(rng.randrange(len(qa) + 1), (asking.off_topic_question(rng, True), asking.OUT_OF_DOMAIN_REPLY))
    conv = []
    for t, (q, a) in enumerate(qa):
        if t == 0:  # an OpenAI request with the text part first renders "text\n<image>"
            q = "<image>\n" + q if rng.random() < 0.6 else q + "\n<image>"
        conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    record = {"id": f"train-{i}", "image": name, "keep_image_position": True, "conversations": conv}
    return record, draw_scene(items, side, bg, jitter)


def _text_only_record(rng: random.Random, i: int) -> dict:
    """A conversation without an image: whatever is asked, shapes or not, gets ``OUT_OF_DOMAIN_REPLY``."""
    conv = []
    for _ in range(rng.randint(1, 2)):
        if rng.random() < 0.5:
            q = asking.off_topic_question(rng, with_image=False)
        else:
            items = random_scene(rng)
            q = asking.dress(asking.ask(items, rng.choice(question_kinds(items)), rng), rng)
        conv += [{"from": "human", "value": q}, {"from": "gpt", "value": asking.OUT_OF_DOMAIN_REPLY}]
    return {"id": f"train-text-{i}", "conversations": conv}


def generate(
    out: str | Path,
    seed: int = 0,
    n_train: int = 4000,
    n_eval: int = 500,
    side: int = 48,
    turns: int = 3,
    varied: bool = False,
) -> tuple[Path, Path]:
    """Write ``train.json``, ``eval.json`` and ``images/`` under ``out``; returns the two JSON paths.

    ``varied``: the train split is asked the ways people ask (``_varied_record``) and gets ``n_train // 12``
    text-only conversations more (``_text_only_record``); ``side`` then applies to the eval split only. The
    eval split is the same either way. Train and eval scenes come from different random streams of the same
    seed; an eval scene identical to a train scene is possible but rare and harmless.
    """
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed * 1000003)
    train = []
    for i in range(n_train):
        name = f"train_{i:06d}.png"
        if varied:
            record, image = _varied_record(rng, i, name, turns)
        else:
            record, image = _canonical_record(rng, i, name, turns, side)
        image.save(out / "images" / name)
        train.append(record)
    if varied:
        train += [_text_only_record(rng, i) for i in range(n_train // 12)]
    rng = random.Random(seed * 1000003 + 1)
    evals = []
    for i in range(n_eval):
        name = f"eval_{i:06d}.png"
        kind = QUESTION_KINDS[i % len(QUESTION_KINDS)]
        items = random_scene(rng, 1 if kind == "position" else None)
        q, a = question(items, kind)
        conv = [{"from": "human", "value": "<image>\n" + q + SUFFIX}, {"from": "gpt", "value": a}]
        evals.append({"id": f"eval-{i}", "image": name, "kind": kind, "answer": a, "conversations": conv})
        draw_scene(items, side).save(out / "images" / name)
    paths = out / "train.json", out / "eval.json"
    for path, records in zip(paths, (train, evals), strict=True):
        path.write_text(json.dumps(records, indent=1))
    return paths


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--n-eval", type=int, default=500)
    p.add_argument("--side", type=int, default=48, help="image side in pixels")
    p.add_argument("--turns", type=int, default=3, help="questions per train image")
    p.add_argument("--varied", action="store_true", help="train split asked the ways people ask (data.asking)")
    p.add_argument("--n-robust", type=int, default=0, help="also write robust.json: the robustness split")
    a = p.parse_args(argv)
    train, evalp = generate(a.out, a.seed, a.n_train, a.n_eval, a.side, a.turns, a.varied)
    print(f"wrote {train} and {evalp}")
    if a.n_robust:
        print(f"wrote {robustness_split(a.out, a.seed, a.n_robust)}")


if __name__ == "__main__":
    main()
