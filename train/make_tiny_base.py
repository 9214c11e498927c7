"""Write a tiny plain language model and a tiny CLIP vision tower, the starting point of the embedded default.

    python -m train.make_tiny_base --out /tmp/tiny-base
    # -> /tmp/tiny-base/lm     (LlamaForCausalLM layout: config.json, model.safetensors, tokenizer)
    #    /tmp/tiny-base/clip   (CLIPVisionModel layout: config.json, model.safetensors, preprocessor_config.json)

Both are in the layouts transformers writes, so ``train/train.py --model_name_or_path .../lm --vision_tower
.../clip`` follows the same path as a real Vicuna + CLIP-L start. The language model is random-weight (seeded).
The tower is random too unless ``--pretrain-steps N`` (what the default-model recipe uses): then it is first
trained, as CLIP is before LLaVA ever sees it, to describe each patch of synthetic shapes scenes (shape, colour
and size, or background, and where the patch is: linear heads on the features LLaVA reads,
``hidden_states[-1]``), so that LLaVA's recipe can keep it frozen. Trained jointly from scratch instead, the
2-layer tower learnt colour, size, count and position but not shape in 8,000 steps in most runs; pretrained
without the "where" head, a frozen tower's features hardly carried position (position answers at chance).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from fastllava.config import LlavaConfig, TextConfig, VisionConfig
from fastllava.image_processing import ImageProcessor
from fastllava.model import weights
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
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    return LlavaConfig(vision=vision, text=text, vision_feature_layer=-1, image_token_index=4)


def tokenizer_for_answers(tokenizer):
    """``</s>`` takes the whitespace before it (``lstrip``), so an answer ends in its last word.

    The templates render an answer as `` {answer} </s>`` (LLaVA's llama_2 / mistral_instruct: a space before
    ``sep2``). The byte-level BPE makes that space a token of its own ("Ġ"), so a model trained on it learns
    to say "red", then " ", then stop: every answer ended with a space. With ``lstrip`` the space is part of
    ``</s>``: training targets end "red", "</s>", and LLaVA's round-length masking still counts the same
    number of tokens per round (the space token it expects is the ``</s>`` it does not count)."""
    from tokenizers import AddedToken

    tokenizer.add_special_tokens(
        {"eos_token": AddedToken(tokenizer.eos_token, lstrip=True, rstrip=False, special=True, normalized=False)}
    )
    return tokenizer


def _patch_scenes(n: int, side: int, patch: int, rng: random.Random, processor: ImageProcessor):
    """``n`` scenes (each slot independently empty or holding a random shape) as pixel values, with per-patch
    labels ``[n, P, 3]``: shape, colour, size indices + 1 (0 = background).

    Drawn as the default model's training images are (``synthetic._varied_record``): a fifth on the canonical
    dark background at 48 px, the rest on any of ``BACKGROUNDS`` at 28-288 px, off the patch grid; the
    processor resizes them to ``side``."""
    from fastllava.data import synthetic as S

    grid = side // patch
    colors = list(S.COLORS)
    images, labels = [], []
    for _ in range(n):
        canonical = rng.random() < 0.2
        bg = S.BACKGROUND if canonical else S.BACKGROUNDS[rng.choice(list(S.BACKGROUNDS))]
        drawn = side if canonical else rng.choice((side, rng.randint(28, 288)))
        allowed = S.colors_on(bg)
        items = [
            S.Item(rng.choice(S.SHAPES), rng.choice(allowed), rng.choice(S.SIZES), slot)
            for slot in S.SLOTS
            if rng.random() < 0.5
        ]
        lab = torch.zeros(grid * grid, 3, dtype=torch.long)
        for it in items:
            fx, fy = S.SLOTS[it.slot]
            lab[int(fy * grid) * grid + int(fx * grid)] = torch.tensor(
                [S.SHAPES.index(it.shape) + 1, colors.index(it.color) + 1, S.SIZES.index(it.size) + 1]
            )
        images.append(S.draw_scene(items, drawn, bg, None if canonical else rng))
        labels.append(lab)
    return processor.preprocess(images, return_tensors="pt")["pixel_values"], torch.stack(labels)


def pretrain_tower(model, processor: ImageProcessor, steps: int, seed: int = 0, batch: int = 64, lr: float = 2e-3):
    """Train ``model.vision_tower`` to describe every patch of synthetic scenes (see the module docstring);
    returns the held-out per-patch accuracy of (shape, colour, size, patch position)."""
    from tqdm.auto import tqdm

    cfg = model.config.vision
    rng = random.Random(seed + 2)
    torch.manual_seed(seed + 2)
    pixels, labels = _patch_scenes(4096, cfg.image_size, cfg.patch_size, rng, processor)
    test_px, test_lab = _patch_scenes(512, cfg.image_size, cfg.patch_size, rng, processor)
    tower = model.vision_tower
    n_patches = labels.shape[1]
    heads = torch.nn.ModuleList(torch.nn.Linear(cfg.hidden_size, k) for k in (5, 7, 3, n_patches))
    where = torch.arange(n_patches)  # every patch's own index: the 4th label
    labels = torch.cat([labels, where.expand(labels.shape[0], -1)[..., None]], -1)
    test_lab = torch.cat([test_lab, where.expand(test_lab.shape[0], -1)[..., None]], -1)
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)

    def logits(px):
        feats = tower(px, model.config.vision_feature_layer)[:, 1:]  # patches, as LLaVA reads them
        return [h(feats) for h in heads]

    tower.train()
    for _ in tqdm(range(steps), desc="pretraining the tower", mininterval=5):
        idx = torch.randint(0, pixels.shape[0], (batch,))
        out = logits(pixels[idx])
        loss = sum(F.cross_entropy(o.flatten(0, 1), labels[idx][..., j].flatten()) for j, o in enumerate(out))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
    with torch.no_grad():
        out = logits(test_px)
    return [float((o.argmax(-1) == test_lab[..., j]).float().mean()) for j, o in enumerate(out)]


def write_base(
    out: str | Path, seed: int = 0, image_size: int = 48, patch_size: int = 16, pretrain_steps: int = 0
) -> tuple[Path, Path]:
    """Write ``lm/`` and ``clip/`` under ``out`` (the tower pretrained for ``pretrain_steps``); returns their
    paths."""
    out = Path(out)
    cfg = default_config(image_size, patch_size)
    model = build_tiny_llava(cfg, seed=seed)
    # build_tiny_llava boosts every nn.Embedding 25x (token identity for untrained test models). A model that
    # is trained wants the usual scales: token embeddings at std 0.02 and a near-zero LM head (std 0.0008:
    # uniform logits at the start) -- with the boost, the image pathway trained to 63-82% on a one-shape colour
    # task that these scales learn to 100% in 250 steps -- and CLIP-like tower embeddings (a 25x position
    # embedding would drown the patch content).
    gen = torch.Generator().manual_seed(seed + 1)
    emb = model.vision_tower.embeddings
    with torch.no_grad():
        model.language_model.embed_tokens.weight.div_(25)
        model.language_model.lm_head.weight.div_(25)
        emb.position_embedding.weight.copy_(0.02 * torch.randn(emb.position_embedding.weight.shape, generator=gen))
        emb.patch_embedding.weight.copy_(0.05 * torch.randn(emb.patch_embedding.weight.shape, generator=gen))
    processor = ImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    if pretrain_steps:
        acc = pretrain_tower(model, processor, pretrain_steps, seed)
        print("tower pretrained: per-patch accuracy of shape / colour / size / position", [round(a, 3) for a in acc])
    lm_dir, clip_dir = out / "lm", out / "clip"
    lm_dir.mkdir(parents=True, exist_ok=True)
    clip_dir.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    # the LM in LlamaForCausalLM's names (LLaVA's LM rules), the tower in CLIPVisionModel's; no projector
    lm = weights.to_layout({k: v for k, v in state.items() if k.startswith("language_model.")}, weights.LLAVA)
    tower = weights.to_layout({k: v for k, v in state.items() if k.startswith("vision_tower.")}, weights.VISION)
    save_file(lm, str(lm_dir / "model.safetensors"), metadata={"format": "pt"})
    save_file(tower, str(clip_dir / "model.safetensors"), metadata={"format": "pt"})
    text = {**cfg.text.to_hf_dict(), "architectures": ["LlamaForCausalLM"]}
    (lm_dir / "config.json").write_text(json.dumps(text, indent=2))
    (clip_dir / "config.json").write_text(
        json.dumps({"architectures": ["CLIPVisionModel"], **cfg.vision.to_hf_dict()}, indent=2)
    )
    tokenizer_for_answers(build_tokenizer(vocab_size=cfg.text.vocab_size)).save_pretrained(str(lm_dir))
    processor.save_pretrained(clip_dir)
    return lm_dir, clip_dir


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=48)
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--pretrain-steps", type=int, default=0, help="pretrain the tower on synthetic scenes first")
    a = p.parse_args(argv)
    lm, clip = write_base(a.out, a.seed, a.image_size, a.patch_size, a.pretrain_steps)
    print(f"wrote {lm} and {clip}")


if __name__ == "__main__":
    main()
