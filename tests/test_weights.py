"""The key table (`fastllava.model.weights`): every rule round-trips in every layout, and the names it produces
are the ones transformers' llava-hf models and LLaVA's own projector hold (independent oracles)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import transformers

from fastllava.config import TextConfig, VisionConfig, load_json
from fastllava.model import checkpoint, weights
from fastllava.model.export import hf_config_dict, save_llava_hf, save_llava_original
from fastllava.model.llava import LlavaModel
from fastllava.tiny import build_tiny_llava, tiny_config

CONFIGS = {
    "llama-mlp": dict(family="llama"),
    "qwen2-tied": dict(family="qwen2"),
    "linear-projector": dict(family="llama", projector_type="linear"),
    "mlp3x": dict(family="mistral", projector_type="mlp3x_gelu"),
    "anyres-newline": dict(family="llama", anyres=True),
    "siglip": dict(family="llama", vision="siglip"),
}
# what each layout holds of our parameters (the vision folder only the tower; an adapter's file any of them)
HOLDS = {
    "hf_legacy": lambda name: True,
    "hf_new": lambda name: True,
    "llava": lambda name: True,
    "lora": lambda name: True,
    "vision": lambda name: name.startswith("vision_tower."),
}


def _meta_model(cfg) -> LlavaModel:
    with torch.device("meta"):
        return LlavaModel(cfg)


def _names(kind: str) -> tuple[list[str], str]:
    cfg = tiny_config(**CONFIGS[kind])
    return list(_meta_model(cfg).state_dict()), cfg.projector_type


def test_every_layout_is_in_the_table():
    assert set(weights.LAYOUTS) == set(HOLDS)


@pytest.mark.parametrize("kind", CONFIGS)
@pytest.mark.parametrize("layout", HOLDS)
def test_every_rule_round_trips(kind, layout):
    """our name -> layout key -> our name is the identity, and every key is distinct (no two parameters share a
    key); the key read back is the key written (layout key -> our name -> layout key)."""
    names, projector_type = _names(kind)
    lay = weights.LAYOUTS[layout]
    held = [n for n in names if HOLDS[layout](n)]
    keys = {}
    for name in held:
        key = lay.to_theirs(name, projector_type)
        assert key is not None, f"{layout} has no key for {name}"
        assert lay.to_ours(key) == name, (name, key)
        assert weights.to_ours(key, layout) == name
        keys[key] = name
    assert len(keys) == len(held)
    for name in set(names) - set(held):
        assert lay.to_theirs(name, projector_type) is None
    # LoRA adapter names (peft's, without the adapter name) ride the language-model rule
    if layout in ("llava", "lora"):
        name = "language_model.layers.0.self_attn.q_proj.lora_A.weight"
        assert lay.to_ours(lay.to_theirs(name, projector_type)) == name


def test_spelled_keys():
    """A few keys spelled out as the checkpoints on disk have them."""
    llava, lora, hf_new = weights.LLAVA, weights.LORA, weights.HF_NEW
    assert llava.to_theirs("multi_modal_projector.linear_2.bias") == "model.mm_projector.2.bias"
    assert llava.to_theirs("multi_modal_projector.linear_1.weight", "linear") == "model.mm_projector.weight"
    assert llava.to_ours("model.mm_projector.weight") == "multi_modal_projector.linear_1.weight"
    assert llava.to_ours("model.mm_projector.4.weight") == "multi_modal_projector.linear_3.weight"
    assert llava.to_ours("model.vision_tower.vision_tower.vision_model.post_layernorm.bias") == (
        "vision_tower.post_layernorm.bias"
    )
    assert llava.to_ours("lm_head.weight") == "language_model.lm_head.weight"
    assert lora.to_ours("base_model.model.model.layers.1.mlp.up_proj.lora_B.weight") == (
        "language_model.layers.1.mlp.up_proj.lora_B.weight"
    )
    assert lora.to_ours("model.layers.1.mlp.up_proj.weight") is None  # no prefix: not this layout
    assert hf_new.to_theirs("image_newline") == "model.image_newline"
    assert weights.VISION.to_ours("encoder.layers.0.mlp.fc1.weight") == "vision_tower.encoder.layers.0.mlp.fc1.weight"
    for skipped in ("vision_model.head.probe", "model.layers.0.self_attn.rotary_emb.inv_freq"):
        assert weights.to_ours(skipped, *weights.LAYOUTS.values()) is None


@pytest.mark.parametrize("kind", ["llama-mlp", "anyres-newline", "qwen2-tied", "siglip"])
def test_llava_hf_names_are_transformers_names(kind, tmp_path):
    """transformers' own LlavaForConditionalGeneration / LlavaNext... names, in memory and as it saves them,
    map onto exactly our parameters."""
    cfg = tiny_config(**CONFIGS[kind])
    hf_dict = hf_config_dict(cfg)
    hf_cfg = transformers.AutoConfig.for_model(**hf_dict)
    cls = transformers.LlavaForConditionalGeneration
    if cfg.is_anyres:
        cls = transformers.LlavaNextForConditionalGeneration
    with torch.device("meta"):
        hf = cls(hf_cfg)
    ours = _meta_model(cfg)
    theirs = [k for k in hf.state_dict() if not weights.DROP.search(k)]
    mapped = {weights.to_ours(k, *weights.layouts_for(hf_dict)) for k in theirs}
    expected = set(ours.state_dict())
    if cfg.text.tie_word_embeddings:
        mapped.add("language_model.lm_head.weight")
    assert mapped == expected
    # and what transformers writes to disk (the legacy layout, in transformers 5 without vision_model)
    hf.to_empty(device="cpu").save_pretrained(tmp_path)
    on_disk = [key for _, key in checkpoint.checkpoint_keys(tmp_path) if not weights.DROP.search(key)]
    assert {weights.HF_LEGACY.to_ours(k) for k in on_disk} == mapped


@pytest.mark.parametrize("projector_type", ["linear", "mlp2x_gelu", "mlp3x_gelu"])
def test_llava_projector_names_are_llavas(projector_type):
    """LLaVA's own ``build_vision_projector`` names its parameters as our table writes them."""
    from llava.model.multimodal_projector.builder import build_vision_projector

    proj = build_vision_projector(SimpleNamespace(mm_projector_type=projector_type, mm_hidden_size=8, hidden_size=16))
    depth = 1 if projector_type == "linear" else int(projector_type[3])
    ours = [f"multi_modal_projector.linear_{i}.{p}" for i in range(1, depth + 1) for p in ("weight", "bias")]
    written = {weights.LLAVA.to_theirs(n, projector_type) for n in ours}
    assert written == {"model.mm_projector." + k for k in proj.state_dict()}


