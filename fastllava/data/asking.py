"""How people ask the embedded default model, and what it says when it cannot answer.

The shapes set (``fastllava.data.synthetic``) asks every question one way: the image first, the canonical
question, then " Answer with a single word.". People do not: they write "Count the shapes." or "what colour is
it", put the question before the image (an OpenAI request with the text part first renders ``text\\n<image>``),
leave the instruction out, shout, drop the question mark. This module draws such askings:

* ``ask(items, kind, rng)``: one question of ``kind`` about a scene in a random phrasing (``PHRASINGS``);
* ``dress(text, rng)``: random capitalisation, trailing punctuation and one-word instruction (or none);
* ``OUT_OF_DOMAIN_REPLY``: the one short reply to questions the model cannot answer -- any question without an
  image, and questions about the image that are not about its shapes (``off_topic_question``).

The answer never depends on the phrasing: "Is it big or small?" is answered ``large`` or ``small`` like
"Is the shape small or large?".
"""

from __future__ import annotations

import random

CANONICAL_SUFFIX = " Answer with a single word."
# Other ways of asking for one word; the canonical one is drawn most often (it is what LLaVA's evals append).
SUFFIXES = (CANONICAL_SUFFIX, " Answer in one word.", " One word only.", " Reply with one word.", " One word please.")

OUT_OF_DOMAIN_REPLY = (
    "I can only answer questions about the shapes in an image: how many, what color, what shape, where, small or large."
)
# What the web UI and ``fastllava serve`` tell people the default model knows.
DEFAULT_MODEL_HINT = (
    "The built-in default model is a tiny demo: it answers one-word questions about coloured shapes in a "
    "picture (how many, what colour, which shape, where, small or large)."
)

# Placeholders: {noun} shape/object/thing/figure (plural for 2-3 copies), {pron} it/they, {be} is/are,
# {name} the shape's name (plural: "circles"), {color} its colour, {this} this/these.
PHRASINGS: dict[str, tuple[str, ...]] = {
    "count": (
        "How many shapes are there?",
        "How many {noun}s can you see?",
        "How many {noun}s are in the image?",
        "How many {noun}s are in the picture?",
        "Count the {noun}s.",
        "How many {name}s are there?",
        "What is the number of {noun}s?",
        "How many {noun}s do you see?",
        "Number of shapes?",
        "How many {color} shapes are there?",
    ),
    "color": (
        "What color {be} the shape{s}?",
        "What colour {be} {pron}?",
        "Which color {be} the {noun}{s}?",
        "What is the color of the {noun}{s}?",
        "What colour {be} the {name}{s}?",
        "Tell me the colour of the shape{s}.",
        "What color?",
        "Which colour do you see?",
        "What color {be} {this} {name}{s}?",
    ),
    "shape": (
        "What shape {be} {pron}?",
        "Which shape do you see?",
        "What kind of shape {be} {this}?",
        "What is the shape?",
        "What {be} the {color} {noun}{s}?",
        "Name the shape.",
        "Which shape is shown?",
        "What shape {be} the {color} {noun}{s}?",
        "What type of shape is in the image?",
    ),
    "position": (
        "Where is the shape?",
        "Where is it located?",
        "Where is the {name}?",
        "Where is the {color} shape?",
        "In which part of the image is the {noun}?",
        "Where is it?",
        "What is the position of the {noun}?",
        "Where is the {color} {name} located?",
        "Where in the picture is it?",
    ),
    "size": (
        "{Be} the shape{s} small or large?",
        "Is {pron} big or small?",
        "{Be} {pron} large or small?",
        "Is the {name} small or big?",
        "How big {be} the {noun}{s}?",
        "What size {be} the {noun}{s}?",
        "Is the {color} {noun} large or small?",
        "{Be} {this} {name}{s} big or small?",
    ),
}

