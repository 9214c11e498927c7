"""Make delta weights (LLaVA's ``llava/model/make_delta.py``): delta = target - base, the inverse of
``fastllava.model.apply_delta`` (same rules, same file handling; no hub upload: ``--hub-repo-id`` is refused).

    python -m fastllava.model.make_delta --base-model-path llama-7b --target-model-path llava-7b \
        --delta-path llava-7b-delta
"""

from __future__ import annotations

from pathlib import Path

import torch

from fastllava.model.apply_delta import cli, combine, read_checkpoint, write_checkpoint


def make_delta(
    base_model_path: str | Path,
    target_model_path: str | Path,
    delta_path: str | Path,
    hub_repo_id: str | None = None,
    dtype: torch.dtype = torch.float16,
    allow_pickle: bool | None = None,
) -> Path:
    """Write ``target - base`` to ``delta_path`` (LLaVA's function and argument order)."""
    if hub_repo_id is not None:
        raise ValueError("fastllava never uploads to a model hub; push delta_path yourself")
    base = read_checkpoint(base_model_path, allow_pickle)
    target = read_checkpoint(target_model_path, allow_pickle)
    return write_checkpoint(combine(base, target, -1, dtype), target_model_path, delta_path)


def main() -> None:
    a = cli(__doc__.splitlines()[0], ("base-model-path", "target-model-path", "delta-path"))
    dtype = getattr(torch, a.dtype)
    out = make_delta(a.base_model_path, a.target_model_path, a.delta_path, None, dtype, a.allow_pickle)
    print(f"delta written to {out}")


if __name__ == "__main__":
    main()
