"""Consolidate a checkpoint (LLaVA's ``llava/model/consolidate.py``): one ``model.safetensors`` in float16 with
the config and tokenizer, from a sharded (or pickled, with ``--allow-pickle``) original-LLaVA checkpoint.

    python -m fastllava.model.consolidate --src llava-7b --dst llava-7b_consolidate

A LLaVA v0 checkpoint (a folder named ``*llava*`` whose config says ``llama``) is upgraded in ``dst`` to
``llava_llama`` / ``LlavaLlamaForCausalLM``, as LLaVA's ``auto_upgrade`` does. Differences from LLaVA, on
purpose: no interactive confirmation and ``src`` is never modified (LLaVA rewrites src's config.json in place);
the upgraded type is ``llava_llama`` (LLaVA's ``auto_upgrade`` still writes v0's ``llava``, which its own loader
no longer recognises and which is transformers' llava-hf type).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from fastllava.model.apply_delta import read_checkpoint, write_checkpoint


def consolidate_ckpt(src_path: str | Path, dst_path: str | Path, allow_pickle: bool | None = None) -> Path:
    src, dst = Path(src_path), Path(dst_path)
    state = read_checkpoint(src, allow_pickle)
    state = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in state.items()}
    write_checkpoint(state, src, dst)
    config = json.loads((dst / "config.json").read_text())
    if "llava" in src.name.lower() and "llava" not in config.get("model_type", ""):
        if config.get("model_type") != "llama":
            raise ValueError(f"cannot upgrade a v0 checkpoint of model_type {config.get('model_type')!r}")
        config["model_type"] = "llava_llama"
        config["architectures"] = ["LlavaLlamaForCausalLM"]
        print("Upgraded the LLaVA v0 config to llava_llama in", dst)
    config["torch_dtype"] = "float16"
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", required=True)
    p.add_argument("--dst", required=True)
    p.add_argument("--allow-pickle", action="store_true", help="also read pickled .bin weights")
    a = p.parse_args()
    print(f"consolidated checkpoint written to {consolidate_ckpt(a.src, a.dst, a.allow_pickle)}")


if __name__ == "__main__":
    main()
