"""Atomic training checkpoints and exact resume.

A checkpoint ``<output_dir>/checkpoint-<step>/`` holds everything a resumed run needs to continue as if never
stopped: the trainable weights (``trainable.safetensors``; frozen weights are rebuilt from the same
``--model_name_or_path``), the optimizer and scheduler states, every RNG (python, numpy, torch, CUDA), the
sampler position (epoch, step in epoch; the sampler's plan is a pure function of seed and epoch) and the log
history. It is written into ``checkpoint-<step>.tmp`` and renamed into place only when complete, so a run
killed mid-save leaves the previous checkpoint intact and never a half one that looks whole.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STATE_FILE = "trainer_state.json"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    out_dir: Path,
    step: int,
    trainable: dict[str, torch.Tensor],
    optimizer_state: dict,
    scheduler_state: dict,
    trainer_state: dict,
    rank: int = 0,
    save_total_limit: int | None = None,
    extra_rank_state: dict | None = None,
) -> Path:
    """Write ``checkpoint-<step>`` atomically (rank 0 writes model/optimizer; every rank its RNG state).

    Call on every rank (collective-free: ranks write separate files into the same temp dir); rank 0 renames
    after a barrier when distributed. Returns the final path.
    """
    final = out_dir / f"checkpoint-{step}"
    tmp = out_dir / f"checkpoint-{step}.tmp"
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier()
    torch.save({"rng": rng_state(), **(extra_rank_state or {})}, tmp / f"rng_state_{rank}.pth")
    if rank == 0:
        save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler_state, tmp / "scheduler.pt")
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=1))
    _barrier()
    if rank == 0:
        for f in tmp.iterdir():  # make the files durable before the rename publishes them
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if save_total_limit:
            for old in list_checkpoints(out_dir)[:-save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints (no ``.tmp``), oldest first."""
    if not out_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out_dir.iterdir() if (m := re.fullmatch(r"checkpoint-(\d+)", p.name))]
    return [p for _, p in sorted(found)]


def resolve_resume(out_dir: Path, resume: str | None) -> Path | None:
    """``--resume_from_checkpoint``: a path, or ``True`` for the latest complete one in ``out_dir``."""
    if not resume or resume.lower() in ("false", "none", "no"):
        return None
    if resume.lower() == "true":
        ckpts = list_checkpoints(out_dir)
        return ckpts[-1] if ckpts else None
    p = Path(resume)
    if not (p / STATE_FILE).is_file():
        raise SystemExit(f"--resume_from_checkpoint {resume}: not a complete checkpoint (no {STATE_FILE})")
    return p


def load_checkpoint(path: Path, rank: int = 0) -> dict:
    """Everything ``save_checkpoint`` wrote: trainable, optimizer, scheduler, trainer_state, rank_state."""
    rank_file = path / f"rng_state_{rank}.pth"
    if not rank_file.is_file():
        rank_file = path / "rng_state_0.pth"
    return {
        "trainable": load_file(str(path / "trainable.safetensors")),
        "optimizer": torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False),
        "scheduler": torch.load(path / "scheduler.pt", map_location="cpu", weights_only=False),
        "trainer_state": json.loads((path / STATE_FILE).read_text()),
        "rank_state": torch.load(rank_file, map_location="cpu", weights_only=False),
    }


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
