"""Shared test setup.

Triton picks the CPU interpreter when a kernel is *defined*, so without a GPU `TRITON_INTERPRET=1` must be set
before anything imports triton; conftest runs before every test module, which makes this the one place.
(CI also exports it.) Helpers for kernel tests live in `kernel_testing.py` beside this file.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # make `kernel_testing` importable
# An uninstalled checkout (the GPU machine has no registry to `pip install -e .` from): `--import-mode=importlib`
# (pyproject's addopts) does not put the repository root on sys.path. Appended, so an install keeps priority.
# Subprocesses the tests start (CLI, servers, compile checks) inherit it through PYTHONPATH.
if importlib.util.find_spec("fastllava") is None:
    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.append(_root)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), _root) if p)

import pytest  # noqa: E402

from fastllava.kernels import set_kernels  # noqa: E402


@pytest.fixture
def triton_kernels(monkeypatch):
    """Force the Triton path, and fill every `torch.empty` output with NaN so an unwritten element fails."""
    previous = set_kernels("triton")
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))
    yield
    set_kernels(previous)
