"""Scale-out and step-health checks of ``train/train.py`` on CPU, with the tiny LLaVA of ``test_train_run``:

* ``--deepspeed train/configs/zero2.json`` / ``zero3.json`` and ``--fsdp full_shard`` (FSDP2 ``fully_shard``),
  each under ``torchrun --nproc_per_node 2`` on gloo (DeepSpeed through its CPU accelerator), give the loss
  curve of the plain 2-process data-parallel run, and their checkpoints / final models hold the same weights;
  ZeRO-3's consolidated weights load in ``load_pretrained_model`` with the same logits;
* ``--on_nonfinite skip`` drops a step whose loss or grad norm is not finite (weights, optimizer and schedule
  unchanged, a warning logged); ``stop`` stops with the step named and a checkpoint that resumes onto the
  curve of a clean run.

Tolerances: all runs here are fp32. The engines compute the same gradients as DDP's all-reduce (all of them
average over ranks; the strategy rescales the loss by the world size) but reduce them in their own buckets /
reduce-scatter order, so results differ only by fp32 summation order: ~1e-7 relative per reduction, a few
1e-7 after 6 Adam steps (measured: 0 for ZeRO-2, 8e-8 for ZeRO-3 and FSDP2). 1e-5 relative is well above that
noise and far below any real error (a dropped micro-batch or a missing 1/world moves the loss by >1e-3).
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_testing import make_work, train_args

from fastllava.train import strategy
from fastllava.train.args import parse_args

REPO = Path(__file__).resolve().parents[1]
# DS_ACCELERATOR=cpu: DeepSpeed's CPU accelerator (it would otherwise probe for CUDA / other devices).
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu"}
ENGINES = {
    "zero2": ("--deepspeed", str(REPO / "train" / "configs" / "zero2.json")),
    "zero3": ("--deepspeed", str(REPO / "train" / "configs" / "zero3.json")),
    "fsdp2": ("--fsdp", "full_shard"),
}
needs_deepspeed = pytest.mark.skipif(not strategy.HAS_DEEPSPEED, reason="deepspeed not installed")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return make_work(tmp_path_factory, "trainpar")


_args = train_args


def _torchrun(work: Path, out: str, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    with socket.socket() as sock:  # a free port (torchrun's --master_port 0 can hang with gloo)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    cmd += [str(REPO / "train" / "train.py"), *_args(work, out, *extra)]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def _history(out: Path) -> list[dict]:
    return sorted(
        (json.loads(x) for x in (out / "log_history.jsonl").read_text().splitlines()), key=lambda r: r["step"]
    )


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in _history(out)]


def _assert_same_weights(a: Path, b: Path, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    """Same weights. ``atol`` 1e-5 (0.5% of lr 2e-3): Adam divides a gradient by its own running RMS, so in an
    embedding row of a token seen once or twice, float reduction-order noise in a near-zero gradient (engines
    sum in different orders) moves the weight by a visible fraction of lr -- measured 4.9e-6 in one of 65,536
    elements; the loss curves and grad norms above are compared at 1e-5 relative."""
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


@pytest.fixture(scope="module")
def ddp_run(work):
    """Plain data parallel over 2 processes (torch DDP): the reference curve."""
    _torchrun(work, "ddp")
    return _losses(work / "ddp")


@pytest.mark.parametrize(
    "engine",
    [pytest.param("zero2", marks=needs_deepspeed), pytest.param("zero3", marks=needs_deepspeed), "fsdp2"],
)
def test_engine_matches_ddp(work, ddp_run, engine):
    """Killed after step 4 (checkpoint-3 on disk), then resumed: the engine's curve across the resume is the
    straight DDP curve, so both the engine's training and its checkpoint (full trainable weights, optimizer
    state: ZeRO partitions per rank / FSDP2's full state) are right."""
    proc = _torchrun(work, engine, *ENGINES[engine], "--halt_after_step", "4", check=False)
    assert proc.returncode != 0 and "halting after step 4" in proc.stdout, proc.stderr[-3000:]
    out = work / engine
    assert [p.name for p in sorted(out.glob("checkpoint-*"))] == ["checkpoint-3"]
    assert not (out / "model.safetensors").exists()
    proc = _torchrun(work, engine, *ENGINES[engine], "--resume_from_checkpoint", "True")
    assert "resumed from" in proc.stderr and "at step 3" in proc.stderr
    losses = _losses(out)
    assert len(losses) == len(ddp_run) == 6 and losses[-1] < losses[0]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ddp_run), rtol=1e-5, atol=0)
    grad_norms = [r["grad_norm"] for r in _history(out)]
    ref_norms = [r["grad_norm"] for r in _history(work / "ddp")]
    torch.testing.assert_close(torch.tensor(grad_norms), torch.tensor(ref_norms), rtol=1e-5, atol=0)
    # the mid-run checkpoint holds the full (unsharded) trainable weights, the final model every weight
    _assert_same_weights(
        work / "ddp" / "checkpoint-3" / "trainable.safetensors", out / "checkpoint-3" / "trainable.safetensors"
    )
    _assert_same_weights(work / "ddp" / "model.safetensors", out / "model.safetensors")
    if engine.startswith("zero"):  # each rank's ZeRO partition of the optimizer state, in its own rank file
        for rank in (0, 1):
            extra = torch.load(out / "checkpoint-3" / f"rng_state_{rank}.pth", weights_only=False)
            assert "zero_optimizer" in extra
    else:  # FSDP2: the full optimizer state, keyed by parameter name
        opt = torch.load(out / "checkpoint-3" / "optimizer.pt", weights_only=False)
        assert "model.language_model.layers.0.self_attn.q_proj.weight" in opt["state"]


