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

    python -m fastllava.data.synthetic --out /tmp/shapes --seed 0 --n-train 4000 --n-eval 500
    # -> /tmp/shapes/{train.json, eval.json, images/*.png}
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

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
SUFFIX = " Answer with a single word."
QUESTION_KINDS = ("count", "color", "shape", "position", "size")


@dataclass
class Item:
    shape: str
    color: str
    size: str
    slot: str


def random_scene(rng: random.Random, n: int | None = None) -> list[Item]:
    """``n`` (default: 1-3 at random) copies of one shape, colour and size, in distinct slots."""
    n = n or rng.randint(1, 3)
    shape, color, size = rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(SIZES)
    return [Item(shape, color, size, slot) for slot in rng.sample(list(SLOTS), n)]


def draw_scene(items: list[Item], side: int = 48) -> Image.Image:
    """Render the scene as an RGB image of ``side`` x ``side`` pixels."""
    img = Image.new("RGB", (side, side), BACKGROUND)
    d = ImageDraw.Draw(img)
    cell = side / 3
    for it in items:
        fx, fy = SLOTS[it.slot]
        cx, cy = fx * side, fy * side
        r = cell * (0.3 if it.size == "small" else 0.45)
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


def generate(
    out: str | Path, seed: int = 0, n_train: int = 4000, n_eval: int = 500, side: int = 48, turns: int = 3
) -> tuple[Path, Path]:
    """Write ``train.json``, ``eval.json`` and ``images/`` under ``out``; returns the two JSON paths.

    Train and eval scenes come from different random streams of the same seed; an eval scene identical to a
    train scene is possible but rare and harmless (the questions are sampled independently).
    """
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, n, offset in (("train", n_train, 0), ("eval", n_eval, 1)):
        rng = random.Random(seed * 1000003 + offset)
        records = []
        for i in range(n):
            name = f"{split}_{i:06d}.png"
            if split == "train":
                items = random_scene(rng)
                kinds = question_kinds(items)
                conv = []
                for t, kind in enumerate(rng.sample(kinds, min(turns, len(kinds)))):
                    q, a = question(items, kind)
                    conv.append({"from": "human", "value": ("<image>\n" if t == 0 else "") + q + SUFFIX})
                    conv.append({"from": "gpt", "value": a})
                records.append({"id": f"{split}-{i}", "image": name, "conversations": conv})
            else:
                kind = QUESTION_KINDS[i % len(QUESTION_KINDS)]
                items = random_scene(rng, 1 if kind == "position" else None)
                q, a = question(items, kind)
                records.append(
                    {
                        "id": f"{split}-{i}",
                        "image": name,
                        "kind": kind,
                        "answer": a,
                        "conversations": [
                            {"from": "human", "value": "<image>\n" + q + SUFFIX},
                            {"from": "gpt", "value": a},
                        ],
                    }
                )
            draw_scene(items, side).save(out / "images" / name)
        path = out / f"{split}.json"
        path.write_text(json.dumps(records, indent=1))
        splits[split] = path
    return splits["train"], splits["eval"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--n-eval", type=int, default=500)
    p.add_argument("--side", type=int, default=48, help="image side in pixels")
    p.add_argument("--turns", type=int, default=3, help="questions per train image")
    a = p.parse_args(argv)
    train, evalp = generate(a.out, a.seed, a.n_train, a.n_eval, a.side, a.turns)
    print(f"wrote {train} and {evalp}")


if __name__ == "__main__":
    main()
