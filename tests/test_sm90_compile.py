"""Every Triton kernel compiles for sm_90 (H100/H200) and fits its shared memory, checked without a GPU.

The other kernel tests run through Triton's interpreter, which never compiles anything; `sm90_compile.py` (beside
this file) drives Triton's real compiler down to a ptxas cubin through our launchers. It needs its own process:
Triton picks the interpreter when a kernel is defined, and this test process has TRITON_INTERPRET=1.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CASES = ("rms_norm", "rotary", "projector_mlp", "scatter_image_tokens", "flash_attention", "paged_attention", "nf4")


def _has_nvidia_backend() -> bool:
    try:
        return importlib.util.find_spec("triton.backends.nvidia") is not None
    except ModuleNotFoundError:
        return False


pytestmark = pytest.mark.skipif(not _has_nvidia_backend(), reason="triton with its NVIDIA backend is not installed")


def launched_kernels() -> set[str]:
    """Names of the `@triton.jit` functions in kernels/ named `*_kernel` (launched; the other jit functions are
    helpers inlined into them)."""
    names = set()
    for path in (ROOT / "kernels").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel"):
                if any("jit" in ast.unparse(d) for d in node.decorator_list):
                    names.add(node.name)
    return names


def test_every_kernel_compiles_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = str(ROOT / "tests" / "sm90_compile.py")
    # two processes, one per core: the attention kernels (autotuned: most of the compiling) and the rest. The fp32
    # attention configs take ~6 more minutes (fp32 dots are 4x the work); they were checked by hand (`python
    # tests/sm90_compile.py`, Triton 3.9): all fit, the largest at 229,888 of 232,448 bytes of shared memory.
    splits = {
        "attention": ["--cases", "flash_attention", "--exclude", "flash_attention[float32]"],
        "others": ["--cases", *(c for c in CASES if c != "flash_attention")],
    }
    procs = {
        name: subprocess.Popen([sys.executable, script, "--json", str(tmp_path / f"{name}.json"), *extra], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, extra in splits.items()
    }  # fmt: skip
    records = []
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=1500)
        assert proc.returncode == 0, f"{name}:\n{out[-3000:]}{err[-6000:]}"
        report = json.loads((tmp_path / f"{name}.json").read_text())
        assert report["failures"] == []
        records += report["kernels"]
    compiled = {r["kernel"] for r in records}
    assert launched_kernels() <= compiled, f"kernels never compiled: {launched_kernels() - compiled}"
    cases = {r["case"] for r in records}
    assert {f"{c}[{d}]" for c in CASES for d in ("bfloat16", "float16")} <= cases
    assert all(r["cubin_bytes"] > 0 for r in records)  # ptxas ran: a cubin, not just IR
    assert all(0 <= r["shared_bytes"] <= 232448 for r in records if not r["autotuned"])


def test_compile_check_catches_oversized_kernels():
    # a kernel the interpreter runs but an H100 refuses (512 KiB of shared memory) is flagged; a small one compiles
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(ROOT / "tests" / "sm90_compile.py"), "--selftest"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert "selftest: passed" in proc.stdout


def test_launched_kernel_scan_finds_every_op():
    # the coverage assertion above is only as good as this scan
    assert {"_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel", "_flash_attn_fwd_kernel", "_flash_attn_bwd_dq_kernel",
            "_paged_attn_reduce_kernel", "_nf4_gemv_kernel", "_scatter_image_tokens_bwd_kernel",
            "_projector_mlp_fwd_kernel", "_rotary_bwd_kernel"} <= launched_kernels()  # fmt: skip
