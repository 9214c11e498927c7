"""Delta weights (LLaVA's ``llava/model/apply_delta.py``): target = base + delta, tensor by tensor, offline.

    python -m fastllava.model.apply_delta --base-model-path llama-7b --target-model-path llava-7b \
        --delta-path llava-7b-delta

Works on the checkpoint files (safetensors, or pickles with ``--allow-pickle``), never building a model, with
LLaVA's rules: a tensor the base lacks (the projector, the vision tower) is copied from the delta as it is; an
embedding or LM head the delta grew (added tokens) gets the base added to its top-left block; any other shape
mismatch is an error. Sums are done in ``--dtype`` (float16 by default, as LLaVA loads both models). The target
folder gets one ``model.safetensors`` and the delta's config and tokenizer files.

Differences from LLaVA, on purpose: any key missing from the base passes through (LLaVA accepts only
``model.mm_projector.weight`` / ``.bias``, so an ``mlp2x_gelu`` projector fails there); no model hub access.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from fastllava.model import checkpoint as ckpt
from fastllava.model import weights

# rows added for new tokens (LLaVA's <im_*> tokens): the embedding and LM head, under LLaVA's key names
GROWABLE = tuple(weights.LLAVA.to_theirs(f"language_model.{n}.weight") for n in ("embed_tokens", "lm_head"))
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
WEIGHT_INDEXES = (ckpt.SAFE_INDEX, ckpt.BIN_INDEX)


def read_checkpoint(path: str | Path, allow_pickle: bool | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder (sharded or not), by its stored name."""
    return ckpt.read_weights(ckpt.weight_files(Path(path), allow_pickle), allow_pickle)


def combine(
    base: dict[str, torch.Tensor], other: dict[str, torch.Tensor], sign: int, dtype: torch.dtype = torch.float16
) -> dict[str, torch.Tensor]:
    """``other + sign * base`` per tensor of ``other`` (sign +1: apply a delta, -1: make one), in ``dtype``."""
    out = {}
    for name, value in other.items():
        value = value.to(dtype).clone()
        if name not in base:
            out[name] = value  # projector, vision tower, image_newline: not in the language model base
            continue
        b = base[name].to(dtype)
        if value.shape == b.shape:
            value += sign * b
        elif name in GROWABLE and value.dim() == 2 and value.shape[0] >= b.shape[0] and value.shape[1] == b.shape[1]:
            value[: b.shape[0], : b.shape[1]] += sign * b
        else:
            raise ckpt.CheckpointError(f"{name} dimension mismatch: {tuple(value.shape)} vs {tuple(b.shape)}")
        out[name] = value
    return out


def write_checkpoint(state: dict[str, torch.Tensor], src_dir: str | Path, dst_dir: str | Path) -> Path:
    """``dst_dir/model.safetensors`` plus every non-weight file of ``src_dir`` (config, tokenizer, processor)."""
    src, dst = Path(src_dir), Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and f.name not in WEIGHT_INDEXES:
            shutil.copy2(f, dst / f.name)
    save_file({k: v.contiguous() for k, v in state.items()}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def apply_delta(
    base_model_path: str | Path,
    target_model_path: str | Path,
    delta_path: str | Path,
    dtype: torch.dtype = torch.float16,
    allow_pickle: bool | None = None,
) -> Path:
    """Write ``base + delta`` to ``target_model_path`` (LLaVA's function and argument order)."""
    base = read_checkpoint(base_model_path, allow_pickle)
    delta = read_checkpoint(delta_path, allow_pickle)
    return write_checkpoint(combine(base, delta, +1, dtype), delta_path, target_model_path)


def cli(description: str, paths: tuple[str, str, str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    for name in paths:
        p.add_argument(f"--{name}", required=True)
    p.add_argument("--dtype", default="float16", help="the dtype sums are done and saved in (LLaVA's: float16)")
    p.add_argument("--allow-pickle", action="store_true", help="also read pickled .bin weights")
    return p.parse_args()


def main() -> None:
    a = cli(__doc__.splitlines()[0], ("base-model-path", "target-model-path", "delta-path"))
    out = apply_delta(a.base_model_path, a.target_model_path, a.delta_path, getattr(torch, a.dtype), a.allow_pickle)
    print(f"target model written to {out}")


if __name__ == "__main__":
    main()
