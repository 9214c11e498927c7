"""Where the embedded default model lives.

The trained default (see `train/recipes/`) ships under `fastllava/assets/llava-v1-tiny-shapes/` (the name
makes LLaVA's conv-mode guess pick `llava_v1`, the template it was trained with). Without it (a
checkout where it has not been trained yet), a tiny random-weight LLaVA is built locally once and cached under
`$FASTLLAVA_CACHE` (default `~/.cache/fastllava`), so the commands still run end to end, offline.
"""

from __future__ import annotations

import os
from pathlib import Path

ASSET_DIR = Path(__file__).resolve().parent / "assets" / "llava-v1-tiny-shapes"


def cache_dir() -> Path:
    return Path(os.environ.get("FASTLLAVA_CACHE", Path.home() / ".cache" / "fastllava"))


def default_model_path() -> Path:
    """A local llava-hf checkpoint folder for the default model (built on first use if not shipped)."""
    if (ASSET_DIR / "config.json").is_file():
        return ASSET_DIR
    target = cache_dir() / "tiny-llava-random"
    if not (target / "config.json").is_file():
        from fastllava.model.export import save_llava_hf
        from fastllava.tiny import build_tiny_llava, build_tokenizer, tiny_config, tiny_image_processor

        cfg = tiny_config("llama")
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        save_llava_hf(build_tiny_llava(cfg, seed=0), tmp, build_tokenizer(), tiny_image_processor(cfg))
        tmp.replace(target) if not target.exists() else None
    return target
