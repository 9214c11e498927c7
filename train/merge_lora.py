"""Merge a LoRA run's adapter into its base and write a llava-hf checkpoint.

    python -m train.merge_lora --adapter checkpoints/run/adapter --out checkpoints/run-merged

``--adapter`` is the ``adapter/`` folder a ``--lora_enable True`` run writes (peft's ``adapter_config.json`` +
``adapter_model.safetensors`` under original LLaVA's key names, ``non_lora_trainables.safetensors``,
``base_model.json``). The base is rebuilt exactly as the run built it (same ``--model_name_or_path``,
``--vision_tower``, tokenizer with ``<image>``), the non-LoRA trainables (projector) are loaded over it, and the
adapter is merged through peft (``fastllava.model.builder.merge_lora``). ``--model_base`` overrides the base path.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fastllava.model import checkpoint as ckpt
from fastllava.model import weights
from fastllava.model.builder import merge_lora
from fastllava.train.args import DataArguments, ModelArguments, TrainingArguments
from fastllava.train.modeling import build_model, save_final


def merge(adapter_dir: str | Path, out_dir: str | Path, model_base: str | None = None) -> Path:
    """Rebuild the base, load non-LoRA trainables, merge the adapter, save llava-hf. Returns ``out_dir``."""
    adapter_dir = Path(adapter_dir)
    run = json.loads((adapter_dir / "base_model.json").read_text())
    model_args = ModelArguments(**{**run["model"], "pretrain_mm_mlp_adapter": None})
    if model_base:
        model_args.model_name_or_path = model_base
    data_args = DataArguments(**run["data"])
    train_args = TrainingArguments(**{**run["train"], "lora_enable": False, "bits": 16})
    tokenizer, model, processor = build_model(model_args, data_args, train_args)
    extra = ckpt.read_optional(adapter_dir, "non_lora_trainables", None) or {}
    extra = weights.remap(extra, weights.LORA, weights.LLAVA)
    missing = [k for k in extra if k not in model.state_dict()]
    if missing:
        raise ckpt.CheckpointError(f"non_lora_trainables has weights the base does not: {missing[:4]}")
    model.load_state_dict(extra, strict=False)
    merge_lora(model, adapter_dir)
    return save_final(model.float(), Path(out_dir), tokenizer, processor)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapter", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--model_base", default=None)
    a = p.parse_args(argv)
    print(f"wrote {merge(a.adapter, a.out, a.model_base)}")


if __name__ == "__main__":
    main()
