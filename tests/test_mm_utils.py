"""LLaVA's mm_utils (tokenizer_image_token, process_images, stop strings) and the anyres geometry.

Oracles: the ids LLaVA's `tokenizer_image_token` algorithm gives (worked out by hand below), transformers'
LLaVA-NeXT processor / image processor / `unpad_image`, and transformers' LlavaImageProcessor for "pad".

    pytest tests/test_mm_utils.py
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from fastllava.anyres import (
    anyres_num_features,
    get_anyres_image_grid_shape,
    pinpoints_from_hf,
    pinpoints_from_llava,
    select_best_resolution,
    unpadded_feature_shape,
)
from fastllava.image_processing import ImageProcessor
from fastllava.mm_utils import (
    StopStrings,
    expand2square,
    get_model_name_from_path,
    process_anyres_image,
    process_images,
    tokenizer_image_token,
)

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    CLIPImageProcessorPil,
    LlavaImageProcessorPil,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    PreTrainedTokenizerFast,
)
from transformers.image_processing_utils import select_best_resolution as hf_select_best_resolution  # noqa: E402
from transformers.models.llava_next.modeling_llava_next import (  # noqa: E402
    get_anyres_image_grid_shape as hf_grid_shape,
)
from transformers.models.llava_next.modeling_llava_next import unpad_image as hf_unpad_image  # noqa: E402

VOCAB = {
    "<unk>": 0,
    "<s>": 1,
    "</s>": 2,
    "hello": 3,
    "world": 4,
    "USER": 5,
    ":": 6,
    "ASSISTANT": 7,
    "describe": 8,
    "and": 9,
    "###": 10,
    "<image>": 11,
}
DEFAULT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def _tokenizer(bos: bool) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:  # Llama-style: BOS prepended to every encoded text, including each chunk
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
        hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    else:
        hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")
    hf.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return hf


# ---------------------------------------------------------------------------------------------- tokens

IM = -200
# (prompt, ids with a BOS-adding tokenizer, ids without BOS), following LLaVA's algorithm by hand:
# chunks are tokenized separately; with BOS, keep one BOS and drop the first token of every chunk.
TOKEN_CASES = [
    ("USER: <image> describe ASSISTANT:", [1, 5, 6, IM, 8, 7, 6], [5, 6, IM, 8, 7, 6]),
    ("<image> hello", [1, IM, 3], [IM, 3]),
    ("<image>\nhello world", [1, IM, 3, 4], [IM, 3, 4]),
    ("hello <image>", [1, 3, IM], [3, IM]),
    ("<image> and <image> hello", [1, IM, 9, IM, 3], [IM, 9, IM, 3]),
    ("<image><image>", [1, IM, IM], [IM, IM]),
    ("hello world", [1, 3, 4], [3, 4]),
    ("", [1], []),
]


@pytest.mark.parametrize("prompt,with_bos,without_bos", TOKEN_CASES)
def test_tokenizer_image_token(prompt, with_bos, without_bos):
    assert tokenizer_image_token(prompt, _tokenizer(bos=True)) == with_bos
    assert tokenizer_image_token(prompt, _tokenizer(bos=False)) == without_bos


def test_tokenizer_image_token_tensor_and_index():
    tok = _tokenizer(bos=True)
    out = tokenizer_image_token("USER: <image> describe", tok, image_token_index=-7, return_tensors="pt")
    assert out.dtype == torch.long and out.tolist() == [1, 5, 6, -7, 8]
    with pytest.raises(ValueError, match="Unsupported tensor type"):
        tokenizer_image_token("hello", tok, return_tensors="np")


def test_tokenizer_image_token_bos_token_not_added():
    # A BOS token that the tokenizer does not prepend (Qwen-style): no offset, nothing dropped.
    tok = _tokenizer(bos=False)
    tok.bos_token = "<s>"
    assert tok("hello").input_ids == [3]
    assert tokenizer_image_token("hello <image> world", tok) == [3, IM, 4]


def test_get_model_name_from_path():
    assert get_model_name_from_path("/ckpts/llava-v1.5-7b/") == "llava-v1.5-7b"
    assert get_model_name_from_path("runs/llava-lora/checkpoint-500") == "llava-lora_checkpoint-500"
    assert get_model_name_from_path("liuhaotian/llava-v1.6-vicuna-7b") == "llava-v1.6-vicuna-7b"


def test_stop_strings():
    tok = _tokenizer(bos=True)
    stop = StopStrings(["###", "hello world"], tok)
    assert stop.keyword_ids == [[10], [3, 4]]  # BOS stripped from the keywords' ids
    assert not stop.check([])
    assert not stop.check([8, 3])
    assert stop.check([8, 3, 4])  # ends with the ids of "hello world"
    assert stop.check([8, 10])
    sub = StopStrings(["lo wor"], tok)  # only visible in the decoded text, not as ids
    assert sub.check([8, 3, 4]) and not sub.check([8, 3])
    assert stop.trim("a cat ### hello world ###") == "a cat "
    assert stop.trim("say hello world then ###") == "say "
    assert stop.trim("nothing to cut") == "nothing to cut"


# ---------------------------------------------------------------------------------------------- images


def _rgb(rng, h, w):
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_expand2square():
    img = Image.new("RGB", (5, 2), (9, 9, 9))
    sq = expand2square(img, (1, 2, 3))
    assert sq.size == (5, 5)
    arr = np.array(sq)
    assert (arr[1:3] == 9).all()  # content at rows (5 - 2) // 2 = 1 .. 2
    assert (arr[0] == [1, 2, 3]).all() and (arr[3:] == [1, 2, 3]).all()
    tall = np.array(expand2square(Image.new("L", (2, 7), 200), 0))
    assert tall.shape == (7, 7) and (tall[:, 2:4] == 200).all() and (tall[:, :2] == 0).all()
    assert (tall[:, 4:] == 0).all()
    same = Image.new("RGB", (4, 4))
    assert expand2square(same, (0, 0, 0)) is same


def test_process_images_pad_matches_transformers_llava_pad():
    rng = np.random.default_rng(10)
    imgs = [_rgb(rng, 37, 301), _rgb(rng, 250, 99), _rgb(rng, 64, 64)]
    ours = ImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    out = process_images(imgs, ours, SimpleNamespace(image_aspect_ratio="pad"))
    ref = LlavaImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_pad=True)
    assert torch.equal(out, ref(imgs, return_tensors="pt")["pixel_values"])


def test_process_images_default_is_plain_preprocess():
    rng = np.random.default_rng(11)
    imgs = [_rgb(rng, 37, 301), _rgb(rng, 250, 99)]
    ours = ImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    out = process_images(imgs, ours, SimpleNamespace(image_aspect_ratio="square"))
    ref = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    assert torch.equal(out, ref(imgs, return_tensors="pt")["pixel_values"])


NON_SQUARE_PINPOINTS = [[56, 112], [56, 168], [112, 168]]  # (H, W), not closed under swapping


@pytest.mark.parametrize("pinpoints", [[[56, 112], [112, 56], [112, 112]], NON_SQUARE_PINPOINTS])
def test_process_images_anyres_hf_matches_transformers(pinpoints):
    rng = np.random.default_rng(12)
    imgs = [_rgb(rng, h, w) for h, w in [(37, 301), (250, 99), (56, 56), (13, 200)]]
    kwargs = {"size": {"shortest_edge": 56}, "crop_size": {"height": 56, "width": 56}}
    ref = LlavaNextImageProcessorPil(image_grid_pinpoints=pinpoints, **kwargs)
    ours = ImageProcessor.from_dict(ref.to_dict())
    out = process_images(imgs, ours, SimpleNamespace(image_aspect_ratio="anyres", image_grid_pinpoints=pinpoints))
    expected = ref(imgs, return_tensors=None, do_pad=False)["pixel_values"]
    assert len(out) == len(expected)
    for o, e in zip(out, expected, strict=True):
        assert torch.equal(o, torch.as_tensor(e))


def test_anyres_llava_convention_vs_hf():
    """LLaVA's process_anyres_image and transformers' algorithm give identical pixels for CLIP configs
    (bicubic): both squash the whole image to (size, size) for the base crop and letterbox the rest. They
    part when the processor's filter is not PIL's default: LLaVA always resizes with PIL's default
    (bicubic), transformers with the processor's `resample`."""
    rng = np.random.default_rng(13)
    kwargs = {"size": {"shortest_edge": 56}, "crop_size": {"height": 56, "width": 56}}
    cfg = SimpleNamespace(image_aspect_ratio="anyres", image_grid_pinpoints=NON_SQUARE_PINPOINTS)
    imgs = [_rgb(rng, h, w) for h, w in [(37, 301), (250, 99), (13, 200)]]
    for resample, same in [(3, True), (2, False)]:
        llava = ImageProcessor(convention="llava", resample=resample, **kwargs)
        hf = ImageProcessor(convention="hf", resample=resample, **kwargs)
        for img in imgs:
            a = process_anyres_image(img, llava, NON_SQUARE_PINPOINTS)
            b = process_anyres_image(img, hf, NON_SQUARE_PINPOINTS)
            rows, cols = get_anyres_image_grid_shape((img.height, img.width), NON_SQUARE_PINPOINTS, 56)
            assert a.shape == b.shape == (1 + rows * cols, 3, 56, 56)
            assert torch.equal(a, b) == same
        # the base crop (piece 0) is the whole image squashed, by PIL's default filter in LLaVA
        base = torch.from_numpy(llava.preprocess_one(imgs[0].resize((56, 56), Image.Resampling.BICUBIC)))
        assert torch.equal(process_anyres_image(imgs[0], llava, NON_SQUARE_PINPOINTS)[0], base)
    out = process_images(imgs, ImageProcessor(convention="llava", **kwargs), cfg)
    assert isinstance(out, list) and [x.shape[0] for x in out] == [4, 7, 4]  # grids differ -> a list


