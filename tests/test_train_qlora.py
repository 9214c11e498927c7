"""QLoRA in training: peft LoRA adapters on the NF4 base built by `train.modeling` (`--bits 4 --lora_enable`).

Checks what QLoRA means: only the adapters (and what is left unfrozen) learn, the packed 4-bit weights never
change, and the adapted model's output equals base(x) + (alpha / r) * B(A(x)) computed by hand.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from fastllava.model.builder import quantize_language_model
from fastllava.packing import ImageInput, pack
from fastllava.quantization import Linear4bit
from fastllava.tiny import build_tiny_llava, tiny_config
from fastllava.train.modeling import add_lora


def test_qlora_trains_adapters_on_a_frozen_4bit_base():
    cfg = tiny_config("llama")
    model = build_tiny_llava(cfg, seed=0)
    args = SimpleNamespace(bits=4, lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_bias="none")
    quantize_language_model(model, args.bits)
    for p in model.parameters():
        p.requires_grad_(False)
    add_lora(model, args)
    q_proj = model.language_model.layers[0].self_attn.q_proj
    base = q_proj.get_base_layer()
    assert isinstance(base, Linear4bit)
    packed_before = {n: b.clone() for n, b in model.named_buffers() if b.dtype == torch.uint8}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n, p in model.named_parameters() if p.requires_grad)

    g = torch.Generator().manual_seed(0)
    img = ImageInput(torch.randn(1, 3, 32, 32, generator=g), (32, 32))
    batch = pack([[1, 20, -200, 30, 31, 32]], [[img]], cfg, labels=[[-100, -100, -100, 30, 31, 32]])
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss, n = model.packed_loss(batch)
        (loss / n).backward()
        opt.step()
        losses.append(loss.item() / n)
    assert losses[-1] < losses[0]
    for n, b in model.named_buffers():
        if n in packed_before:
            assert torch.equal(b, packed_before[n]), f"{n}: the 4-bit base changed"
    x = torch.randn(3, base.in_features)
    a, b = q_proj.lora_A["default"].weight, q_proj.lora_B["default"].weight
    want = base(x) + (8 / 4) * (x @ a.T @ b.T)
    torch.testing.assert_close(q_proj(x), want, atol=1e-5, rtol=1e-5)
