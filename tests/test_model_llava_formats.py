"""Original-LLaVA checkpoint shapes that need `model_base`: a projector-only checkpoint (stage-1 output) and a
LoRA checkpoint (peft adapter + `non_lora_trainables`), each loaded onto a plain language-model folder.

Oracles: the same weights held whole in memory (projector-only), and the LoRA delta applied by hand as
W + (alpha / r) * B @ A (LoRA's definition), independent of peft.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastllava import load_pretrained_model
from fastllava.model.export import save_llava_original
from fastllava.packing import ImageInput, pack
from fastllava.tiny import build_tiny_llava, build_tokenizer, tiny_config, tiny_image_processor

IMAGE = -200


def _logits(model):
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    img = ImageInput(torch.randn(1, 3, 32, 32, generator=g), (32, 32))
    batch = pack([[1, 20, IMAGE, 30, 31, 32]], [[img]], cfg)
    with torch.no_grad():
        return model.logits(model.forward_packed(batch))


@pytest.fixture(scope="module")
def split_checkpoint(tmp_path_factory):
    """A full original-layout checkpoint, plus the same weights split into an LM-only base and the rest."""
    root = tmp_path_factory.mktemp("llava")
    cfg = tiny_config("llama")
    cfg.image_aspect_ratio = "square"
    model = build_tiny_llava(cfg, seed=3).eval()
    tok = build_tokenizer()
    full = save_llava_original(model, root / "full", tok, tiny_image_processor(cfg), vision_dir=root / "clip")
    state = load_file(str(full / "model.safetensors"))
    base = root / "vicuna-tiny"
    base.mkdir()
    save_file({k: v for k, v in state.items() if "mm_projector" not in k}, str(base / "model.safetensors"))
    tok.save_pretrained(str(base))
    projector = {k: v for k, v in state.items() if "mm_projector" in k}
    return model, full, base, projector, tok


def test_projector_only_checkpoint_on_a_base(tmp_path, split_checkpoint):
    model, full, base, projector, _ = split_checkpoint
    stage1 = tmp_path / "llava-tiny-pretrain"
    stage1.mkdir()
    (stage1 / "config.json").write_text((full / "config.json").read_text())
    save_file(projector, str(stage1 / "mm_projector.safetensors"))
    _, loaded, _, _ = load_pretrained_model(stage1, model_base=base, device="cpu")
    torch.testing.assert_close(_logits(loaded), _logits(model), atol=1e-5, rtol=1e-5)
    # without the projector file the error names it
    (stage1 / "mm_projector.safetensors").unlink()
    with pytest.raises(RuntimeError, match="mm_projector"):
        load_pretrained_model(stage1, model_base=base, device="cpu")


def test_lora_checkpoint_is_merged(tmp_path, split_checkpoint):
    model, full, base, projector, tok = split_checkpoint
    lora_dir = tmp_path / "llava-tiny-lora"
    lora_dir.mkdir()
    (lora_dir / "config.json").write_text((full / "config.json").read_text())
    r, alpha = 4, 8
    (lora_dir / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["q_proj", "v_proj"]})
    )
    g = torch.Generator().manual_seed(1)
    adapter, expected = {}, build_tiny_llava(model.config, seed=3).eval()
    expected.load_state_dict(model.state_dict())
    for i, layer in enumerate(expected.language_model.layers):
        for name in ("q_proj", "v_proj"):
            lin = getattr(layer.self_attn, name)
            a = 0.1 * torch.randn(r, lin.in_features, generator=g)
            b = 0.1 * torch.randn(lin.out_features, r, generator=g)
            prefix = f"base_model.model.model.layers.{i}.self_attn.{name}"
            adapter[f"{prefix}.lora_A.weight"] = a
            adapter[f"{prefix}.lora_B.weight"] = b
            with torch.no_grad():
                lin.weight += (alpha / r) * b @ a
    save_file(adapter, str(lora_dir / "adapter_model.safetensors"))
    save_file(
        {f"base_model.model.{k}": v for k, v in projector.items()}, str(lora_dir / "non_lora_trainables.safetensors")
    )
    tok.save_pretrained(str(lora_dir))
    _, loaded, _, _ = load_pretrained_model(lora_dir, model_base=base, device="cpu")
    assert not any("lora" in n for n, _ in loaded.named_modules()), "LoRA layers must be merged away"
    torch.testing.assert_close(_logits(loaded), _logits(expected), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(_logits(loaded), _logits(model), atol=1e-3)  # the adapter changed something


def test_non_lora_trainables_bin_needs_opt_in(tmp_path, split_checkpoint):
    model, full, base, projector, _ = split_checkpoint
    stage1 = tmp_path / "llava-tiny-pretrain"
    stage1.mkdir()
    (stage1 / "config.json").write_text((full / "config.json").read_text())
    torch.save(projector, stage1 / "mm_projector.bin")
    with pytest.raises(RuntimeError, match="allow_pickle"):
        load_pretrained_model(stage1, model_base=base, device="cpu")
    _, loaded, _, _ = load_pretrained_model(stage1, model_base=base, device="cpu", allow_pickle=True)
    torch.testing.assert_close(_logits(loaded), _logits(model), atol=1e-5, rtol=1e-5)
