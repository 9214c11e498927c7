"""Loading one tensor-parallel rank's part of a checkpoint: only its slices are read from disk.

``load_pretrained_model`` takes a ``RankShard`` for a rank: ``read`` replaces its whole-file reads (safetensors
``safe_open(...).get_slice(...)`` reads just the rank's rows or columns of each sharded tensor; the follower
ranks skip the vision tower and projector, which rank 0 alone runs), and ``apply`` swaps the meta-device
model's modules for the shard's before the slices are assigned. Key names go through the same per-layout
maps as a whole load (llava-hf, either layout, and original LLaVA).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from fastllava.config import LlavaConfig
from fastllava.distributed.sharding import ShardLayout, shard_model_
from fastllava.model import checkpoint as ckpt
from fastllava.model import weights


@dataclass(frozen=True)
class RankShard:
    """Rank ``rank`` of a tensor-parallel group of ``world`` ranks, as the loader sees it."""

    rank: int
    world: int

    @property
    def keep_vision(self) -> bool:
        return self.rank == 0  # rank 0 encodes images and sends the features with each step

    def layout(self, config: LlavaConfig) -> ShardLayout:
        return ShardLayout.for_config(config.text, self.rank, self.world)

    def wanted(self, name: str) -> bool:
        return self.keep_vision or name.startswith("language_model.")

    def apply(self, model, config: LlavaConfig) -> None:
        """Swap a meta-device ``LlavaModel``'s modules for this rank's shards."""
        shard_model_(model, self.layout(config), keep_vision=self.keep_vision)

    def read(
        self, path: str | Path, allow_pickle: bool | None, config: LlavaConfig, *layouts
    ) -> dict[str, torch.Tensor]:
        """This rank's tensors of the checkpoint folder ``path`` under our names (``read_state`` for one rank):
        keys from the safetensors headers, then only the rank's slice of each tensor from disk."""
        where = weights.key_map(ckpt.checkpoint_keys(path, allow_pickle), *layouts)
        by_file: dict[Path, list[tuple[str, str]]] = {}
        for name, (file, key) in where.items():
            if self.wanted(name):
                by_file.setdefault(file, []).append((name, key))
        layout = self.layout(config)
        out: dict[str, torch.Tensor] = {}
        for file, names in by_file.items():
            if file.suffix == ".safetensors":
                with safe_open(str(file), framework="pt") as handle:
                    for name, key in names:
                        part = layout.slice(name)
                        out[name] = handle.get_tensor(key) if part is None else part.take(handle.get_slice(key))
                continue
            if not ckpt.pickle_allowed(allow_pickle):
                raise ckpt.CheckpointError(f"refusing to unpickle {file} without allow_pickle=True")
            whole = torch.load(file, map_location="cpu", weights_only=True, mmap=True)  # maps, reads on touch
            for name, key in names:
                part = layout.slice(name)
                out[name] = whole[key] if part is None else part.take(whole[key]).clone()
        return out
