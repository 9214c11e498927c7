"""Reading weights: safetensors (single file or sharded with an index), pickles only when opted in, and the list
of a checkpoint's ``(file, key)`` pairs without reading its tensors. The key names of every layout, and how they
map onto fastllava's parameter names, are in ``fastllava.model.weights``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fastllava import envs

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded as asked (missing files, pickles without opt-in, bad keys)."""


def pickle_allowed(allow_pickle: bool | None) -> bool:
    if allow_pickle is not None:
        return allow_pickle
    return envs.FASTLLAVA_ALLOW_PICKLE


def weight_files(path: str | Path, allow_pickle: bool | None = None, stem: str = "model") -> list[Path]:
    """The weight files of a checkpoint folder: safetensors first; ``.bin`` only with ``allow_pickle``."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {path}")
    if (path / SAFE_INDEX).is_file():
        return _from_index(path, SAFE_INDEX)
    single = path / f"{stem}.safetensors"
    if single.is_file():
        return [single]
    shards = sorted(path.glob(f"{stem}-*-of-*.safetensors"))
    if shards:
        return shards
    pickles = [path / BIN_INDEX] if (path / BIN_INDEX).is_file() else sorted(path.glob("pytorch_model*.bin"))
    if pickles:
        if not pickle_allowed(allow_pickle):
            raise CheckpointError(
                f"{path} holds only pickled .bin weights ({pickles[0].name}); pickles can run code when loaded. "
                "Convert them to safetensors, or opt in with allow_pickle=True (FASTLLAVA_ALLOW_PICKLE=1); "
                "they are then read with torch.load(weights_only=True)."
            )
        return _from_index(path, BIN_INDEX) if pickles[0].name == BIN_INDEX else pickles
    raise CheckpointError(f"no weight file in {path} (looked for {stem}.safetensors, sharded safetensors, .bin)")


def _from_index(path: Path, index_name: str) -> list[Path]:
    with open(path / index_name, encoding="utf-8") as f:
        index = json.load(f)
    files = sorted(set(index["weight_map"].values()))
    missing = [f for f in files if not (path / f).is_file()]
    if missing:
        raise CheckpointError(f"{path / index_name} lists shards that are missing: {', '.join(missing)}")
    return [path / f for f in files]


def read_weights(files: list[Path], allow_pickle: bool | None = None) -> dict[str, torch.Tensor]:
    """Load tensors from weight files (CPU)."""
    out: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            out.update(load_file(str(f)))
        else:
            if not pickle_allowed(allow_pickle):
                raise CheckpointError(f"refusing to unpickle {f} without allow_pickle=True")
            out.update(torch.load(f, map_location="cpu", weights_only=True))
    return out


def read_optional(path: Path, stem: str, allow_pickle: bool | None) -> dict[str, torch.Tensor] | None:
    """``stem.safetensors`` or (opted in) ``stem.bin`` from ``path``, or None if neither exists."""
    safe, pickled = path / f"{stem}.safetensors", path / f"{stem}.bin"
    if safe.is_file():
        return load_file(str(safe))
    if pickled.is_file():
        return read_weights([pickled], allow_pickle)
    return None


def checkpoint_keys(path: str | Path, allow_pickle: bool | None = None, stem: str = "model") -> list[tuple[Path, str]]:
    """Every ``(file, key)`` of a checkpoint folder, without reading a tensor: safetensors headers, a pickle index's
    ``weight_map``, or (opted-in pickles without an index) ``torch.load(mmap=True)``, which maps but does not read.
    Map the keys to our names with ``fastllava.model.weights.key_map``."""
    path = Path(path)
    files = weight_files(path, allow_pickle, stem)
    if files[0].suffix != ".safetensors" and (path / BIN_INDEX).is_file():
        with open(path / BIN_INDEX, encoding="utf-8") as f:
            return [(path / file, key) for key, file in json.load(f)["weight_map"].items()]
    pairs = []
    for f in files:
        if f.suffix == ".safetensors":
            with safe_open(str(f), framework="pt") as handle:
                pairs.extend((f, key) for key in handle.keys())
        else:
            pairs.extend((f, key) for key in torch.load(f, map_location="cpu", weights_only=True, mmap=True))
    return pairs
