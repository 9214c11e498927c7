"""fastllava against transformers on tiny random-weight checkpoints that transformers itself saved.

The oracle is transformers' own pipeline: its processor (image preprocessing + <image> expansion) and its
``LlavaForConditionalGeneration`` / ``LlavaNextForConditionalGeneration``. Ours is LLaVA's pipeline:
``load_pretrained_model`` + ``tokenizer_image_token`` + ``process_images`` + ``model(...)`` / ``generate``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from fastllava import load_pretrained_model
from fastllava.mm_utils import process_images, tokenizer_image_token
from fastllava.tiny import build_tokenizer

transformers = pytest.importorskip("transformers")

PROMPT = "USER: <image>\nWhat is shown in this image? ASSISTANT:"
N_NEW = 32


def _image(h: int, w: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _text_config(family: str):
    common = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    if family == "mistral":
        return transformers.MistralConfig(**common, sliding_window=40)
    if family == "qwen2":
        return transformers.Qwen2Config(**common, tie_word_embeddings=True)
    return transformers.LlamaConfig(**common)


def _save_hf_checkpoint(path, family="llama", next_=False, seed=0, siglip=False, strategy="default"):
    """A tiny llava-hf checkpoint written by transformers, with its processor and tokenizer beside it."""
    torch.manual_seed(seed)
    vision_kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    if siglip:
        vision = transformers.SiglipVisionConfig(**vision_kw, image_size=32, patch_size=8)
    else:
        vision = transformers.CLIPVisionConfig(**vision_kw, image_size=32, patch_size=8, projection_dim=32)
    tok = build_tokenizer()
    image_token = tok.convert_tokens_to_ids("<image>")
    if next_:
        cfg = transformers.LlavaNextConfig(
            vision_config=vision,
            text_config=_text_config(family),
            image_token_index=image_token,
            image_grid_pinpoints=[[32, 64], [64, 32], [64, 64], [32, 96]],
        )
        model = transformers.LlavaNextForConditionalGeneration(cfg)
        ip = transformers.LlavaNextImageProcessorPil(
            size={"shortest_edge": 32},
            crop_size={"height": 32, "width": 32},
            image_grid_pinpoints=[[32, 64], [64, 32], [64, 64], [32, 96]],
        )
        proc = transformers.LlavaNextProcessor(
            image_processor=ip,
            tokenizer=tok,
            patch_size=8,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
        )
    else:
        cfg = transformers.LlavaConfig(
            vision_config=vision, text_config=_text_config(family), image_token_index=image_token
        )
        model = transformers.LlavaForConditionalGeneration(cfg)
        ip = transformers.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        proc = transformers.LlavaProcessor(
            image_processor=ip,
            tokenizer=tok,
            patch_size=8,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
        )
    # make the random weights less degenerate so greedy decoding is a meaningful comparison
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(25)
        for name, p in model.named_parameters():
            if "image_newline" in name:
                p.normal_(0, 0.5)
    model.eval()
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return model, proc


def _hf_reference(model, proc, prompt, images):
    inputs = proc(text=prompt, images=images, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0]
        model.generation_config.eos_token_id = None
        new = model.generate(**inputs, max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False, pad_token_id=3)
    return logits, new[0, inputs["input_ids"].shape[1] :]


def _ours(path, prompt, images, **load_kw):
    tokenizer, model, image_processor, context_len = load_pretrained_model(path, device="cpu", **load_kw)
    assert context_len == model.config.text.max_position_embeddings
    input_ids = tokenizer_image_token(prompt, tokenizer, return_tensors="pt").unsqueeze(0)
    pixel = process_images(images, image_processor, model.config)
    sizes = [img.size for img in images]  # LLaVA's call: PIL's (W, H) whatever the checkpoint layout
    with torch.no_grad():
        logits = model(input_ids, images=pixel, image_sizes=sizes).logits[0]
        new = model.generate(input_ids, images=pixel, image_sizes=sizes, max_new_tokens=N_NEW, eos_token_id=[])
    return logits, new[0]


def _compare(hf, ours):
    (hl, hn), (ol, on) = hf, ours
    assert hl.shape == ol.shape
    assert (hl - ol).abs().max().item() < 1e-4
    assert torch.equal(hn, on), (hn.tolist(), on.tolist())


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_llava_hf_matches_transformers(tmp_path, family):
    model, proc = _save_hf_checkpoint(tmp_path, family)
    images = [_image(45, 61, 1)]
    _compare(_hf_reference(model, proc, PROMPT, images), _ours(tmp_path, PROMPT, images))


def test_cls_patch_features_match_transformers(tmp_path):
    model, proc = _save_hf_checkpoint(tmp_path, "llama", strategy="full")
    images = [_image(37, 52, 8)]
    _compare(_hf_reference(model, proc, PROMPT, images), _ours(tmp_path, PROMPT, images))


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_vision_tower_hidden_states_match_transformers(kind):
    """Our tower's selected hidden states equal transformers' CLIPVisionModel / SiglipVisionModel ones."""
    from fastllava.config import VisionConfig
    from fastllava.model import weights
    from fastllava.model.vision import VisionTower

    kw = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8
    )
    if kind == "siglip":
        hf_cfg, hf_cls = transformers.SiglipVisionConfig(**kw), transformers.SiglipVisionModel
    else:
        hf_cfg, hf_cls = transformers.CLIPVisionConfig(**kw), transformers.CLIPVisionModel
    torch.manual_seed(0)
    hf = hf_cls(hf_cfg).eval()
    ours = VisionTower(VisionConfig.from_dict(hf_cfg.to_dict())).eval()
    state = {k.removeprefix("vision_tower."): v for k, v in weights.remap(hf.state_dict(), weights.VISION).items()}
    missing, _ = ours.load_state_dict(state, strict=False)
    assert not missing
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = hf(pixel_values=x, output_hidden_states=True).hidden_states
        for layer in (-2, 1, [-3, -2]):
            want = torch.cat([ref[i] for i in layer], -1) if isinstance(layer, list) else ref[layer]
            torch.testing.assert_close(ours(x, layer), want, atol=1e-5, rtol=1e-5)


def test_several_images_in_one_prompt(tmp_path):
    model, proc = _save_hf_checkpoint(tmp_path, "llama")
    prompt = "USER: <image>\nand <image>\nWhat differs? ASSISTANT:"
    images = [_image(40, 40, 2), _image(33, 70, 3)]
    _compare(_hf_reference(model, proc, prompt, images), _ours(tmp_path, prompt, images))


def test_new_key_layout_loads_the_same(tmp_path):
    """transformers >= 4.52 names: model.language_model.*, model.vision_tower.vision_model.*, lm_head."""
    model, proc = _save_hf_checkpoint(tmp_path / "legacy", "llama")
    state = load_file(str(tmp_path / "legacy" / "model.safetensors"))
    new = {}
    for k, v in state.items():
        if k.startswith("language_model.model."):
            k = "model.language_model." + k[len("language_model.model.") :]
        elif k.startswith("language_model.lm_head."):
            k = k[len("language_model.") :]
        elif k.startswith("vision_tower."):
            k = "model.vision_tower.vision_model." + k[len("vision_tower.") :]
        else:
            k = "model." + k
        new[k] = v
    assert any(k.startswith("model.language_model.") for k in new)
    (tmp_path / "new").mkdir()
    for f in (tmp_path / "legacy").iterdir():
        if f.name != "model.safetensors":
            (tmp_path / "new" / f.name).write_bytes(f.read_bytes())
    save_file(new, str(tmp_path / "new" / "model.safetensors"))
    images = [_image(50, 30, 4)]
    ours_new = _ours(tmp_path / "new", PROMPT, images)
    _compare(_hf_reference(model, proc, PROMPT, images), ours_new)


def test_sharded_checkpoint_with_index(tmp_path):
    model, proc = _save_hf_checkpoint(tmp_path, "llama")
    state = load_file(str(tmp_path / "model.safetensors"))
    keys = sorted(state)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for fname, ks in halves.items():
        save_file({k: state[k] for k in ks}, str(tmp_path / fname))
        weight_map.update({k: fname for k in ks})
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    images = [_image(32, 32, 5)]
    _compare(_hf_reference(model, proc, PROMPT, images), _ours(tmp_path, PROMPT, images))


@pytest.mark.parametrize("size_hw", [(45, 100), (100, 45), (64, 64), (30, 90), (70, 50)])
def test_llava_next_anyres_matches_transformers(tmp_path, size_hw):
    model, proc = _save_hf_checkpoint(tmp_path, "llama", next_=True)
    images = [_image(*size_hw, 6)]
    _compare(_hf_reference(model, proc, PROMPT, images), _ours(tmp_path, PROMPT, images))


def test_original_llava_layout_of_the_same_weights(tmp_path):
    """Export to the original LLaVA layout (llava_llama + mm_vision_tower folder) and reload: same outputs."""
    from fastllava.model.export import save_llava_original

    model, proc = _save_hf_checkpoint(tmp_path / "hf", "llama")
    tokenizer, ours, image_processor, _ = load_pretrained_model(tmp_path / "hf", device="cpu")
    ours.config.image_aspect_ratio = "square"  # plain CLIP preprocessing, as transformers' LlavaProcessor does
    save_llava_original(ours, tmp_path / "llava-v1.5-tiny", tokenizer, image_processor)
    cfg = json.loads((tmp_path / "llava-v1.5-tiny" / "config.json").read_text())
    assert cfg["model_type"] == "llava_llama" and cfg["mm_projector_type"] == "mlp2x_gelu"
    images = [_image(29, 47, 7)]
    _compare(_hf_reference(model, proc, PROMPT, images), _ours(tmp_path / "llava-v1.5-tiny", PROMPT, images))