@needs_deepspeed
def test_zero3_consolidated_weights_load_with_same_logits(work, ddp_run):
    """ZeRO-3 trains on partitioned parameters; its final model is DeepSpeed's consolidated state dict. It loads
    in ``load_pretrained_model`` and gives the logits of the unpartitioned (DDP) model trained on the same data."""
    from fastllava import load_pretrained_model

    if not (work / "zero3" / "model.safetensors").is_file():
        _torchrun(work, "zero3", *ENGINES["zero3"])
    tok, ref, _, _ = load_pretrained_model(str(work / "ddp"), device="cpu", dtype=torch.float32)
    _, z3, _, _ = load_pretrained_model(str(work / "zero3"), device="cpu", dtype=torch.float32)
    n = ref.config.tokens_per_tile
    ids = torch.tensor([[1] + tok("USER:").input_ids[1:] + [ref.config.image_token_index] * n + [5, 6, 7]])
    pixels = torch.randn(1, 3, ref.config.vision.image_size, ref.config.vision.image_size)
    with torch.no_grad():
        torch.testing.assert_close(z3(ids, images=pixels).logits, ref(ids, images=pixels).logits, rtol=1e-4, atol=1e-4)


def test_deepspeed_config_auto_values_resolved():
    """``"auto"`` is filled from the training arguments as HF's Trainer does; the optimizer is ours."""
    _, _, args = parse_args(
        ["--gradient_accumulation_steps", "4", "--max_grad_norm", "0.5", "--bf16", "True", "--output_dir", "x"]
    )
    for name, stage in (("zero2", 2), ("zero3", 3)):
        cfg = strategy.deepspeed_config(REPO / "train" / "configs" / f"{name}.json", args, 8, 64)
        assert cfg["zero_optimization"]["stage"] == stage
        assert cfg["train_micro_batch_size_per_gpu"] == 1 and cfg["gradient_accumulation_steps"] == 4
        assert cfg["train_batch_size"] == 32 and cfg["gradient_clipping"] == 0.5
        assert cfg["bf16"]["enabled"] is True and cfg["fp16"]["enabled"] is False
        assert "optimizer" not in cfg and "scheduler" not in cfg
        assert "auto" not in json.dumps(cfg)
    zero3 = strategy.deepspeed_config(REPO / "train" / "configs" / "zero3.json", args, 8, 64)["zero_optimization"]
    assert zero3["reduce_bucket_size"] == 64 * 64 and zero3["stage3_param_persistence_threshold"] == 640
    assert zero3["stage3_gather_16bit_weights_on_model_save"] is True


# ------------------------------------------------------------------------------------ non-finite steps


def _poison(monkeypatch, kinds: dict[int, str]) -> None:
    """Make micro-batch forward number ``i`` (1-based; one per step here) non-finite: ``"loss"`` returns NaN
    (so the gradients are NaN too), ``"grad"`` keeps the loss finite and makes its gradient infinite."""
    calls = [0]
    forward = strategy.TrainModule.forward

    def poisoned(self, packed, target_rows, targets):
        calls[0] += 1
        s = forward(self, packed, target_rows, targets)
        kind = kinds.get(calls[0])
        if kind == "loss":
            return s * float("nan")
        if kind == "grad":
            s.register_hook(lambda g: g * float("inf"))
        return s

    monkeypatch.setattr(strategy.TrainModule, "forward", poisoned)


