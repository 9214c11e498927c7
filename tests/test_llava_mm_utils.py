"""``fastllava.mm_utils`` against LLaVA's own ``llava.mm_utils`` (llava-torch 1.2.2) on the same inputs:
``process_images`` given transformers' ``CLIPImageProcessor`` / ``SiglipImageProcessor`` objects (every aspect
mode LLaVA supports for them), and ``KeywordsStoppingCriteria`` on every prefix of random generations.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from fastllava.anyres import pinpoints_from_llava
from fastllava.mm_utils import KeywordsStoppingCriteria, process_images

transformers = pytest.importorskip("transformers")
llava_mm_utils = pytest.importorskip("llava.mm_utils")  # `pip install --no-deps llava-torch==1.2.2.post1`

PINPOINTS_WH = [[32, 64], [64, 32], [64, 64], [96, 32]]  # LLaVA's config order (W, H)


def _images():
    rng = np.random.default_rng(0)
    sizes_wh = [(32, 32), (45, 61), (90, 20), (17, 50), (64, 33)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes_wh]


def _processors():
    return {
        "clip": transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        "siglip": transformers.SiglipImageProcessor(size={"height": 32, "width": 32}),
    }


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("aspect", ["pad", "square", "anyres"])
def test_process_images_takes_transformers_processors(kind, aspect):
    if kind == "siglip" and aspect == "anyres":
        pytest.skip("LLaVA's anyres reads size['shortest_edge'], which SigLIP processors have not")
    processor = _processors()[kind]
    theirs_cfg = SimpleNamespace(image_aspect_ratio=aspect, image_grid_pinpoints=PINPOINTS_WH)
    ours_cfg = SimpleNamespace(
        image_aspect_ratio=aspect, image_grid_pinpoints=[list(p) for p in pinpoints_from_llava(PINPOINTS_WH)]
    )
    for image in _images():
        want = llava_mm_utils.process_images([image], processor, theirs_cfg)
        got = process_images([image], processor, ours_cfg)
        assert torch.equal(torch.as_tensor(got[0]), torch.as_tensor(want[0])), (image.size, aspect)


def test_process_images_rejects_other_objects():
    with pytest.raises(TypeError, match="transformers image processor"):
        process_images(_images()[:1], object(), SimpleNamespace(image_aspect_ratio="pad"))


def test_keywords_stopping_criteria_matches_llava():
    """Every prefix of random generations (keyword tokens made frequent): ours stops wherever LLaVA's does.

    Deliberate difference: LLaVA decodes only its keyword's token count of the newest tokens, so it misses a
    keyword spelt with more tokens than the keyword alone takes (or split by a skipped special token); ours
    decodes enough of the tail to see it. Every extra stop of ours has the keyword in the generated text."""
    from fastllava.default_model import default_model_path

    tok = transformers.AutoTokenizer.from_pretrained(str(default_model_path()))
    rng = random.Random(0)
    keywords_sets = [["</s>"], ["###"], ["\n"], ["USER:", "</s>"], [" red"]]
    prompt = torch.tensor([[1, 5, 6, -200, 7, 8]])
    stops = extra = 0
    for keywords in keywords_sets:
        pool = [i for kw in keywords for i in tok(kw, add_special_tokens=False).input_ids] + [tok.eos_token_id]
        ours = KeywordsStoppingCriteria(keywords, tok, prompt)
        theirs = llava_mm_utils.KeywordsStoppingCriteria(keywords, tok, prompt)
        for _ in range(40):
            new = [rng.choice(pool) if rng.random() < 0.3 else rng.randrange(3, len(tok)) for _ in range(8)]
            for n in range(1, len(new) + 1):
                out = torch.cat([prompt, torch.tensor([new[:n]])], 1)
                a, b = ours(out, None), theirs(out, None)
                stops += b
                if b:
                    assert a, (keywords, new[:n], tok.decode(new[:n]))
                elif a:
                    extra += 1
                    text = tok.decode(new[:n], skip_special_tokens=True)
                    assert any(k in text for k in keywords), (keywords, new[:n], text)
    assert stops > 50 and extra < stops / 4  # the sweep stops often, nearly always where LLaVA does
    # a batch stops only when every row does (LLaVA's rule)
    crit = KeywordsStoppingCriteria(["</s>"], tok, prompt)
    eos, word = tok.eos_token_id, tok("red", add_special_tokens=False).input_ids[0]
    both = torch.cat([prompt.repeat(2, 1), torch.tensor([[word, eos], [word, word]])], 1)
    assert crit(both, None) is False and crit(both[:1], None) is True
