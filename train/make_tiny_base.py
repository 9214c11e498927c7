"""Write a tiny plain language model and a tiny CLIP vision tower, the starting point of the embedded default.

    python -m train.make_tiny_base --out /tmp/tiny-base
    # -> /tmp/tiny-base/lm     (LlamaForCausalLM layout: config.json, model.safetensors, tokenizer)
    #    /tmp/tiny-base/clip   (CLIPVisionModel layout: config.json, model.safetensors, preprocessor_config.json)

Both are random-weight (seeded) and in the layouts transformers writes, so ``train/train.py
--model_name_or_path .../lm --vision_tower .../clip`` follows the same path as a real Vicuna + CLIP-L start.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from fastllava.config import LlavaConfig, TextConfig, VisionConfig
from fastllava.image_processing import ImageProcessor
from fastllava.model.export import _text_dict, _vision_dict
from fastllava.tiny import build_tiny_llava, build_tokenizer


def default_config(image_size: int = 48, patch_size: int = 16) -> LlavaConfig:
    """The embedded default's shape: CLIP 2 x 64 (9 patches of a 48 px image), Llama 2 x 128, vocab 512."""
    vision = VisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
    )
    text = TextConfig(
        model_type="llama",
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    return LlavaConfig(vision=vision, text=text, vision_feature_layer=-1, image_token_index=4)


def write_base(out: str | Path, seed: int = 0, image_size: int = 48, patch_size: int = 16) -> tuple[Path, Path]:
    """Write ``lm/`` and ``clip/`` under ``out``; returns their paths."""
    out = Path(out)
    cfg = default_config(image_size, patch_size)
    model = build_tiny_llava(cfg, seed=seed)
    # CLIP-like scales for the tower's embeddings: build_tiny_llava boosts every nn.Embedding 25x (for token
    # identity in the LM), which here would drown the patch content in position noise.
    gen = torch.Generator().manual_seed(seed + 1)
    emb = model.vision_tower.embeddings
    with torch.no_grad():
        emb.position_embedding.weight.copy_(0.02 * torch.randn(emb.position_embedding.weight.shape, generator=gen))
        emb.patch_embedding.weight.copy_(0.05 * torch.randn(emb.patch_embedding.weight.shape, generator=gen))
    lm_dir, clip_dir = out / "lm", out / "clip"
    lm_dir.mkdir(parents=True, exist_ok=True)
    clip_dir.mkdir(parents=True, exist_ok=True)
    lm, tower = {}, {}
    for k, v in model.state_dict().items():
        v = v.detach().contiguous()
        if k.startswith("language_model.lm_head."):
            lm[k[len("language_model.") :]] = v
        elif k.startswith("language_model."):
            lm["model." + k[len("language_model.") :]] = v
        elif k.startswith("vision_tower."):
            tower["vision_model." + k[len("vision_tower.") :]] = v
    save_file(lm, str(lm_dir / "model.safetensors"), metadata={"format": "pt"})
    save_file(tower, str(clip_dir / "model.safetensors"), metadata={"format": "pt"})
    text = {**_text_dict(cfg), "architectures": ["LlamaForCausalLM"]}
    (lm_dir / "config.json").write_text(json.dumps(text, indent=2))
    (clip_dir / "config.json").write_text(
        json.dumps({"architectures": ["CLIPVisionModel"], **_vision_dict(cfg)}, indent=2)
    )
    build_tokenizer(vocab_size=cfg.text.vocab_size).save_pretrained(str(lm_dir))
    ImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(clip_dir)
    return lm_dir, clip_dir


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=48)
    p.add_argument("--patch-size", type=int, default=16)
    a = p.parse_args(argv)
    lm, clip = write_base(a.out, a.seed, a.image_size, a.patch_size)
    print(f"wrote {lm} and {clip}")


if __name__ == "__main__":
    main()
