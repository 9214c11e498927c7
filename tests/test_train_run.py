"""End-to-end ``train/train.py`` runs on CPU with a tiny LLaVA built from a plain LM + CLIP folder:

* ``torchrun --nproc_per_node 2`` (gloo) gives the loss curve of one process with 2 accumulation steps;
* a run killed mid-way and resumed gives the loss curve of the run left alone;
* bad data stops the run with the sample named (or is skipped and counted);
* the output loads in ``load_pretrained_model`` and in transformers' ``LlavaForConditionalGeneration`` with the
  same logits; a LoRA run writes a peft adapter that ``python -m train.merge_lora`` merges into the same model.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_testing import make_work, train_args

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return make_work(tmp_path_factory, "trainrun")


_args = train_args


def _train(work, out, *extra, nproc: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    if nproc == 1:
        cmd = [sys.executable, str(REPO / "train" / "train.py")]
    else:
        with socket.socket() as sock:  # a free port (torchrun's --master_port 0 can hang with gloo)
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
        cmd += ["--master_port", str(port), str(REPO / "train" / "train.py")]
    proc = subprocess.run(cmd + _args(work, out, *extra), cwd=REPO, env=ENV, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def _losses(work, out) -> list[float]:
    rows = [json.loads(x) for x in (work / out / "log_history.jsonl").read_text().splitlines()]
    return [r["loss"] for r in sorted(rows, key=lambda r: r["step"])]


@pytest.fixture(scope="module")
def accum_run(work):
    """One process, 2 micro-batches per step: the reference curve."""
    proc = _train(work, "accum", "--gradient_accumulation_steps", "2")
    assert "{'loss': " in proc.stdout  # HF Trainer's log line format
    return _losses(work, "accum")


def test_ddp_two_processes_match_accumulation(work, accum_run):
    _train(work, "ddp", "--gradient_accumulation_steps", "1", nproc=2)
    ddp = _losses(work, "ddp")
    assert len(ddp) == len(accum_run) == 6
    torch.testing.assert_close(torch.tensor(ddp), torch.tensor(accum_run), rtol=1e-5, atol=1e-6)
    assert accum_run[-1] < accum_run[0]


def test_killed_and_resumed_run_matches(work, accum_run):
    proc = _train(work, "resumed", "--gradient_accumulation_steps", "2", "--halt_after_step", "5", check=False)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert not (work / "resumed" / "config.json").exists()  # it died before writing the final model
    assert [p.name for p in sorted((work / "resumed").glob("checkpoint-*"))] == ["checkpoint-3"]
    _train(work, "resumed", "--gradient_accumulation_steps", "2", "--resume_from_checkpoint", "True")
    torch.testing.assert_close(torch.tensor(_losses(work, "resumed")), torch.tensor(accum_run), rtol=0, atol=1e-7)
    assert (work / "resumed" / "loss_curve.png").is_file()


def test_output_loads_in_fastllava_and_transformers(work, accum_run):
    from transformers import LlavaForConditionalGeneration

    from fastllava import load_pretrained_model

    out = work / "accum"
    tok, model, proc, _ = load_pretrained_model(str(out), device="cpu", dtype=torch.float32)
    hf = LlavaForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32).eval()
    n = model.config.tokens_per_tile
    ids = torch.tensor([[1] + tok("USER:").input_ids[1:] + [model.config.image_token_index] * n + [5, 6, 7]])
    pixels = torch.randn(1, 3, model.config.vision.image_size, model.config.vision.image_size)
    with torch.no_grad():
        ours = model(ids, images=pixels).logits
        theirs = hf(input_ids=ids, pixel_values=pixels).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_bad_data_is_named_and_policy_applied(work):
    recs = json.loads((work / "data" / "train.json").read_text())
    recs[5]["image"] = "missing.png"
    bad = work / "data" / "bad.json"
    bad.write_text(json.dumps(recs))
    proc = _train(work, "bad", "--data_path", str(bad), "--max_steps", "1", check=False)
    assert proc.returncode != 0
    assert "train-5" in proc.stderr and "missing_image" in proc.stderr
    _train(work, "bad", "--data_path", str(bad), "--max_steps", "1", "--on_bad_sample", "skip")
    assert json.loads((work / "bad" / "data_report.json").read_text())["bad"] == {"missing_image": 1}


def test_lora_adapter_and_merge(work):
    from safetensors.torch import load_file

    _train(work, "lora", "--lora_enable", "True", "--lora_r", "4", "--lora_alpha", "8", "--max_steps", "2")
    adapter = work / "lora" / "adapter"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4
    keys = load_file(str(adapter / "adapter_model.safetensors")).keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    subprocess.run(
        [sys.executable, "-m", "train.merge_lora", "--adapter", str(adapter), "--out", str(work / "merged")],
        cwd=REPO, env=ENV, check=True, capture_output=True,
    )  # fmt: skip
    a, b = load_file(str(work / "lora" / "model.safetensors")), load_file(str(work / "merged" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    # the LoRA delta is real: the merged LM differs from the base LM
    base = load_file(str(work / "base" / "lm" / "model.safetensors"))
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(base[q], a["language_model." + q])
