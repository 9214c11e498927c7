"""pytest glue for `pytest bench`: options, collection of ``bench_*.py``, the ``bench`` fixture, the summary.

    pytest bench                                   # run, gate, append to bench/results/results.jsonl
    pytest bench --bench-out DIR                   # results to DIR/results.jsonl
    pytest bench --update-baselines                # re-baseline bench/baselines/<device_kind>.json from this run
    pytest bench --benchmark-json=out.json         # pytest-benchmark's own JSON as well
    pytest bench --bench-device=cpu --bench-compile=on --bench-strict

See bench/README.md and the docstring of bench/harness.py.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

# `bench` is a package at the repository root, not an installed one: make `from bench.harness import ...` work
# under `--import-mode=importlib` (pyproject's addopts), and `fastllava` from an uninstalled checkout (the GPU
# machine has no registry to `pip install -e .` from). Appended, so installed distributions keep priority.
_ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("bench") is None or importlib.util.find_spec("fastllava") is None:
    sys.path.append(str(_ROOT))

from bench.harness import BenchFixture, BenchSession  # noqa: E402

_SESSION = pytest.StashKey[BenchSession]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fastllava-bench")
    group.addoption("--bench-out", default=None, help="folder for results.jsonl (default bench/results)")
    group.addoption(
        "--update-baselines",
        action="store_true",
        default=False,
        help="write this run's ratios to bench/baselines/<device_kind>.json (never gated against them)",
    )
    group.addoption("--bench-device", default="auto", choices=("auto", "cpu", "cuda"), help="where to run")
    group.addoption(
        "--bench-compile",
        default="auto",
        choices=("auto", "on", "off"),
        help="torch.compile baselines (auto: on for CUDA, off for CPU)",
    )
    group.addoption("--bench-strict", action="store_true", default=False, help="re-raise baseline errors")


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    # Benchmarks are `bench_*.py` (not `test_*.py`) so `pytest tests` never picks them up; collect them here.
    # An explicitly named file is already collected by pytest's own python plugin.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def _opt(config: pytest.Config, name: str, default):
    # Options exist only when this conftest is an initial one (`pytest bench ...`); default otherwise.
    return config.getoption(name, default=default)


def get_session(config: pytest.Config) -> BenchSession:
    if _SESSION not in config.stash:
        choice = _opt(config, "bench_device", "auto")
        if choice == "auto":
            choice = "cuda" if torch.cuda.is_available() else "cpu"
        compile_opt = _opt(config, "bench_compile", "auto")
        out = _opt(config, "bench_out", None)
        config.stash[_SESSION] = BenchSession(
            device=torch.device(choice),
            out_dir=Path(out) if out else _ROOT / "bench" / "results",
            compile_baselines=None if compile_opt == "auto" else compile_opt == "on",
            update=_opt(config, "update_baselines", False),
            strict=_opt(config, "bench_strict", False),
        )
    return config.stash[_SESSION]


@pytest.fixture(scope="session")
def bench_session(request: pytest.FixtureRequest) -> BenchSession:
    return get_session(request.config)


@pytest.fixture
def bench(bench_session: BenchSession, benchmark) -> BenchFixture:
    """``bench.run(case)`` measures, records and gates one Case; ``bench.session`` has device, dtype, helpers."""
    return BenchFixture(bench_session, benchmark)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    bs = session.config.stash.get(_SESSION, None)
    if bs is not None and bs.update and bs.records:
        for kind, path in bs.write_baselines().items():
            print(f"\nbench: baselines for {kind} written to {path}")


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    bs = config.stash.get(_SESSION, None)
    if bs is None or not bs.records:
        return
    tr = terminalreporter
    ops = [r for r in bs.records if r["kind"] == "op"]
    tr.section(f"fastllava bench: {bs.name} ({bs.kind}), results in {bs.results_path}")
    tr.write_line(f"{'benchmark':28} {'ours ms':>9} {'peak MiB':>9}  speedup vs baselines; gates")
    for r in ops:
        ratios = " ".join(f"{k}={v:.2f}x" for k, v in r["ratios"].items())
        status = [o["status"] for o in r["gates"] + r["stored"]]
        gates = f"{status.count('pass')} pass, {status.count('fail')} fail, {status.count('skip')} skip"
        mem = r["peak_mem_bytes"] / 2**20
        tr.write_line(f"{r['key']:28} {r['median_ms']:9.4f} {mem:9.1f}  {ratios}; {gates}")
        for name, err in r["errors"].items():
            tr.write_line(f"    BASELINE ERROR {name}: {err[:200]}")
        for f in r["failures"]:
            tr.write_line(f"    FAIL {f['gate']}: {f['message']}")
    if bs.update:
        tr.write_line(f"baselines updated for {bs.kind} (bench/baselines/{bs.kind}.json)")