# ---------------------------------------------------------------------------------------------- anyres geometry


def test_pinpoint_conventions():
    llava = [[336, 672], [336, 1008]]  # LLaVA config.json: (W, H)
    assert pinpoints_from_llava(llava) == [(672, 336), (1008, 336)]
    assert pinpoints_from_llava("[(336, 672), (336, 1008)]") == [(672, 336), (1008, 336)]
    assert pinpoints_from_hf(llava) == [(336, 672), (336, 1008)]
    assert pinpoints_from_hf("[[336, 672]]") == [(336, 672)]
    # LLaVA-NeXT range form: (i x j) = (W units x H units) from the first to the last item, times the crop size
    assert pinpoints_from_llava("(1x1),...,(2x3)", patch_size=384) == [
        (384, 384),
        (768, 384),
        (1152, 384),
        (384, 768),
        (768, 768),
        (1152, 768),
    ]
    with pytest.raises(ValueError, match="patch_size"):
        pinpoints_from_llava("(1x1),...,(3x3)")
    with pytest.raises(ValueError):
        pinpoints_from_hf([])


def test_select_best_resolution_and_grid_match_transformers():
    rng = np.random.default_rng(14)
    pinpoint_sets = [DEFAULT_PINPOINTS, [[336, 672], [336, 1008], [672, 1008]], [[384, 768], [1152, 384]]]
    for _ in range(300):
        hw = (int(rng.integers(1, 2000)), int(rng.integers(1, 2000)))
        for pins in pinpoint_sets:
            assert select_best_resolution(hw, pins) == tuple(hf_select_best_resolution(hw, pins))
            assert get_anyres_image_grid_shape(hw, pins, 336) == tuple(hf_grid_shape(list(hw), pins, 336))
    # LLaVA passes image.size (W, H) with (W, H) pinpoints; ours takes both as (H, W): same choice, transposed.
    assert select_best_resolution((300, 1000), pinpoints_from_llava([[672, 336], [1008, 336]])) == (336, 1008)


