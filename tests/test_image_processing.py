"""ImageProcessor against transformers' PIL image processors (bit-exact), and the safe image loader.

pytest tests/test_image_processing.py
"""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers

from fastllava.image_io import DEFAULT_MAX_PIXELS, ImageLoadError, load_image
from fastllava.image_processing import ImageProcessor

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    CLIPImageProcessorPil,
    LlavaImageProcessorPil,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    PreTrainedTokenizerFast,
    SiglipImageProcessorPil,
)

ODD_SIZES = [(37, 301), (501, 333), (17, 9), (336, 336), (7, 40), (250, 251)]  # (H, W)


def _image(rng, h, w, mode="RGB"):
    if mode == "RGB":
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    if mode == "RGBA":
        return Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8))
    if mode == "L":
        return Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8))
    if mode == "P":
        return _image(rng, h, w).convert("P", palette=Image.Palette.ADAPTIVE, colors=17)
    raise ValueError(mode)


def _hf_composites_alpha() -> bool:
    """Whether transformers' `convert_to_rgb` composites RGBA onto white, as our processor does (5.25 does; 5.17,
    the GPU machine's, drops the alpha channel)."""
    from transformers.image_transforms import convert_to_rgb

    return convert_to_rgb(Image.new("RGBA", (1, 1), (200, 100, 50, 0))).getpixel((0, 0)) == (255, 255, 255)


HF_COMPOSITES_ALPHA = _hf_composites_alpha()


def _hf(img):
    """The image as given to the transformers processor: on releases that drop alpha, composited onto white by
    PIL first, so the comparison still checks everything after the RGB conversion."""
    if isinstance(img, list):
        return [_hf(i) for i in img]
    if HF_COMPOSITES_ALPHA or img.mode != "RGBA":
        return img
    return Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img).convert("RGB")


def _assert_same(ours: torch.Tensor, ref: torch.Tensor):
    assert ours.shape == ref.shape and ours.dtype == ref.dtype == torch.float32
    assert torch.equal(ours, ref), f"max abs diff {(ours - ref).abs().max().item()}"


# ---------------------------------------------------------------------------------------------- processors


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
def test_clip_matches_transformers(mode):
    rng = np.random.default_rng(1)
    ref = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    ours = ImageProcessor.from_dict(ref.to_dict())
    assert ours.crop_size["height"] == 336 and ours.size == {"shortest_edge": 336}
    assert ours.image_mean == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    for h, w in ODD_SIZES:
        img = _image(rng, h, w, mode)
        _assert_same(ours(img)["pixel_values"], ref(_hf(img), return_tensors="pt")["pixel_values"])


def test_clip_batch_and_non_default_settings():
    rng = np.random.default_rng(2)
    imgs = [_image(rng, h, w) for h, w in ODD_SIZES]
    # bilinear, a crop larger than the resized image (center_crop zero-pads), no normalization
    for kwargs in [
        {"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}, "resample": 2},
        {"size": {"shortest_edge": 40}, "crop_size": {"height": 57, "width": 31}},
        {"do_resize": False, "crop_size": {"height": 45, "width": 45}},
        {"do_normalize": False, "size": {"shortest_edge": 33}, "crop_size": {"height": 33, "width": 33}},
    ]:
        ref = CLIPImageProcessorPil(**kwargs)
        ours = ImageProcessor.from_dict(ref.to_dict())
        if ours.do_resize:
            _assert_same(ours(imgs)["pixel_values"], ref(_hf(imgs), return_tensors="pt")["pixel_values"])
        else:  # uncropped sizes differ per image: compare one by one
            for img in imgs:
                _assert_same(ours(img)["pixel_values"], ref(_hf(img), return_tensors="pt")["pixel_values"])


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_siglip_matches_transformers(mode):
    rng = np.random.default_rng(3)
    ref = SiglipImageProcessorPil(size={"height": 384, "width": 384})
    ours = ImageProcessor.from_dict(ref.to_dict())
    assert not ours.do_center_crop and ours.image_mean == [0.5, 0.5, 0.5]
    assert ours.crop_size == {"height": 384, "width": 384}  # LLaVA reads crop_size even for SigLIP
    for h, w in ODD_SIZES:
        img = _image(rng, h, w, mode)
        _assert_same(ours(img)["pixel_values"], ref(_hf(img), return_tensors="pt")["pixel_values"])


def test_llava_pad_to_square_matches_transformers():
    rng = np.random.default_rng(4)
    ref = LlavaImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_pad=True)
    ours = ImageProcessor.from_dict(ref.to_dict())
    for h, w in ODD_SIZES:
        img = _image(rng, h, w)
        _assert_same(ours(img)["pixel_values"], ref(_hf(img), return_tensors="pt")["pixel_values"])


