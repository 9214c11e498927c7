"""Training data: LLaVA-format datasets with per-template label masking, packing, and the synthetic shapes set.

from fastllava.data.dataset import SupervisedDataset, collate
from fastllava.data.sampler import MicroBatchSampler
python -m fastllava.data.synthetic --out DIR --seed 0
path = default_model_path()     # the embedded default model (llava-hf folder)
"""

from __future__ import annotations

import os
from pathlib import Path

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "default-model"


def default_model_path(train_if_missing: bool = True) -> Path:
    """The embedded default model's llava-hf folder.

    The copy shipped under ``fastllava/assets/default-model`` when present; otherwise the one cached under
    ``$FASTLLAVA_CACHE`` (default ``~/.cache/fastllava``), trained there once by the recipe
    (``train.recipes.default``, a few minutes on 2 CPU cores) when ``train_if_missing``.
    """
    if (ASSET_DIR / "config.json").is_file():
        return ASSET_DIR
    cache = Path(os.environ.get("FASTLLAVA_CACHE", Path.home() / ".cache" / "fastllava")) / "default-model"
    model_dir = cache / "model"
    if (model_dir / "config.json").is_file():
        return model_dir
    if not train_if_missing:
        raise FileNotFoundError(f"no default model at {ASSET_DIR} or {model_dir}; run python -m train.recipes.default")
    from fastllava.train.recipes.default import run

    run(cache)
    return model_dir