def _main(work: Path, out: str, *extra: str) -> None:
    from fastllava.train import train as train_script

    train_script.main(_args(work, out, "--max_steps", "4", "--save_steps", "1", *extra))


@pytest.fixture(scope="module")
def clean_run(work):
    _main(work, "clean")
    return _losses(work / "clean")


def test_nonfinite_step_is_skipped(work, clean_run, monkeypatch, caplog):
    _poison(monkeypatch, {2: "loss", 3: "grad"})
    with caplog.at_level("WARNING", logger="fastllava.train"):
        _main(work, "skip", "--on_nonfinite", "skip")
    out = work / "skip"
    warnings = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert len(warnings) == 2
    assert warnings[0].startswith("step 2: non-finite loss nan") and "step skipped" in warnings[0]
    assert warnings[1].startswith("step 3: non-finite loss") and "grad norm" in warnings[1]
    assert "step skipped" in warnings[1] and "loss nan" not in warnings[1]  # the loss was finite, the grads not
    hist = _history(out)
    assert [r["step"] for r in hist] == [1, 2, 3, 4]
    assert math.isnan(hist[1]["loss"]) and not math.isfinite(hist[2]["grad_norm"])
    assert hist[0]["loss"] == clean_run[0] and math.isnan(hist[2]["loss"])  # a skipped step adds no loss
    # the skipped steps changed nothing: weights, optimizer moments and schedule as after step 1
    ck = [out / f"checkpoint-{i}" for i in range(1, 5)]
    w = [load_file(str(c / "trainable.safetensors")) for c in ck]
    opt = [torch.load(c / "optimizer.pt", weights_only=False) for c in ck]
    sched = [torch.load(c / "scheduler.pt", weights_only=False) for c in ck]
    for i in (1, 2):
        for k in w[0]:
            assert torch.equal(w[i][k], w[0][k]), k
        assert opt[i]["state"][0]["step"] == opt[0]["state"][0]["step"] == 1
        assert torch.equal(opt[i]["state"][0]["exp_avg"], opt[0]["state"][0]["exp_avg"])
        assert sched[i]["last_epoch"] == sched[0]["last_epoch"] == 1
    assert any(not torch.equal(w[3][k], w[0][k]) for k in w[0])  # step 4 trained
    assert opt[3]["state"][0]["step"] == 2
    assert json.loads((ck[3] / "trainer_state.json").read_text())["nonfinite_skipped"] == 2
    assert (out / "model.safetensors").is_file()


def test_nonfinite_step_stops_and_resumes(work, clean_run, monkeypatch):
    _poison(monkeypatch, {3: "loss"})
    with pytest.raises(SystemExit, match=r"step 3: non-finite loss nan .* stopping \(state saved\)"):
        _main(work, "stop", "--on_nonfinite", "stop")
    out = work / "stop"
    assert not (out / "model.safetensors").exists()
    assert [p.name for p in sorted(out.glob("checkpoint-*"))] == ["checkpoint-1", "checkpoint-2"]
    _assert_same_weights(
        work / "clean" / "checkpoint-2" / "trainable.safetensors", out / "checkpoint-2" / "trainable.safetensors", 0, 0
    )
    monkeypatch.undo()  # the fault is gone: resume from the checkpoint written at the stop
    _main(work, "stop", "--on_nonfinite", "stop", "--resume_from_checkpoint", "True")
    torch.testing.assert_close(torch.tensor(_losses(out)), torch.tensor(clean_run), rtol=0, atol=1e-7)
    _assert_same_weights(work / "clean" / "model.safetensors", out / "model.safetensors", 0, 1e-7)


def test_nonfinite_streak_stops_under_skip(work, monkeypatch):
    """``skip`` gives up after ``--max_nonfinite_steps`` non-finite steps in a row."""
    _poison(monkeypatch, {2: "loss", 3: "loss"})
    with pytest.raises(SystemExit, match=r"step 3: non-finite .* stopping"):
        _main(work, "streak", "--on_nonfinite", "skip", "--max_nonfinite_steps", "2")
    assert (work / "streak" / "checkpoint-2" / "trainer_state.json").is_file()