@pytest.mark.parametrize(
    "pinpoints",
    [
        [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]],
        [[56, 112], [56, 168], [112, 168]],  # non-square and not closed under (H, W) swap
    ],
)
def test_llava_next_hf_matches_transformers(pinpoints):
    rng = np.random.default_rng(5)
    kwargs = {"size": {"shortest_edge": 56}, "crop_size": {"height": 56, "width": 56}}
    ref = LlavaNextImageProcessorPil(image_grid_pinpoints=pinpoints, **kwargs)
    ours = ImageProcessor.from_dict(ref.to_dict())
    assert ours.convention == "hf" and ours.image_grid_pinpoints == pinpoints
    imgs = [_image(rng, h, w, m) for (h, w), m in zip(ODD_SIZES, ["RGB", "RGBA", "L", "RGB", "RGB", "P"], strict=True)]
    r = ref(_hf(imgs), return_tensors="pt")
    o = ours(imgs)
    assert torch.equal(o["image_sizes"], r["image_sizes"])
    _assert_same(o["pixel_values"], r["pixel_values"])  # (B, max_patches, 3, 56, 56), zero-padded


def test_from_pretrained_reads_transformers_files(tmp_path):
    rng = np.random.default_rng(6)
    img = _image(rng, 123, 77)

    # preprocessor_config.json written by transformers
    ref = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    ref.save_pretrained(tmp_path / "clip")
    ours = ImageProcessor.from_pretrained(tmp_path / "clip")
    assert ours.convention == "llava"
    _assert_same(ours(img)["pixel_values"], ref(_hf(img), return_tensors="pt")["pixel_values"])

    # the old feature-extractor style with int sizes (openai/clip-vit-large-patch14-336, used by LLaVA-1.5)
    old = {
        "crop_size": 336,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3,
        "size": 336,
    }
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "preprocessor_config.json").write_text(json.dumps(old))
    ref_old = CLIPImageProcessorPil.from_pretrained(tmp_path / "old")
    ours_old = ImageProcessor.from_pretrained(tmp_path / "old")
    assert ours_old.size == {"shortest_edge": 336} and ours_old.crop_size == {"height": 336, "width": 336}
    _assert_same(ours_old(img)["pixel_values"], ref_old(img, return_tensors="pt")["pixel_values"])

    # transformers 5 processors nest the image processor in processor_config.json
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<image>": 1}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    pins = [[336, 672], [336, 1008]]
    ip = LlavaNextImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, image_grid_pinpoints=pins
    )
    LlavaNextProcessor(image_processor=ip, tokenizer=hf_tok, patch_size=14).save_pretrained(tmp_path / "next")
    assert not (tmp_path / "next" / "preprocessor_config.json").exists()
    assert "image_processor" in json.loads((tmp_path / "next" / "processor_config.json").read_text())
    ours_next = ImageProcessor.from_pretrained(tmp_path / "next")
    assert ours_next.image_processor_type == "LlavaNextImageProcessor"
    assert ours_next.convention == "hf" and ours_next.image_grid_pinpoints == pins

    with pytest.raises(FileNotFoundError):
        ImageProcessor.from_pretrained(tmp_path / "missing")


def test_save_pretrained_round_trips_through_transformers(tmp_path):
    rng = np.random.default_rng(7)
    img = _image(rng, 99, 310)
    ours = ImageProcessor(
        size={"height": 200, "width": 160}, do_center_crop=False, resample=2, image_mean=[0.1, 0.2, 0.3]
    )
    ours.save_pretrained(tmp_path)
    ref = CLIPImageProcessorPil.from_pretrained(tmp_path)
    _assert_same(ours(img)["pixel_values"], ref(_hf(img), return_tensors="pt")["pixel_values"])
    assert ImageProcessor.from_pretrained(tmp_path) == ours


def test_rejects_bad_inputs():
    with pytest.raises(ValueError):
        ImageProcessor(size={"longest_edge": 3})
    with pytest.raises(ValueError):
        ImageProcessor(convention="other")
    with pytest.raises(TypeError):
        ImageProcessor()("not an image")


# ---------------------------------------------------------------------------------------------- image_io


