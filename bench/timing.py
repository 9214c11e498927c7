"""Timing and memory for `pytest bench`: mode steps, interleaved CUDA-event / perf_counter timing, peak memory.

The method is described in bench/harness.py's docstring (steps 1-3); `run_case` there is the only caller.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from bench.gates import MODES


@dataclass
class TimingConfig:
    warmup_ms: float = 25.0
    rep_ms: float = 100.0  # per implementation, split over `rounds`
    rounds: int = 3
    min_reps: int = 5  # per round
    max_reps: int = 500  # per round
    flush_l2: bool = True  # GPU only
    pytest_benchmark_rounds: int = 10
    cpu_threads: int | None = None  # torch.set_num_threads for CPU runs (None: leave torch's default)
    ratio_stat: str = "median_ms"  # the statistic ratios (and so gates) are computed from
    retries: int = 0  # re-measurements after a failed gate before the failure stands

    @classmethod
    def for_device(cls, device: torch.device) -> TimingConfig:
        if device.type == "cuda":
            return cls(retries=1)
        # One intra-op thread: on a shared 2-core machine OpenMP barriers turn other processes' load into
        # ~10x outliers (measured: a 2 MB RMSNorm backward went from ~10 ms to ~170 ms under load 7).
        # Ratios from p20: preemption by other processes only ever adds time, so the low quantile estimates the
        # op's own cost while the median measures the neighbours. Two re-measurements before a gate fails.
        return cls(warmup_ms=10.0, rep_ms=150.0, flush_l2=False, cpu_threads=1, ratio_stat="p20_ms", retries=2)


# ---------------------------------------------------------------------------------------------------- steps
def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


def _grad_outputs(out: Any) -> list[torch.Tensor]:
    return [t for t in _tensors(out) if t.requires_grad]


def make_step(
    fn: Callable[..., Any], setup: Callable[[], dict[str, Any]], mode: str, grad_inputs: tuple[str, ...] = ()
) -> Callable[[], Any]:
    """A zero-argument callable running ``fn`` on fresh inputs in ``mode`` (see the module docstring)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: expected one of {MODES}")
    inputs = setup()
    if mode == "fwd":

        def fwd() -> Any:
            with torch.no_grad():
                return fn(**inputs)

        return fwd

    leaves = [inputs[n] for n in grad_inputs]
    if not leaves:
        raise ValueError(f"mode {mode!r} needs grad_inputs")
    for t in leaves:
        t.requires_grad_(True)
    outs = _grad_outputs(fn(**inputs))
    if not outs:
        raise ValueError("no output requires grad: check grad_inputs")
    grads = [torch.randn_like(o) for o in outs]  # upstream gradients, one per floating output

    def clear() -> None:
        for t in leaves:
            t.grad = None

    if mode == "bwd":
        graph = outs  # one forward graph, kept and reused by every backward call

        def bwd() -> None:
            clear()
            torch.autograd.backward(graph, grads, retain_graph=True)

        return bwd

    del outs  # fwd_bwd builds a fresh graph per call; drop the first one

    def fwd_bwd() -> None:
        clear()
        torch.autograd.backward(_grad_outputs(fn(**inputs)), grads)

    return fwd_bwd


def copy_step(nbytes_moved: int, device: torch.device) -> Callable[[], Any]:
    """A device-to-device copy that reads and writes ``nbytes_moved / 2`` bytes each: the bandwidth bound."""
    n = max(1, nbytes_moved // 2)
    src = torch.empty(n, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


# --------------------------------------------------------------------------------------------------- timing
def summarize(samples_ms: list[float]) -> dict[str, float | int]:
    return {
        "median_ms": quantile(samples_ms, 0.5),
        "p20_ms": quantile(samples_ms, 0.2),
        "p80_ms": quantile(samples_ms, 0.8),
        "n": len(samples_ms),
    }


def quantile(xs: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default)."""
    s = sorted(xs)
    pos = (len(s) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Timer:
    def __init__(self, device: torch.device, flush_l2: bool):
        self.device = device
        self.cuda = device.type == "cuda"
        # Larger than the L2 of any current GPU (H100/H200: 50 MiB), so each call starts cold, as in a model.
        self.flush_buf = torch.empty(256 << 20, dtype=torch.int8, device=device) if self.cuda and flush_l2 else None

    def calls(self, fn: Callable[[], Any], n: int, budget_ms: float | None = None) -> list[float]:
        """Per-call times in ms of ``n`` calls; on CPU stop early once ``budget_ms`` of wall time is spent."""
        if not self.cuda:
            out: list[float] = []  # per-call timing is fine here: perf_counter costs ~0.1 us, ops cost >= 10 us
            start = time.perf_counter()
            for _ in range(n):
                t0 = time.perf_counter()
                fn()
                t1 = time.perf_counter()
                out.append((t1 - t0) * 1e3)
                if budget_ms is not None and (t1 - start) * 1e3 >= budget_ms:
                    break
            return out
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for i in range(n):
            if self.flush_buf is not None:
                self.flush_buf.zero_()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize(self.device)
        return [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]


def measure(steps: dict[str, Callable[[], Any]], device: torch.device, cfg: TimingConfig) -> dict[str, list[float]]:
    """Time each zero-argument step (already called once), interleaved over ``cfg.rounds`` rounds: samples in ms."""
    timer = _Timer(device, cfg.flush_l2)
    est: dict[str, float] = {}
    for name, step in steps.items():
        # min, not median: one preempted call must not shrink the sample count of a fast op to min_reps
        est[name] = max(min(timer.calls(step, 3)), 1e-4)
        timer.calls(step, max(1, math.ceil(cfg.warmup_ms / est[name])), budget_ms=cfg.warmup_ms)
    samples: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    per_round = cfg.rep_ms / cfg.rounds
    for r in range(cfg.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            n = min(cfg.max_reps, max(cfg.min_reps, math.ceil(per_round / est[name])))
            got = timer.calls(steps[name], n, budget_ms=per_round)
            if len(got) < cfg.min_reps:  # CPU budget spent early (a slow op or a busy machine): keep min_reps
                got += timer.calls(steps[name], cfg.min_reps - len(got))
            samples[name] += got
    return samples


def peak_memory(step: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated by one call of ``step`` above what was allocated before it (see module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return int(peak)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = step()
        del out
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    cur = peak = 0
    for e in events:
        cur += e.self_cpu_memory_usage
        peak = max(peak, cur)
    return int(peak)