def test_unpadded_feature_shape_matches_transformers_unpad_image():
    rng = np.random.default_rng(15)
    for _ in range(400):
        hw = (int(rng.integers(1, 1500)), int(rng.integers(1, 1500)))
        grid = (24 * int(rng.integers(1, 4)), 24 * int(rng.integers(1, 4)))
        feat = torch.zeros(1, *grid)
        assert unpadded_feature_shape(hw, *grid, convention="hf") == tuple(hf_unpad_image(feat, list(hw)).shape[1:])


def test_unpad_rounding_difference_llava_vs_hf():
    # A 55 x 176 (H x W) image on a 1 x 2 grid of 24 x 24 features: the content height is 55 * 48 / 176 = 15
    # exactly, but the float product is 14.999999999999998. LLaVA truncates it to 14 -> padding (24 - 14) // 2
    # = 5 per side -> 14 rows; transformers rounds to 15 -> padding 4 -> 16 rows.
    assert unpadded_feature_shape((55, 176), 24, 48, convention="llava") == (14, 48)
    assert unpadded_feature_shape((55, 176), 24, 48, convention="hf") == (16, 48)
    assert anyres_num_features((55, 176), DEFAULT_PINPOINTS, 336, 14, convention="llava") == 576 + 14 * 48 + 14
    assert anyres_num_features((55, 176), DEFAULT_PINPOINTS, 336, 14, convention="hf") == 576 + 16 * 48 + 16
    # the usual case: both agree
    assert unpadded_feature_shape((480, 640), 48, 48, convention="llava") == (36, 48)
    assert unpadded_feature_shape((480, 640), 48, 48, convention="hf") == (36, 48)