def _png(w=20, h=20, color=(10, 20, 30)) -> bytes:
    bio = io.BytesIO()
    Image.new("RGB", (w, h), color).save(bio, "PNG")
    return bio.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _bomb_png(w: int, h: int) -> bytes:
    """A valid 1-bit PNG of w x h zeros: ~100 KB on disk, w*h bytes once decoded by PIL."""
    comp = zlib.compressobj(9)
    row = b"\x00" * (1 + (w + 7) // 8)
    idat = b"".join(comp.compress(row) for _ in range(h)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def test_load_image_sources(tmp_path):
    data = _png(21, 13)
    b64 = base64.b64encode(data).decode()
    (tmp_path / "a.png").write_bytes(data)
    rgba = Image.new("RGBA", (5, 4), (200, 100, 50, 0))
    for src in [data, "data:image/png;base64," + b64, b64, str(tmp_path / "a.png"), tmp_path / "a.png", rgba]:
        img = load_image(src)
        assert img.mode == "RGB"
    assert load_image(data).size == (21, 13) and load_image(data).getpixel((3, 3)) == (10, 20, 30)
    assert load_image(rgba).getpixel((0, 0)) == (200, 100, 50)  # .convert("RGB"), as LLaVA
    for fmt in ["JPEG", "GIF", "BMP", "WEBP"]:
        bio = io.BytesIO()
        Image.new("RGB", (8, 6), (255, 0, 0)).save(bio, fmt)
        assert load_image(bio.getvalue()).size == (8, 6)


def test_load_image_refuses_remote_urls():
    for url in ["http://example.com/cat.png", "https://example.com/cat.png", " HTTPS://x/y"]:
        with pytest.raises(ImageLoadError, match="remote fetching is not supported"):
            load_image(url)


def test_load_image_corrupt_and_truncated():
    with pytest.raises(ImageLoadError, match="cannot identify"):
        load_image(b"this is not an image at all" * 3)
    data = _png(64, 64)
    with pytest.raises(ImageLoadError, match="truncated"):
        load_image(data[: len(data) - 30])
    with pytest.raises(ImageLoadError, match="empty"):
        load_image(b"")
    with pytest.raises(ImageLoadError, match="base64"):
        load_image("data:image/png;base64,@@not-base64@@")
    with pytest.raises(ImageLoadError, match="not an image"):
        load_image("data:text/plain;base64," + base64.b64encode(b"hi").decode())


def test_load_image_pixel_cap_is_checked_before_decoding():
    data = _png(20, 20)
    with pytest.raises(ImageLoadError, match=r"20x20 = 400 pixels, over the pixel cap of 100"):
        load_image(data, max_pixels=100)
    # Header intact, pixel data cut off: the cap must fire first (a decode would report truncation).
    with pytest.raises(ImageLoadError, match="over the pixel cap of 100"):
        load_image(data[:60], max_pixels=100)
    assert load_image(data, max_pixels=400).size == (20, 20)


def test_load_image_decompression_bomb():
    bomb = _bomb_png(30000, 30000)
    assert len(bomb) < 300_000
    for cap in [DEFAULT_MAX_PIXELS, 10**12]:  # PIL's own bomb error also surfaces as ours
        with pytest.raises(ImageLoadError, match=r"over the pixel cap.*900000000 pixels"):
            load_image(bomb, max_pixels=cap)
    # Between PIL's warning and error limits (89.5 M .. 179 M px) PIL only *warns*; that must be our error too.
    with pytest.raises(ImageLoadError, match="100000000 pixels"):
        load_image(_bomb_png(10000, 10000), max_pixels=10**12)


def test_load_image_format_allowlist():
    for fmt in ["TIFF", "ICO"]:
        bio = io.BytesIO()
        Image.new("RGB", (16, 16)).save(bio, fmt)
        with pytest.raises(ImageLoadError, match=f"format {fmt} is not allowed"):
            load_image(bio.getvalue())
    with pytest.raises(ImageLoadError, match="format PNG is not allowed"):
        load_image(_png(), allowed_formats=("JPEG",))
    bio = io.BytesIO()
    Image.new("RGB", (16, 16)).save(bio, "TIFF")
    assert load_image(bio.getvalue(), allowed_formats=("TIFF",)).size == (16, 16)


def test_load_image_allowed_dir(tmp_path):
    root = tmp_path / "allowed"
    root.mkdir()
    (root / "in.png").write_bytes(_png())
    (tmp_path / "out.png").write_bytes(_png())
    os.symlink(tmp_path / "out.png", root / "link.png")
    assert load_image(str(root / "in.png"), allowed_dir=root).size == (20, 20)
    for bad in [tmp_path / "out.png", root / ".." / "out.png", root / "link.png", "/etc/passwd"]:
        with pytest.raises(ImageLoadError, match="outside the allowed directory"):
            load_image(str(bad), allowed_dir=root)
    with pytest.raises(ImageLoadError, match="not found"):
        load_image(str(root / "missing.png"), allowed_dir=root)
