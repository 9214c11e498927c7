"""Write a tiny plain language model and a tiny CLIP vision tower, the starting point of the embedded default.

    python -m train.make_tiny_base --out /tmp/tiny-base
    # -> /tmp/tiny-base/lm     (LlamaForCausalLM layout: config.json, model.safetensors, tokenizer)
    #    /tmp/tiny-base/clip   (CLIPVisionModel layout: config.json, model.safetensors, preprocessor_config.json)

Both are random-weight (seeded) and in the layouts transformers writes, so ``train/train.py
--model_name_or_path .../lm --vision_tower .../clip`` follows the same path as a real Vicuna + CLIP-L start.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from fastllava.config import LlavaConfig, TextConfig, VisionConfig
from fastllava.image_processing import ImageProcessor
from fastllava.tiny import build_tokenizer


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
    """Write ``lm/`` and ``clip/`` under ``out``; returns their paths.

    The weights are initialised by transformers' own ``LlamaForCausalLM`` / ``CLIPVisionModel`` (``_init_weights``:
    embeddings and linears at ``initializer_range`` 0.02, unit norms, zero biases, CLIP's scaled attention/MLP
    init), i.e. the start a real Vicuna + CLIP pair is trained from. ``fastllava.tiny.build_tiny_llava``'s test
    init (every embedding x25, noisy norms and biases) is *not* used here: with it (and equally with
    transformers' init at the old recipe's ~6-image steps) the model settles on the text-only answer prior and
    never reads the image (held-out accuracy at chance); see ``train/recipes/default.py``.
    """
    import transformers

    out = Path(out)
    cfg = default_config(image_size, patch_size)
    t, v = cfg.text, cfg.vision
    torch.manual_seed(seed)
    lm = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=t.vocab_size,
            hidden_size=t.hidden_size,
            intermediate_size=t.intermediate_size,
            num_hidden_layers=t.num_hidden_layers,
            num_attention_heads=t.num_attention_heads,
            num_key_value_heads=t.num_key_value_heads,
            max_position_embeddings=t.max_position_embeddings,
            rms_norm_eps=t.rms_norm_eps,
            bos_token_id=t.bos_token_id,
            eos_token_id=t.eos_token_id,
            pad_token_id=t.pad_token_id,
            tie_word_embeddings=False,
        )
    )
    tower = transformers.CLIPVisionModel(
        transformers.CLIPVisionConfig(
            hidden_size=v.hidden_size,
            intermediate_size=v.intermediate_size,
            num_hidden_layers=v.num_hidden_layers,
            num_attention_heads=v.num_attention_heads,
            image_size=image_size,
            patch_size=patch_size,
        )
    )
    lm_dir, clip_dir = out / "lm", out / "clip"
    lm.save_pretrained(str(lm_dir), safe_serialization=True)
    tower.save_pretrained(str(clip_dir), safe_serialization=True)
    build_tokenizer(vocab_size=t.vocab_size).save_pretrained(str(lm_dir))
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
