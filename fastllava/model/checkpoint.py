"""Reading weights: safetensors (single file or sharded with an index), pickles only when opted in, and the
key maps from every LLaVA layout onto fastllava's module names.

Layouts mapped here (fastllava name on the right):
  llava-hf legacy (< 4.52, and what transformers 5 writes):
      language_model.model.X -> language_model.X;  language_model.lm_head.X -> language_model.lm_head.X
  llava-hf >= 4.52:
      model.language_model.X -> language_model.X;  lm_head.X -> language_model.lm_head.X
      model.vision_tower.X -> vision_tower.X;  model.multi_modal_projector.X -> multi_modal_projector.X
  both:  vision_tower.vision_model.X -> vision_tower.X
  original LLaVA (llava_llama, llava_mistral):
      model.layers / embed_tokens / norm -> language_model.*;  model.image_newline -> image_newline
      model.mm_projector.{0,2,..} -> multi_modal_projector.linear_{1,2,..}
  a CLIP / SigLIP folder (mm_vision_tower):  vision_model.X -> vision_tower.X
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded as asked (missing files, pickles without opt-in, bad keys)."""


def pickle_allowed(allow_pickle: bool | None) -> bool:
    if allow_pickle is not None:
        return allow_pickle
    return os.environ.get("FASTLLAVA_ALLOW_PICKLE", "0") == "1"


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


# ------------------------------------------------------------------------------------- key maps

_DROP = re.compile(r"(rotary_emb\.inv_freq$|\.head\.|vision_tower\.vision_model\.head\.|position_ids$)")


def hf_to_fastllava(key: str) -> str | None:
    """Map a llava-hf key (either layout) to fastllava's name; None for keys to drop."""
    if _DROP.search(key):
        return None
    for prefix in (
        "model.language_model.",
        "model.vision_tower.",
        "model.multi_modal_projector.",
        "model.image_newline",
    ):
        if key.startswith(prefix):
            key = key[len("model.") :]
            break
    if key.startswith("language_model.model."):
        key = "language_model." + key[len("language_model.model.") :]
    elif key.startswith("lm_head."):
        key = "language_model." + key
    key = key.replace("vision_tower.vision_model.", "vision_tower.")
    return key


def llava_to_fastllava(key: str) -> str | None:
    """Map an original-LLaVA key (``LlavaLlamaForCausalLM`` state dict) to fastllava's name."""
    if _DROP.search(key):
        return None
    m = re.match(r"model\.mm_projector\.(?:(\d+)\.)?(weight|bias)$", key)
    if m:
        idx = int(m.group(1)) // 2 + 1 if m.group(1) is not None else 1
        return f"multi_modal_projector.linear_{idx}.{m.group(2)}"
    if key.startswith("model.vision_tower."):
        # LLaVA nests HF's CLIPVisionModel: model.vision_tower.vision_tower.vision_model.X
        rest = key.split("vision_model.", 1)
        return "vision_tower." + rest[1] if len(rest) == 2 else None
    if key == "model.image_newline":
        return "image_newline"
    if key.startswith("model."):
        return "language_model." + key[len("model.") :]
    if key.startswith("lm_head."):
        return "language_model." + key
    return key


def vision_to_fastllava(key: str) -> str | None:
    """Map a CLIP/SigLIP checkpoint key (``CLIPVisionModel`` or full ``CLIPModel``) to ``vision_tower.*``.

    Accepts ``vision_model.X`` (checkpoints on disk) and bare ``X`` (transformers 5's in-memory names)."""
    if _DROP.search(key):
        return None
    if key.startswith("vision_model."):
        return "vision_tower." + key[len("vision_model.") :]
    if key.split(".", 1)[0] in ("embeddings", "encoder", "pre_layrnorm", "post_layernorm"):
        return "vision_tower." + key
    return None


def remap(state: dict[str, torch.Tensor], fn) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        new = fn(k)
        if new is not None:
            out[new] = v
    return out
