"""Where the embedded default model lives.

The trained default (see `train/recipes/default.py`) ships under
`fastllava/assets/llava-tiny-shapes-mistral-instruct/`: the name makes LLaVA's conv-mode guess pick
`mistral_instruct`, the template it was trained with (its language model is a tiny Llama). Without it (a
checkout where it has not been trained yet), a tiny random-weight LLaVA is built locally once and cached under
`$FASTLLAVA_CACHE` (default `~/.cache/fastllava`), so the commands still run end to end, offline.
"""

from __future__ import annotations

import os
from pathlib import Path

from fastllava import envs

ASSET_DIR = Path(__file__).resolve().parent / "assets" / "llava-tiny-shapes-mistral-instruct"


def cache_dir() -> Path:
    return envs.FASTLLAVA_CACHE


def default_model_path() -> Path:
    """A local llava-hf checkpoint folder for the default model (the random fallback if not shipped)."""
    if (ASSET_DIR / "config.json").is_file():
        return ASSET_DIR
    return random_model_path()


def random_model_path() -> Path:
    """A tiny random-weight LLaVA (llava_v1 prompts), built locally on first use and cached: the fallback, and
    the model the serving tests run (it never stops early, so streams and aborts have tokens to work on)."""
    target = cache_dir() / "tiny-llava-random"
    if not (target / "config.json").is_file():
        from fastllava.model.export import save_llava_hf
        from fastllava.tiny import build_tiny_llava, build_tokenizer, tiny_config, tiny_image_processor

        cfg = tiny_config("llama")
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        save_llava_hf(build_tiny_llava(cfg, seed=0), tmp, build_tokenizer(), tiny_image_processor(cfg))
        tmp.replace(target) if not target.exists() else None
    return target