# Off-topic material: questions with no image, or about an image but not about its shapes. A generator (not a
# fixed list) so that the model learns "not about shapes -> the reply" rather than a list of sentences.
_OFF_TOPIC_OPENERS = (
    "hello", "hi", "hey", "hi there", "good morning", "thanks", "thank you", "ok", "who are you?",
    "what can you do?", "help", "test", "are you there?", "what is your name?", "how are you?", "bye",
)  # fmt: skip
_TOPICS = (
    "the weather", "France", "music", "a dog", "the moon", "python", "history", "cooking", "the ocean",
    "my homework", "football", "a cat", "the news", "cars", "love", "math", "physics", "the stock market",
    "a horse", "coffee", "the president", "trees", "the war", "computers", "a birthday", "rain", "books",
    "Paris", "the sun", "a movie", "space", "money", "sleep", "dinner", "the internet", "art", "a song",
)  # fmt: skip
_OFF_TOPIC_TEMPLATES = (
    "What is {t}?", "Tell me about {t}.", "Write a poem about {t}.", "Can you explain {t}?",
    "What do you think of {t}?",
    "Is there {t} in the image?", "Describe {t}.", "Why is {t} important?", "Translate {t} into French.",
    "Who invented {t}?", "Give me a fact about {t}.", "Summarize {t}.", "How does {t} work?",
    "Does the picture show {t}?", "What is the capital of {t}?", "When did {t} start?",
)  # fmt: skip
_IMAGE_OFF_TOPIC = (
    "Describe the image.", "What is in this picture?", "What animal is this?", "Who made this image?",
    "What is the person doing?", "Is this a photo?", "What text is written here?", "What time is it?",
    "What is happening in the image?", "Caption this image.", "Is this image real?", "What does it mean?",
    "What is the mood of this picture?", "Where was this photo taken?", "What brand is this?",
)  # fmt: skip


def _fill(template: str, items, rng: random.Random) -> str:
    """Fill the placeholders for a scene; singular or plural agrees with the number of shapes."""
    one, it = len(items) == 1, items[0]
    plural_name = it.shape + ("es" if it.shape.endswith("s") else "s")  # crosses
    return template.replace("{name}s", plural_name).format(
        noun=rng.choice(("shape", "object", "thing", "figure")),
        s="" if one else "s",
        pron="it" if one else "they",
        be="is" if one else "are",
        Be="Is" if one else "Are",
        this="this" if one else "these",
        name=it.shape,
        color=it.color,
    )


def ask(items, kind: str, rng: random.Random, canonical_share: float = 0.0) -> str:
    """A question of ``kind`` about the scene ``items`` in a random phrasing (the first phrasing of the kind,
    the synthetic set's own, with probability ``canonical_share`` plus its share among the others)."""
    if kind == "position" and len(items) != 1:
        raise ValueError("a position question needs a scene with one shape")
    options = PHRASINGS[kind]
    template = options[0] if rng.random() < canonical_share else rng.choice(options)
    return _fill(template, items, rng)


def dress(text: str, rng: random.Random, suffix: str | None = "random") -> str:
    """``text`` as someone might type it: capitalisation, trailing punctuation, and an instruction.

    ``suffix``: "random" (none half of the time, else one of ``SUFFIXES``), None (none), or a given suffix.
    """
    body, end = (text[:-1], text[-1]) if text[-1] in "?." else (text, "")
    end = rng.choice((end, end, "", end + end if end == "?" else end, " " + end if end else "", "!" if end else ""))
    case = rng.random()
    if case < 0.2:
        body = body.lower()
    elif case < 0.27:
        body = body.upper()
    elif case < 0.35:
        body = body[:1].lower() + body[1:]
    if suffix == "random":
        suffix = None if rng.random() < 0.5 else (CANONICAL_SUFFIX if rng.random() < 0.5 else rng.choice(SUFFIXES))
    if suffix and rng.random() < 0.15:
        suffix = suffix.lower()
    return body + end + (suffix or "")


def off_topic_question(rng: random.Random, with_image: bool) -> str:
    """A question the default model cannot answer (it gets ``OUT_OF_DOMAIN_REPLY``), dressed at random."""
    r = rng.random()
    if r < 0.25:
        text = rng.choice(_OFF_TOPIC_OPENERS)
    elif with_image and r < 0.6:
        text = rng.choice(_IMAGE_OFF_TOPIC)
    else:
        text = rng.choice(_OFF_TOPIC_TEMPLATES).format(t=rng.choice(_TOPICS))
    return dress(text, rng, suffix=None if rng.random() < 0.8 else "random")
