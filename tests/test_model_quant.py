"""4-bit models through the loader: `load_4bit=True`, and llava-hf checkpoints that bitsandbytes quantized.

Oracles: the same model with every `Linear4bit` swapped back to a plain `nn.Linear` holding the dequantized
weight (what 4-bit means), and transformers + bitsandbytes running the very checkpoint it wrote.
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from fastllava import load_pretrained_model
from fastllava.model.export import save_llava_hf
from fastllava.packing import ImageInput, pack
from fastllava.quantization import Linear4bit
from fastllava.tiny import build_tiny_llava, build_tokenizer, tiny_config, tiny_image_processor

IMAGE = -200


def _logits(model, image_token=None):
    g = torch.Generator().manual_seed(0)
    img = ImageInput(torch.randn(1, 3, 32, 32, generator=g), (32, 32))
    batch = pack([[1, 20, IMAGE, 30, 31, 32, 33]], [[img]], model.config)
    with torch.no_grad():
        return model.logits(model.forward_packed(batch))


def _dequantized_copy(model):
    """Replace every Linear4bit by an nn.Linear with its dequantized weight."""
    for name, m in list(model.named_modules()):
        if isinstance(m, Linear4bit):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(m.dequantize(torch.float32))
                if m.bias is not None:
                    lin.bias.copy_(m.bias)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, lin)
    return model


def test_load_4bit_quantizes_the_language_model_only(tmp_path):
    cfg = tiny_config("llama")
    save_llava_hf(build_tiny_llava(cfg, seed=0), tmp_path, build_tokenizer(), tiny_image_processor(cfg))
    _, q, _, _ = load_pretrained_model(tmp_path, device="cpu", load_4bit=True)
    names = {n for n, m in q.named_modules() if isinstance(m, Linear4bit)}
    assert any(".self_attn.q_proj" in n and n.startswith("language_model.layers") for n in names)
    assert not any(n.startswith(("vision_tower", "multi_modal_projector")) or "lm_head" in n for n in names)
    assert all(not isinstance(m, nn.Linear) for n, m in q.named_modules() if n.startswith("language_model.layers"))
    got = _logits(q)
    want = _logits(_dequantized_copy(q))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    _, full, _, _ = load_pretrained_model(tmp_path, device="cpu")
    assert (got - _logits(full)).abs().max() > 1e-4  # 4-bit actually changed the weights


def test_bitsandbytes_checkpoint_loads_without_bitsandbytes(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    # widths that are multiples of the 64-wide quantization block: bitsandbytes' CPU matmul needs that
    vision = transformers.CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    )
    text = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=512,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.LlavaForConditionalGeneration(
        transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=4)
    )
    hf.save_pretrained(tmp_path / "fp")
    build_tokenizer().save_pretrained(str(tmp_path / "fp"))
    tiny_image_processor(tiny_config("llama")).save_pretrained(tmp_path / "fp")
    bnb_cfg = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
        llm_int8_skip_modules=["multi_modal_projector", "lm_head"],
    )
    q = transformers.LlavaForConditionalGeneration.from_pretrained(
        tmp_path / "fp", quantization_config=bnb_cfg, device_map="cpu"
    ).eval()
    q.save_pretrained(tmp_path / "q4")
    for f in (tmp_path / "fp").glob("*.json"):
        if f.name not in ("config.json",):
            (tmp_path / "q4" / f.name).write_bytes(f.read_bytes())
    # the oracle: transformers' fp32 model with every quantized weight replaced by bitsandbytes' own
    # dequantization of it (bnb's CPU 4-bit matmul itself computes in reduced precision on some CPUs)
    import bitsandbytes.functional as bnb_f

    with torch.no_grad():
        for name, module in q.named_modules():
            if type(module).__name__ == "Linear4bit":
                w = bnb_f.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
                hf.get_submodule(name).weight.copy_(w)
    ids = torch.tensor([[1, 20] + [4] * 16 + [30, 31, 32, 33]])
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf.eval()(input_ids=ids, pixel_values=pixels).logits[0]
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now fails
    _, ours, _, _ = load_pretrained_model(tmp_path / "q4", device="cpu")
    assert sum(isinstance(m, Linear4bit) for m in ours.modules()) >= 14
    with torch.no_grad():
        got = ours(ids, images=pixels).logits[0]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
