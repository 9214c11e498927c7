"""A checkout's root on sys.path (`python -m serve.controller`, `python -m eval.model_vqa`, ... from a checkout, as
LLaVA is used) must not break other libraries: our top-level `kernels/` folder shares its name with HuggingFace's
`kernels` distribution, which transformers imports when it is installed.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _hf_kernels_installed() -> bool:
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _run_from_root(code: str) -> str:
    # `python -c` puts the working directory first on sys.path, as `python -m` does
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip()


def test_transformers_imports_from_the_checkout_root():
    where = _run_from_root(
        "from transformers import LlamaConfig, LlavaConfig\n"
        "import fastllava.kernels, kernels\n"
        "assert hasattr(fastllava.kernels, 'rms_norm')\n"
        "print(kernels.__file__)"
    )
    if _hf_kernels_installed():  # the name is handed over to the installed distribution
        assert not Path(where).resolve().is_relative_to(ROOT), where
    else:  # nothing else claims the name: the folder stays importable as before
        assert Path(where).resolve() == ROOT / "kernels" / "__init__.py"
