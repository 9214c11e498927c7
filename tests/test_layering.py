"""docs/ARCHITECTURE.md's layering rules, checked by walking every import in the tree.

- nothing in `fastllava/` or `kernels/` imports `train`, `serve`, `eval` or `bench` (bare or as `fastllava.*`);
- `kernels/` imports only torch/triton/stdlib and its own `fastllava.kernels.*` modules;
- web frameworks (fastapi, uvicorn, gradio) are imported only under `serve/`;
- no `trust_remote_code=True` anywhere in the library;
- the model package (`fastllava/model/`) imports neither the engine nor `fastllava.generation` (the padded
  `generate` is an adapter over the engine, above the model).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
APPS = ("train", "serve", "eval", "bench")
WEB = ("fastapi", "uvicorn", "gradio", "starlette")


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
    return out


def _files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def _top(mod: str) -> tuple[str, str | None]:
    parts = mod.split(".")
    return parts[0], parts[1] if len(parts) > 1 else None


@pytest.mark.parametrize("folder", ["fastllava", "kernels", "csrc"])
def test_library_never_imports_apps(folder):
    bad = []
    for f in _files(folder):
        for line, mod in _imports(f):
            top, sub = _top(mod)
            if top in APPS or (top == "fastllava" and sub in APPS) or top in WEB:
                bad.append(f"{f.relative_to(ROOT)}:{line} imports {mod}")
    assert not bad, "layering violations:\n" + "\n".join(bad)


def test_kernels_import_only_torch_triton_and_themselves():
    allowed_third_party = {"torch", "triton", "numpy"}
    bad = []
    for f in _files("kernels") + _files("csrc"):
        for line, mod in _imports(f):
            top, sub = _top(mod)
            if top == "fastllava" and sub not in ("kernels", "csrc"):
                bad.append(f"{f.relative_to(ROOT)}:{line} imports {mod}")
            elif top == "kernels" or top == "csrc":
                bad.append(f"{f.relative_to(ROOT)}:{line} imports {mod} bare (use fastllava.{mod})")
            elif top not in allowed_third_party and top != "fastllava" and not _is_stdlib(top):
                bad.append(f"{f.relative_to(ROOT)}:{line} imports {mod}")
    assert not bad, "\n".join(bad)


def test_web_frameworks_only_in_serve():
    bad = []
    for folder in ("fastllava", "kernels", "csrc", "train", "eval"):
        for f in _files(folder):
            bad += [f"{f.relative_to(ROOT)}:{ln} imports {m}" for ln, m in _imports(f) if _top(m)[0] in WEB]
    assert not bad, "\n".join(bad)


def test_no_bare_imports_of_our_generic_names_in_library():
    """Library code reaches our subpackages as `fastllava.kernels` etc., never as bare `kernels`."""
    bad = []
    for f in _files("fastllava") + _files("serve") + _files("train") + _files("eval"):
        for line, mod in _imports(f):
            if _top(mod)[0] in ("kernels", "csrc"):
                bad.append(f"{f.relative_to(ROOT)}:{line} imports {mod}")
    assert not bad, "\n".join(bad)


def test_model_never_imports_the_engine_or_generation():
    bad = []
    for f in _files("fastllava/model"):
        for line, mod in _imports(f):
            if mod == "fastllava.generation" or mod == "fastllava.engine" or mod.startswith("fastllava.engine."):
                bad.append(f"{f.relative_to(ROOT)}:{line} imports {mod}")
    assert not bad, "the model sits below the engine:\n" + "\n".join(bad)
    assert any(_files("fastllava/model")), "the model package moved: point this test at it"


def test_no_trust_remote_code():
    hits = [
        str(f.relative_to(ROOT))
        for folder in ("fastllava", "serve", "train", "eval")
        for f in _files(folder)
        if "trust_remote_code=True" in f.read_text(encoding="utf-8")
    ]
    assert not hits, hits


def _is_stdlib(name: str) -> bool:
    import sys

    return name in sys.stdlib_module_names or name == "__future__"


def test_the_checker_catches_a_violation(tmp_path):
    """The walker must see a forbidden import (guards against a checker that can never fail)."""
    f = tmp_path / "bad.py"
    f.write_text(
        "import os\nfrom fastllava.serve import cli\nimport kernels.rms_norm\n"
        "def generate():\n    from fastllava.generation import generate\n"
    )
    mods = [m for _, m in _imports(f)]
    assert "fastllava.serve" in mods and "kernels.rms_norm" in mods
    assert "fastllava.generation" in mods  # an import inside a function counts too
    assert _top("fastllava.serve") == ("fastllava", "serve")