@pytest.mark.parametrize("fmt", ["hf", "llava"])
def test_key_map_finds_every_parameter_without_reading_tensors(tmp_path, fmt, monkeypatch):
    """checkpoint_keys + key_map (what a tensor-parallel rank uses) locate each of our parameters in the files
    export wrote, reading headers only."""
    cfg = tiny_config("llama")
    model = build_tiny_llava(cfg)
    if fmt == "hf":
        save_llava_hf(model, tmp_path)
    else:
        save_llava_original(model, tmp_path)
    monkeypatch.setattr(checkpoint, "load_file", None)  # any full read would fail
    layouts = weights.layouts_for(load_json(tmp_path / "config.json"))
    where = weights.key_map(checkpoint.checkpoint_keys(tmp_path), *layouts)
    if fmt == "llava":
        where.update(weights.key_map(checkpoint.checkpoint_keys(tmp_path / "vision_tower"), weights.VISION))
    assert set(where) == set(model.state_dict())
    monkeypatch.undo()
    from safetensors import safe_open

    for name, (file, key) in list(where.items())[::7]:
        with safe_open(str(file), framework="pt") as f:
            torch.testing.assert_close(f.get_tensor(key), model.state_dict()[name], rtol=0, atol=0)


def test_unknown_layout_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown checkpoint layout"):
        weights.to_ours("model.norm.weight", "megatron")
    with pytest.raises(ValueError, match="has no key"):
        weights.to_layout({"language_model.norm.weight": torch.zeros(1)}, weights.VISION)


def test_checkpoint_keys_of_pickles_needs_opt_in(tmp_path):
    """Pickled shards are listed only when allowed, by their index's weight_map (or a memory-mapped load)."""
    state = {"model.norm.weight": torch.ones(4), "lm_head.weight": torch.zeros(2, 4)}
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(checkpoint.CheckpointError, match="pickle"):
        checkpoint.checkpoint_keys(tmp_path)
    keys = checkpoint.checkpoint_keys(tmp_path, allow_pickle=True)
    assert keys == [(tmp_path / "pytorch_model.bin", k) for k in state]
    index = {"weight_map": {"model.norm.weight": "pytorch_model.bin", "lm_head.weight": "pytorch_model.bin"}}
    (tmp_path / checkpoint.BIN_INDEX).write_text(json.dumps(index))
    assert sorted(checkpoint.checkpoint_keys(tmp_path, allow_pickle=True)) == sorted(keys)
    where = weights.key_map(keys, weights.LLAVA)
    assert where == {
        "language_model.norm.weight": keys[0],
        "language_model.lm_head.weight": keys[1],
    }


@pytest.mark.parametrize("kind", ["llama-mlp", "qwen2-tied", "mlp3x", "siglip"])
def test_config_serializers_round_trip_through_transformers(kind):
    """TextConfig / VisionConfig -> config.json dict -> transformers' config class -> its dict -> ours again."""
    cfg = tiny_config(**CONFIGS[kind])
    text_dict, vision_dict = cfg.text.to_hf_dict(), cfg.vision.to_hf_dict()
    hf_text = transformers.AutoConfig.for_model(**text_dict).to_dict()
    hf_vision = transformers.AutoConfig.for_model(**vision_dict).to_dict()
    assert TextConfig.from_dict(hf_text) == cfg.text
    assert VisionConfig.from_dict(hf_vision) == cfg.vision
    # a full CLIPModel / SiglipModel folder nests the tower's config under vision_config
    full = {"model_type": "clip", "text_config": {"hidden_size": 7}, "vision_config": hf_vision}
    assert VisionConfig.from_dict(full) == cfg.vision
