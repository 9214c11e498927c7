"""The `pytest bench` harness: time a candidate against its baselines in one run, gate, record.

Writing a benchmark (see bench/bench_kernels.py for the real ones)::

    from bench.harness import Case, Gate, Impl, GPU

    def setup_rms_norm(device, dtype):                       # one setup function per benchmark: fresh inputs
        return lambda: {"x": torch.randn(4096, 4096, device=device, dtype=dtype), "weight": ...}

    @pytest.mark.parametrize("mode", ["fwd", "bwd", "fwd_bwd"])
    def test_rms_norm(bench, mode):                          # `bench` fixture: a BenchSession bound to the test
        s = bench.session
        case = Case(
            name="rms_norm", mode=mode,
            setup=setup_rms_norm(s.device, s.dtype),         # called once per implementation
            grad_inputs=("x", "weight"),                     # made leaves with requires_grad in bwd / fwd_bwd
            candidate=Impl("ours", rms_norm),                # called as fn(**inputs)
            baselines=[
                Impl("eager", rms_norm_ref),
                s.compiled("compile", rms_norm_ref),         # torch.compile of the reference (skips on CPU)
                Impl("liger", liger_fn) if HAS_LIGER else Impl.missing("liger", "pip install liger-kernel"),
                s.copy_bound(nbytes),                        # d2d copy of the bytes the op must move
            ],
            gates=[Gate("copy", 0.85, devices=GPU), Gate("eager", 1.1, devices=GPU, modes=("fwd",))],
            shapes={"x": [4096, 4096]}, dtype="bfloat16", bytes_moved=nbytes,
        )
        bench.run(case)   # measures all impls, records one JSONL line, applies the gates, fails/skips the test

What `bench.run` does, in order:

1. builds one zero-argument *step* per implementation for the mode: ``fwd`` = forward under ``no_grad``
   (inference); ``bwd`` = backward only, over one retained graph (``retain_graph=True``), grads reset to None
   before each call; ``fwd_bwd`` = forward + backward of fresh graphs (a training step). Upstream gradients
   are ``randn`` tensors shaped like the floating outputs. ``Impl(raw=True)`` steps are timed as they are.
2. times the steps *interleaved* (``rounds`` rounds, each implementation in turn, order rotated) so a
   machine-wide slowdown hits all of them alike. GPU: CUDA events around each call, L2 flushed (a 256 MiB
   buffer zeroed) before each call, one synchronize per batch -- the method of ``triton.testing.do_bench``.
   CPU: ``time.perf_counter`` around each call, one intra-op thread (``torch.set_num_threads(1)``: on a shared
   2-core machine OpenMP barriers turn other processes' load into order-of-magnitude outliers). The first call
   (compilation, autotuning, graph building) is timed apart (``first_call_s``) and excluded; then warmup, then
   samples. Reported: median, p20, p80 in ms.
3. peak memory of one step, in bytes above what was allocated before it: GPU ``torch.cuda.max_memory_allocated``
   after ``reset_peak_memory_stats``; CPU the running sum of the allocation/free events of
   ``torch.profiler.profile(profile_memory=True)`` (tracemalloc does not see torch's CPU allocator and
   ``ru_maxrss`` cannot be reset, so neither can attribute memory to one call).
4. ratios ``stat(baseline) / stat(candidate)`` (speedup; against the copy bound, the fraction of copy
   bandwidth) with ``stat`` the median on GPU and p20 on CPU (preemption only adds time: the low quantile is
   the op's own cost), the in-run gates (bench/gates.py), the stored-baseline gate against
   ``bench/baselines/<device_kind>.json``. A failed gate is re-measured (``retries``: 1 on GPU, 2 on CPU)
   before it stands: a real regression fails every attempt, a neighbour's burst of load does not.
5. appends one record to ``<bench-out>/results.jsonl`` and fills pytest-benchmark's ``extra_info``; pytest-
   benchmark then times the candidate step (+ synchronize) a few rounds for its own table -- our timing, not
   pytest-benchmark's, is what the gates use. A failed gate fails the test with every number in the message.

Record schema (one JSON object per line, ``"kind": "op"``): ``timestamp, run_id, device, device_kind, versions
{python, torch, triton, transformers, liger_kernel}, commit, dirty, name, mode, key, shapes, dtype, candidate,
median_ms, p20_ms, p80_ms, peak_mem_bytes, impls {name: {median_ms, p20_ms, p80_ms, n, first_call_s,
peak_mem_bytes}}, missing {name: reason}, ratios {name: speedup}, tracked, gates [..], stored [..], tolerance,
timer, memory_method, bytes_moved, gbps, flops, tflops, kernels_mode``. Other benchmarks may append their own kinds
through ``BenchSession.record``; bench/plot.py draws ``"throughput"`` records (``series, concurrency,
tokens_per_s``) and ``"packed_vs_padded"`` records (``label, packed_tokens_per_s, padded_tokens_per_s``).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.gates import (
    ANY_GPU,
    ANYWHERE,
    GPU,
    MODES,
    Gate,
    Outcome,
    Verdict,
    check_gates,
    check_stored,
    default_tolerance,
    load_baselines,
    update_baselines,
)
from bench.timing import TimingConfig, copy_step, make_step, measure, peak_memory, quantile, summarize, sync
from fastllava import envs

__all__ = [
    "ANY_GPU",
    "ANYWHERE",
    "GPU",
    "MODES",
    "BenchFixture",
    "BenchSession",
    "Case",
    "Gate",
    "GateFailure",
    "Impl",
    "TimingConfig",
    "device_kind",
    "make_step",
    "measure",
    "peak_memory",
    "quantile",
    "run_case",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "bench" / "results"


# ------------------------------------------------------------------------------------------------ declarations
@dataclass
class Impl:
    """One implementation: ``fn(**inputs)`` (or ``fn()`` when ``raw``); ``fn=None`` means unavailable here."""

    name: str
    fn: Callable[..., Any] | None
    skip_reason: str = ""
    raw: bool = False  # a zero-argument callable timed as is in every mode (e.g. the copy bound)

    @classmethod
    def missing(cls, name: str, reason: str) -> Impl:
        return cls(name, None, reason)


@dataclass
class Case:
    """One benchmark: an op in one mode, its implementations, gates and the facts recorded with it."""

    name: str
    mode: str  # "fwd" | "bwd" | "fwd_bwd"
    setup: Callable[[], dict[str, Any]]  # fresh inputs, called once per implementation
    candidate: Impl
    baselines: list[Impl]
    grad_inputs: tuple[str, ...] = ()
    gates: list[Gate] = field(default_factory=list)
    shapes: dict[str, Any] = field(default_factory=dict)
    dtype: str = ""
    tolerance: float | None = None  # stored-baseline tolerance; None = the device default (bench/gates.py)
    track: tuple[str, ...] | None = None  # ratios kept in / compared with the stored baseline; None = all
    bytes_moved: int | None = None  # minimum bytes read + written by the op in this mode (reported as GB/s)
    flops: int | None = None  # reported as TFLOP/s

    @property
    def key(self) -> str:
        return f"{self.name}[{self.mode}]"


class GateFailure(AssertionError):
    pass


# --------------------------------------------------------------------------------------------- environment
def device_kind(device: torch.device) -> str:
    """``cpu``, ``h100``, ``h200``, ``a100``, ... (env ``FASTLLAVA_BENCH_DEVICE_KIND`` overrides)."""
    override = envs.FASTLLAVA_BENCH_DEVICE_KIND
    if override:
        return override
    if device.type != "cuda":
        return device.type
    return kind_from_name(torch.cuda.get_device_name(device))


def kind_from_name(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"h100"``; unknown names -> a slug of the whole name."""
    m = re.search(r"\b(GH\d{3}|[A-Z]\d{1,3}[A-Z]?)\b", name)
    if m:
        return m.group(1).lower()
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    return platform.processor() or platform.machine() or "cpu"


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("triton", "transformers", "liger_kernel"):
        try:
            out[dist] = importlib.metadata.version(dist.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    out["cuda"] = torch.version.cuda
    return out


def git_commit() -> tuple[str | None, bool | None]:
    """(HEAD sha, whether the work tree has changes), or (None, None) outside a git checkout."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None, None
    return sha, bool(dirty)


# ------------------------------------------------------------------------------------------------- a run
@dataclass
class BenchSession:
    """Where and how benchmarks run; owns the results file and the stored baselines of this device kind."""

    device: torch.device
    out_dir: Path = DEFAULT_OUT
    cfg: TimingConfig | None = None
    compile_baselines: bool | None = None  # None: on for CUDA, off on CPU (inductor's C++ build is minutes there)
    update: bool = False  # --update-baselines: write bench/baselines/<kind>.json at the end, do not gate on it
    strict: bool = False  # re-raise baseline errors instead of recording them
    baseline_dir: Path | None = None
    records: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        self.out_dir = Path(self.out_dir)
        self.cfg = self.cfg or TimingConfig.for_device(self.device)
        if self.device.type == "cpu" and self.cfg.cpu_threads:
            torch.set_num_threads(self.cfg.cpu_threads)
        if self.compile_baselines is None:
            self.compile_baselines = self.device.type == "cuda"
        self.kind = device_kind(self.device)
        self.name = device_name(self.device)
        self.versions = versions()
        self.commit, self.dirty = git_commit()
        self.run_id = time.strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}"
        self.stored = load_baselines(self.kind, self.baseline_dir)
        self.results_path = self.out_dir / "results.jsonl"

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def dtype(self) -> torch.dtype:
        """bf16 on GPU (the LLaVA training/serving dtype); fp32 on CPU (CPU bf16 timings mean nothing here)."""
        return torch.bfloat16 if self.is_cuda else torch.float32

    # ---- baselines every benchmark may want
    def compiled(self, name: str, fn: Callable[..., Any]) -> Impl:
        """``torch.compile(fn)`` as a baseline, or a skip reason where compile baselines are off."""
        if not self.compile_baselines:
            return Impl.missing(name, f"torch.compile baselines are off on {self.kind} (--bench-compile=on)")
        return Impl(name, torch.compile(fn, dynamic=False))

    def copy_bound(self, nbytes_moved: int, name: str = "copy") -> Impl:
        return Impl(name, copy_step(nbytes_moved, self.device), raw=True)

    @contextlib.contextmanager
    def kernels(self) -> Iterator[str]:
        """Force fastllava's Triton kernels on CUDA (fail loudly rather than time the reference); auto on CPU."""
        import fastllava

        mode = "triton" if self.is_cuda else "auto"
        previous = fastllava.set_kernels(mode)
        try:
            yield mode
        finally:
            fastllava.set_kernels(previous)

    # ---- results
    def record(self, rec: dict[str, Any]) -> dict[str, Any]:
        """Append one record (any ``kind``) to the results file, stamped with the run's environment."""
        full = {
            "kind": rec.get("kind", "op"),
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "run_id": self.run_id,
            "device": self.name,
            "device_kind": self.kind,
            "versions": self.versions,
            "commit": self.commit,
            "dirty": self.dirty,
            **rec,
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.results_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(full) + "\n")
        self.records.append(full)
        return full

    def write_baselines(self) -> dict[str, Path]:
        """Store this run's op records as the baselines of this device kind (``--update-baselines``)."""
        return update_baselines(self.records, self.baseline_dir, only=self.kind)


def run_case(case: Case, session: BenchSession) -> tuple[dict[str, Any], dict[str, Callable[[], Any]]]:
    """Measure ``case`` and gate it; returns (the record written, the steps built). Raises nothing on a gate
    failure: ``record["failures"]`` lists them (``BenchSession``'s pytest fixture turns them into a failed test)."""
    if case.candidate.fn is None:
        raise ValueError(f"{case.key}: the candidate must be available (skip the test instead)")
    missing: dict[str, str] = {}
    errors: dict[str, str] = {}
    steps: dict[str, Callable[[], Any]] = {}
    first: dict[str, float] = {}
    for impl in [case.candidate, *case.baselines]:
        if impl.fn is None:
            missing[impl.name] = impl.skip_reason
            continue
        if impl is case.candidate or session.strict:
            steps[impl.name], first[impl.name] = _build_and_call(impl, case, session)
            continue
        # A baseline that errors (a peer library's API changed, compile failed) must not cost the GPU run the
        # candidate's numbers: record the error, warn, and skip the gates that need it.
        try:
            steps[impl.name], first[impl.name] = _build_and_call(impl, case, session)
        except Exception as e:  # noqa: BLE001 - recorded in the results and shown as a warning
            errors[impl.name] = f"{type(e).__name__}: {e}"
            missing[impl.name] = "error: " + errors[impl.name][:300]
            warnings.warn(f"{case.key}: baseline {impl.name} failed: {errors[impl.name]}", stacklevel=2)

    tolerance = case.tolerance if case.tolerance is not None else default_tolerance(session.kind)
    stat = session.cfg.ratio_stat
    memory = {name: peak_memory(step, session.device) for name, step in steps.items()}
    attempts = 0
    while True:
        attempts += 1
        samples = measure(steps, session.device, session.cfg)
        impls = {
            name: {**summarize(samples[name]), "first_call_s": round(first[name], 4), "peak_mem_bytes": memory[name]}
            for name in steps
        }
        cand = impls[case.candidate.name]
        ratios = {name: impls[name][stat] / cand[stat] for name in impls if name != case.candidate.name}
        verdict = _judge(case, session, ratios, missing, tolerance)
        # A real regression fails every attempt; a neighbour's burst of load on a shared machine does not.
        if not verdict.failures or attempts > session.cfg.retries:
            break
        warnings.warn(f"{case.key}: gate failed on attempt {attempts}, measuring again", stacklevel=2)
    sec = cand["median_ms"] / 1e3
    rec = session.record(
        {
            "kind": "op",
            "name": case.name,
            "mode": case.mode,
            "key": case.key,
            "shapes": case.shapes,
            "dtype": case.dtype,
            "candidate": case.candidate.name,
            "median_ms": cand["median_ms"],
            "p20_ms": cand["p20_ms"],
            "p80_ms": cand["p80_ms"],
            "peak_mem_bytes": cand["peak_mem_bytes"],
            "impls": impls,
            "missing": missing,
            "errors": errors,
            "ratios": ratios,
            "tracked": [r for r in ratios if case.track is None or r in case.track],
            "gates": [o.to_json() for o in verdict.gates],
            "stored": [o.to_json() for o in verdict.stored],
            "failures": [o.to_json() for o in verdict.failures],
            "tolerance": tolerance,
            "ratio_stat": stat,
            "attempts": attempts,
            "timer": "cuda_events+l2_flush" if session.is_cuda else "perf_counter",
            "memory_method": "torch.cuda.max_memory_allocated" if session.is_cuda else "torch.profiler(profile_memory)",
            "bytes_moved": case.bytes_moved,
            "gbps": case.bytes_moved / sec / 1e9 if case.bytes_moved else None,
            "flops": case.flops,
            "tflops": case.flops / sec / 1e12 if case.flops else None,
            "kernels_mode": _kernels_mode(),
        }
    )
    return rec, steps


def _judge(
    case: Case, session: BenchSession, ratios: dict[str, float], missing: dict[str, str], tolerance: float
) -> Verdict:
    verdict = Verdict(gates=check_gates(case.gates, ratios, session.kind, case.mode, case.candidate.name, missing))
    stored = check_stored(
        case.key,
        ratios,
        session.stored.get(case.key),
        shapes=case.shapes,
        dtype=case.dtype,
        tolerance=tolerance,
        track=case.track,
    )
    if session.update:  # deliberately re-baselining: report the comparison, never fail on it
        stored = [Outcome(o.gate, "skip", "--update-baselines: " + o.message, o.ratio, o.target) for o in stored]
    verdict.stored = stored
    return verdict


def _build_and_call(impl: Impl, case: Case, session: BenchSession) -> tuple[Callable[[], Any], float]:
    """The step of ``impl`` and the seconds its build + first call took (compilation, autotuning, graph)."""
    sync(session.device)
    t0 = time.perf_counter()
    step = impl.fn if impl.raw else make_step(impl.fn, case.setup, case.mode, case.grad_inputs)
    step()
    sync(session.device)
    return step, time.perf_counter() - t0


def _kernels_mode() -> str | None:
    import fastllava

    return fastllava.get_kernels()


def format_failure(rec: dict[str, Any]) -> str:
    lines = [f"{rec['key']} on {rec['device_kind']} ({rec['device']}): {len(rec['failures'])} gate(s) failed"]
    lines += [f"  FAIL {f['gate']}: {f['message']}" for f in rec["failures"]]
    lines += [
        f"  {name}: median {m['median_ms']:.4f} ms (p20 {m['p20_ms']:.4f}, p80 {m['p80_ms']:.4f}), "
        f"peak {m['peak_mem_bytes'] / 2**20:.1f} MiB"
        for name, m in rec["impls"].items()
    ]
    return "\n".join(lines)


@dataclass
class BenchFixture:
    """What the ``bench`` fixture gives a test: the session and ``run(case)`` (measure, record, gate)."""

    session: BenchSession
    benchmark: Any = None  # pytest-benchmark's `benchmark` fixture (None outside pytest)

    def run(self, case: Case) -> dict[str, Any]:
        import pytest

        if case.candidate.fn is None:
            pytest.skip(f"{case.key}: {case.candidate.skip_reason}")
        with self.session.kernels():
            rec, steps = run_case(case, self.session)
            if self.benchmark is not None:
                self._pytest_benchmark(rec, steps[case.candidate.name])
        if rec["failures"]:
            raise GateFailure(format_failure(rec))
        return rec

    def _pytest_benchmark(self, rec: dict[str, Any], step: Callable[[], Any]) -> None:
        keep = ("key", "device", "device_kind", "shapes", "dtype", "median_ms", "p20_ms", "p80_ms", "peak_mem_bytes")
        self.benchmark.extra_info.update({k: rec[k] for k in keep})
        self.benchmark.extra_info["ratios"] = {k: round(v, 4) for k, v in rec["ratios"].items()}
        self.benchmark.extra_info["gates"] = {g["gate"]: g["status"] for g in rec["gates"] + rec["stored"]}
        self.benchmark.group = rec["name"]
        device = self.session.device

        def target() -> None:
            step()
            sync(device)

        self.benchmark.pedantic(target, rounds=self.session.cfg.pytest_benchmark_rounds, warmup_rounds=1)