def _hf_processor(pinpoints, crop, strategy="default", extra=1):
    tok = _tokenizer(bos=False)
    ip = LlavaNextImageProcessorPil(
        size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop}, image_grid_pinpoints=pinpoints
    )
    return LlavaNextProcessor(
        image_processor=ip,
        tokenizer=tok,
        patch_size=14,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=extra,
    )


@pytest.mark.parametrize("strategy,extra", [("default", 1), ("full", 1), ("full", 0)])
def test_anyres_num_features_matches_llava_next_processor_tokens(strategy, extra):
    """Count the <image> tokens transformers' processor actually inserts, on real (small) images."""
    rng = np.random.default_rng(16)
    pins = [[28, 56], [56, 28], [28, 84], [56, 56], [84, 28], [56, 112]]
    proc = _hf_processor(pins, 28, strategy, extra)
    image_id = proc.tokenizer.convert_tokens_to_ids("<image>")
    for _ in range(25):
        h, w = int(rng.integers(1, 300)), int(rng.integers(1, 300))
        ids = proc(images=[_rgb(rng, h, w)], text="<image> describe", return_tensors="pt")["input_ids"]
        expected = int((ids == image_id).sum())
        got = anyres_num_features((h, w), pins, 28, 14, strategy=strategy, num_additional_image_tokens=extra)
        assert got == expected, (h, w)


@pytest.mark.parametrize(
    "pinpoints", [DEFAULT_PINPOINTS, [[336, 672], [336, 1008], [672, 1008]], [[1008, 336], [672, 1344]]]
)
def test_anyres_num_features_matches_processor_count_sweep(pinpoints):
    """Many sizes at LLaVA-1.6 scale (336 crop, 14 patch) through the processor's own counting."""
    proc = _hf_processor(pinpoints, 336)
    rng = np.random.default_rng(17)
    sizes = [(int(rng.integers(1, 2500)), int(rng.integers(1, 2500))) for _ in range(1500)]
    sizes += [(55, 176), (176, 55), (480, 640), (336, 336), (1, 1)]
    for h, w in sizes:
        expected = proc._get_number_of_features(h, w, 336, 336) - 1  # "default" strategy drops the CLS
        assert anyres_num_features((h, w), pinpoints, 336, 14) == expected, (h, w)
    assert anyres_num_features((480, 640), DEFAULT_PINPOINTS, 336, 14, image_newline=False) == 576 + 36 * 48
