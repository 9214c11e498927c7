"""Helpers shared by the training tests: a tiny synthetic dataset + base model, and the train.py arguments."""

from __future__ import annotations

from pathlib import Path

from fastllava.data.synthetic import generate
from fastllava.train.make_tiny_base import write_base


def make_work(tmp_path_factory, name: str) -> Path:
    """48 synthetic training samples and a tiny random LM + CLIP tower to start from."""
    w = tmp_path_factory.mktemp(name)
    generate(w / "data", seed=1, n_train=48, n_eval=8)
    write_base(w / "base", seed=0)
    return w


def train_args(work: Path, out: str, *extra: str) -> list[str]:
    """A 6-step packed run on ``work`` checkpointing every 3 steps; ``extra`` flags go last (they win)."""
    return [
        "--model_name_or_path", str(work / "base" / "lm"),
        "--vision_tower", str(work / "base" / "clip"),
        "--version", "llava_v1",
        "--data_path", str(work / "data" / "train.json"),
        "--image_folder", str(work / "data" / "images"),
        "--mm_vision_select_layer", "-1",
        "--freeze_vision_tower", "False",
        "--packing", "True",
        "--packing_max_tokens", "256",
        "--learning_rate", "2e-3",
        "--max_steps", "6",
        "--logging_steps", "1",
        "--save_strategy", "steps",
        "--save_steps", "3",
        "--disable_tqdm", "True",
        "--attn_implementation", "sdpa",
        "--report_to", "none",
        "--output_dir", str(work / out),
        *extra,
    ]  # fmt: skip
