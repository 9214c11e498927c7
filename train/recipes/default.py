"""Recipe of the embedded default model: synthetic shapes data -> tiny LLaVA trained by ``train/train.py``.

    python -m train.recipes.default --work /tmp/default-model [--install] [--quick]

Steps: write the synthetic set (``fastllava.data.synthetic``), a tiny plain Llama + tiny CLIP tower
(``train.make_tiny_base``), train one stage with everything unfrozen (tower included: it starts random)
on packed micro-batches with the ``llava_v1`` template, then report held-out exact-match accuracy
(``train.evaluate``). ``--install`` copies the llava-hf checkpoint (and ``eval_result.json``) to
``fastllava/assets/llava-v1-tiny-shapes`` (a name LLaVA's conv-mode guess maps to ``llava_v1``).
``--quick`` is the short CI variant (fewer samples and steps; accuracy well above chance, not 95%).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ASSET = REPO / "fastllava" / "assets" / "llava-v1-tiny-shapes"

# Every train image carries all five question kinds (``turns=5``); an optimizer step sees ~32 images (eight packed
# micro-batches of <= 700 tokens, ~165 tokens a sample: small packs because CPU attention over a packed stream
# costs O(T^2)). Smaller steps (the old recipe: ~6 images, 1,024 tokens) leave the image gradient buried in
# noise: the model stops at the text-only answer prior (chance accuracy).
FULL = {"n_train": 6000, "n_eval": 500, "turns": 5, "epochs": 5, "lr": 1e-3, "budget": 700, "accum": 8}
QUICK = {"n_train": 3000, "n_eval": 200, "turns": 5, "epochs": 4, "lr": 1e-3, "budget": 700, "accum": 8}


def train_command(work: Path, p: dict, extra: list[str] | None = None) -> list[str]:
    """The ``train/train.py`` command line of the recipe."""
    return [
        sys.executable, str(REPO / "train" / "train.py"),
        "--model_name_or_path", str(work / "base" / "lm"),
        "--vision_tower", str(work / "base" / "clip"),
        "--version", "llava_v1",
        "--data_path", str(work / "data" / "train.json"),
        "--image_folder", str(work / "data" / "images"),
        "--mm_vision_select_layer", "-1",
        "--freeze_vision_tower", "False",
        "--packing", "True",
        "--packing_max_tokens", str(p["budget"]),
        "--gradient_accumulation_steps", str(p["accum"]),
        "--model_max_length", "512",
        "--learning_rate", str(p["lr"]),
        "--lr_scheduler_type", "cosine",
        "--warmup_ratio", "0.06",
        "--weight_decay", "0.0",
        "--num_train_epochs", str(p["epochs"]),
        "--logging_steps", "25",
        "--save_strategy", "no",
        "--seed", "0",
        "--disable_tqdm", "True",
        "--output_dir", str(work / "model"),
        *(extra or []),
    ]  # fmt: skip


def run(work: str | Path, quick: bool = False, install: bool = False, extra: list[str] | None = None) -> dict:
    """Run the recipe in ``work``; returns the evaluation result (accuracy, per-kind accuracy)."""
    from fastllava.data.synthetic import generate
    from fastllava.train.make_tiny_base import write_base

    work = Path(work)
    p = QUICK if quick else FULL
    generate(work / "data", seed=0, n_train=p["n_train"], n_eval=p["n_eval"], turns=p["turns"])
    write_base(work / "base", seed=0)
    subprocess.run(train_command(work, p, extra), check=True, cwd=REPO)
    import torch

    from fastllava.model.builder import load_pretrained_model
    from fastllava.train.evaluate import evaluate

    tok, model, proc, _ = load_pretrained_model(str(work / "model"), device="cpu", dtype=torch.float32)
    acc, kinds, n = evaluate(model, tok, proc, work / "data" / "eval.json", work / "data" / "images")
    result = {
        "accuracy": acc,
        "per_kind": kinds,
        "n": n,
        "seed": 0,
        "recipe": "quick" if quick else "full",
        "command": "python -m train.recipes.default --work DIR" + (" --quick" if quick else "") + " --install",
    }
    (work / "model" / "eval_result.json").write_text(json.dumps(result, indent=2))
    if install:
        dest = ASSET
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        for f in (work / "model").iterdir():
            # the checkpoint (llava-hf layout) and its score; not the run's logs (training_args.json holds paths)
            if f.suffix in (".json", ".safetensors") and f.name not in ("training_args.json", "data_report.json"):
                shutil.copy2(f, dest / f.name)
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--install", action="store_true", help="copy the result to " + str(ASSET.relative_to(REPO)))
    a, extra = ap.parse_known_args(argv)
    print(json.dumps(run(a.work, a.quick, a.install, extra), indent=2))


if __name__ == "__main__":
    main()
