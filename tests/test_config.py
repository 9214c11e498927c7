"""Configuration in one place: `fastllava.envs` (every environment variable) and `fastllava.optional` (every
optional dependency), checked against the tree, the README and the values callers see.

    pytest tests/test_config.py
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from fastllava import envs, optional
from fastllava.kernels import envs as kernel_envs

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("fastllava", "kernels", "csrc", "serve", "train", "eval", "bench", "scripts")
ENV_MODULES = {ROOT / "fastllava" / "envs.py", ROOT / "kernels" / "envs.py"}
# a read of the environment that names one of our variables: os.environ.get("FASTLLAVA_X"), os.getenv(...),
# os.environ["FASTLLAVA_X"] (a write such as {**os.environ, "FASTLLAVA_X": token} is not a read)
ENV_READ = re.compile(r"""(environ\.get|getenv|environ\[)\(?\s*["'](FASTLLAVA_\w+|TRITON_INTERPRET)""")


def _source_files() -> list[Path]:
    return [f for d in SOURCE_DIRS for f in sorted((ROOT / d).rglob("*")) if f.suffix in (".py", ".sh")]


def test_every_variable_named_in_the_tree_is_declared():
    named = {m for f in _source_files() for m in re.findall(r"\bFASTLLAVA_[A-Z0-9_]+\b", f.read_text("utf-8"))}
    assert named, "the scan found nothing: the pattern or the folders are wrong"
    assert named - set(envs.VARIABLES) == set(), "declare these in fastllava/envs.py (or kernels/envs.py)"


def test_variables_are_read_only_in_the_env_modules():
    reads = [
        f"{f.relative_to(ROOT)}:{n}: {line.strip()}"
        for f in _source_files()
        if f.suffix == ".py" and f not in ENV_MODULES
        for n, line in enumerate(f.read_text("utf-8").splitlines(), 1)
        if ENV_READ.search(line)
    ]
    assert reads == [], "read these through fastllava.envs (kernels/, csrc/: fastllava.kernels.envs):\n" + "\n".join(
        reads
    )


def test_the_readme_table_is_generated_from_envs():
    readme = (ROOT / "README.md").read_text("utf-8")
    assert envs.readme_table() in readme, "regenerate the README's table: python -m fastllava.envs"
    assert len(envs.readme_table().splitlines()) == len(envs.VARIABLES) + 2
    assert set(kernel_envs.KERNEL_VARIABLES) <= set(envs.VARIABLES)


def test_values_are_read_when_asked_with_defaults_and_parsing(monkeypatch, tmp_path):
    for name in envs.VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert envs.FASTLLAVA_CACHE == Path.home() / ".cache" / "fastllava"
    assert envs.FASTLLAVA_ALLOW_PICKLE is False and envs.FASTLLAVA_NF4_CUDA is True
    assert envs.FASTLLAVA_API_KEYS == [] and envs.FASTLLAVA_WORKER_TOKEN is None
    assert envs.FASTLLAVA_KERNELS == "auto" and envs.FASTLLAVA_LOG_LEVEL == "INFO"
    assert envs.FASTLLAVA_TP_TIMEOUT == 120.0
    monkeypatch.setenv("FASTLLAVA_CACHE", str(tmp_path))
    monkeypatch.setenv("FASTLLAVA_ALLOW_PICKLE", "1")
    monkeypatch.setenv("FASTLLAVA_NF4_CUDA", "0")
    monkeypatch.setenv("FASTLLAVA_API_KEYS", " a, b,,c ")
    monkeypatch.setenv("FASTLLAVA_WORKER_TOKEN", "")  # set but empty: no token, as before
    monkeypatch.setenv("FASTLLAVA_KERNELS", "Torch")
    monkeypatch.setenv("FASTLLAVA_TP_TIMEOUT", "2.5")
    assert envs.FASTLLAVA_CACHE == tmp_path
    assert envs.FASTLLAVA_ALLOW_PICKLE is True and envs.FASTLLAVA_NF4_CUDA is False
    assert envs.FASTLLAVA_API_KEYS == ["a", "b", "c"] and envs.FASTLLAVA_WORKER_TOKEN is None
    assert envs.FASTLLAVA_KERNELS == "torch" and kernel_envs.FASTLLAVA_KERNELS == "torch"
    assert envs.FASTLLAVA_TP_TIMEOUT == 2.5
    with pytest.raises(AttributeError, match="FASTLLAVA_NOPE"):
        envs.FASTLLAVA_NOPE  # noqa: B018


def test_callers_see_the_variables(monkeypatch, tmp_path):
    from fastllava import default_model, utils
    from fastllava.serve.http_app import api_keys_from

    monkeypatch.setenv("FASTLLAVA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FASTLLAVA_LOGDIR", str(tmp_path / "logs"))
    monkeypatch.setenv("FASTLLAVA_API_KEYS", "k1,k2")
    assert default_model.cache_dir() == tmp_path / "cache"
    assert utils.log_dir() == str(tmp_path / "logs")
    assert api_keys_from(["k0"]) == ["k0", "k1", "k2"]
    monkeypatch.setenv("FASTLLAVA_LOGDIR", "")
    assert utils.log_dir() == "."  # LLaVA's LOGDIR


def test_optional_flags_agree_with_the_environment():
    for module in optional.PACKAGES:
        try:
            present = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            present = False
        assert optional.available(module) == present, module
    assert optional.HAS_XFORMERS == optional.available("xformers")
    assert optional.install_hint("flash_attn") == "pip install flash-attn"
    assert optional.install_hint("liger_kernel") == "pip install liger-kernel"
    with pytest.raises(KeyError, match="unknown optional dependency 'nope'"):
        optional.available("nope")


def test_availability_flags_live_in_optional_only():
    """No module computes its own ``HAS_<package> = find_spec(...)`` (kernels/dispatch.py's triton: layering)."""
    allowed = {ROOT / "fastllava" / "optional.py", ROOT / "kernels" / "dispatch.py"}
    bad = [
        f"{f.relative_to(ROOT)}:{n}"
        for f in _source_files()
        if f.suffix == ".py" and f not in allowed and f.parent.name != "tests"
        for n, line in enumerate(f.read_text("utf-8").splitlines(), 1)
        if re.match(r"\s*HAS_\w+\s*=.*find_spec", line)
    ]
    assert bad == [], "use fastllava.optional:\n" + "\n".join(bad)
