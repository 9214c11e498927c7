"""The GPU entry points (scripts/gpu_check.sh, bench/run_gpu.sh) parse, find their shared prelude from any working
directory, and refuse clearly without a CUDA device. Their GPU runs themselves need a GPU machine."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = [ROOT / "scripts" / "gpu_check.sh", ROOT / "bench" / "run_gpu.sh"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_gpu_script_usage_and_no_cuda(script, tmp_path):
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    usage = subprocess.run(["bash", str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "usage: bash" in usage.stderr
    if torch.cuda.is_available():
        return
    out = subprocess.run(["bash", str(script), "out"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 3 and "no CUDA device visible to torch" in out.stderr, out.stderr
    assert (tmp_path / "out").is_dir()  # OUTDIR is resolved from the caller's directory
