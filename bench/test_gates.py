"""Tests of the bench machinery itself: gates fail when they should, baselines are compared and written right.

pytest bench/test_gates.py
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from bench import plot, update_baselines
from bench.gates import ANY_GPU, ANYWHERE, GPU, Gate, applies, check_gates, check_stored, load_baselines
from bench.harness import (
    BenchFixture,
    BenchSession,
    Case,
    GateFailure,
    Impl,
    TimingConfig,
    kind_from_name,
    make_step,
    peak_memory,
    quantile,
    run_case,
)

FAST = TimingConfig(warmup_ms=2.0, rep_ms=30.0, rounds=3, flush_l2=False, cpu_threads=1, ratio_stat="p20_ms")


def session(tmp_path, **kw) -> BenchSession:
    kw.setdefault("cfg", FAST)
    return BenchSession(device=torch.device("cpu"), out_dir=tmp_path / "out", baseline_dir=tmp_path / "base", **kw)


def setup():
    return {"x": torch.randn(64, 256), "w": torch.randn(256)}


def ref(x, w):
    return torch.nn.functional.silu(x * w) + x


def slowed(x, w):  # the same work plus a deliberate 3 ms stall: a regression any gate must catch
    time.sleep(0.003)
    return ref(x, w)


def case(candidate, gates=(), mode="fwd", **kw) -> Case:
    return Case(
        name="toy",
        mode=mode,
        setup=setup,
        grad_inputs=("x", "w"),
        candidate=Impl("ours", candidate),
        baselines=[Impl("eager", ref)],
        gates=list(gates),
        shapes={"x": [64, 256]},
        dtype="float32",
        **kw,
    )


# ---------------------------------------------------------------------------------------------- in-run gates
def test_slowed_candidate_fails_its_gate(tmp_path):
    s = session(tmp_path)
    rec, _ = run_case(case(slowed, [Gate("eager", 0.9, devices=(ANYWHERE,))]), s)
    assert rec["ratios"]["eager"] < 0.5  # a ~0.05 ms op against the same op + 3 ms
    assert [f["gate"] for f in rec["failures"]] == ["ours >= 0.9 x eager"]
    assert rec["attempts"] == 1 + s.cfg.retries  # re-measured before the failure stood
    with pytest.raises(GateFailure, match="ours >= 0.9 x eager"):
        BenchFixture(s).run(case(slowed, [Gate("eager", 0.9, devices=(ANYWHERE,))]))


def test_honest_candidate_passes_the_same_gate(tmp_path):
    rec, _ = run_case(case(ref, [Gate("eager", 0.5, devices=(ANYWHERE,))]), session(tmp_path))
    assert rec["failures"] == []
    assert [g["status"] for g in rec["gates"]] == ["pass"]


class _SlowBackward(torch.autograd.Function):
    """Identity whose backward stalls 3 ms: a backward-only regression."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        time.sleep(0.003)
        return g


def slow_backward(x, w):
    return ref(_SlowBackward.apply(x), w)


def test_modes_time_what_they_say(tmp_path):
    # 0.5: a 3 ms stall on a ~0.05 ms op gives ~0.02x; without it (or with only the Function's call overhead) ~1x
    gate = [Gate("eager", 0.5, devices=(ANYWHERE,))]
    s = session(tmp_path)
    # a forward-only stall fails fwd_bwd but not bwd (bwd times the backward of one retained graph) ...
    assert run_case(case(slowed, gate, mode="fwd_bwd"), s)[0]["failures"]
    assert not run_case(case(slowed, gate, mode="bwd"), s)[0]["failures"]
    # ... and a backward-only stall fails bwd and fwd_bwd, not fwd
    assert run_case(case(slow_backward, gate, mode="bwd"), s)[0]["failures"]
    assert run_case(case(slow_backward, gate, mode="fwd_bwd"), s)[0]["failures"]
    assert not run_case(case(slow_backward, gate, mode="fwd"), s)[0]["failures"]


def test_gate_applicability():
    assert applies(GPU, "h100") and applies(GPU, "h200") and not applies(GPU, "cpu")
    assert applies((ANY_GPU,), "a100") and not applies((ANY_GPU,), "cpu")
    assert applies((ANYWHERE,), "cpu")
    gates = [Gate("copy", 0.85, GPU), Gate("eager", 1.1, GPU, modes=("fwd",)), Gate("liger", 1.0, GPU)]
    ratios = {"copy": 0.5, "eager": 0.9}
    on_cpu = check_gates(gates, ratios, "cpu", "fwd")
    assert [o.status for o in on_cpu] == ["skip", "skip", "skip"]  # GPU gates skip on CPU, whatever the ratio
    on_h100 = check_gates(gates, ratios, "h100", "bwd", missing={"liger": "not installed"})
    assert [o.status for o in on_h100] == ["fail", "skip", "skip"]  # eager gate is fwd-only; liger missing
    assert "not installed" in on_h100[2].message
    assert [o.status for o in check_gates(gates, {"copy": 0.86, "eager": 1.2, "liger": 1.0}, "h200", "fwd")] == [
        "pass",
        "pass",
        "pass",
    ]


def test_baseline_that_errors_is_recorded_not_fatal(tmp_path):
    def broken(x, w):
        raise RuntimeError("peer library changed its API")

    c = case(ref, [Gate("peer", 1.0, devices=(ANYWHERE,))])
    c.baselines.append(Impl("peer", broken))
    with pytest.warns(UserWarning, match="peer library changed"):
        rec, _ = run_case(c, session(tmp_path))
    assert "peer library changed" in rec["errors"]["peer"]
    assert [g["status"] for g in rec["gates"]] == ["skip"]
    with pytest.raises(RuntimeError, match="peer library"):
        run_case(c, session(tmp_path, strict=True))


# ------------------------------------------------------------------------------------------- stored baselines
STORED = {"ratios": {"eager": 2.0, "copy": 0.9}, "shapes": {"x": [64, 256]}, "dtype": "float32"}


def stored_status(ratios, entry=STORED, tolerance=0.10, **kw):
    out = check_stored("toy[fwd]", ratios, entry, shapes={"x": (64, 256)}, dtype="float32", tolerance=tolerance, **kw)
    return {o.gate.split(" vs ")[-1].removesuffix(" (stored)"): o.status for o in out}


def test_stored_baseline_tolerance():
    assert stored_status({"eager": 1.75, "copy": 0.9}) == {"eager": "fail", "copy": "pass"}  # -12.5 %
    assert stored_status({"eager": 1.85, "copy": 0.82}) == {"eager": "pass", "copy": "pass"}  # -7.5 %, -8.9 %
    assert stored_status({"eager": 1.8, "copy": 0.95}) == {"eager": "pass", "copy": "pass"}  # exactly -10 %
    assert stored_status({"eager": 3.0, "copy": 0.79}) == {"eager": "pass", "copy": "fail"}  # faster never fails
    assert stored_status({"eager": 1.75, "copy": 0.9}, tolerance=0.2) == {"eager": "pass", "copy": "pass"}
    assert stored_status({"eager": 1.75}, track=("copy",)) == {"copy": "skip"}  # untracked ratios not compared


def test_stored_baseline_missing_or_stale_is_reported_not_failed():
    assert [o.status for o in check_stored("k", {"eager": 0.1}, None, shapes={}, dtype="x", tolerance=0.1)] == ["skip"]
    stale = check_stored("k", {"eager": 0.1}, STORED, shapes={"x": [8, 8]}, dtype="float32", tolerance=0.1)
    assert [o.status for o in stale] == ["skip"] and "stale" in stale[0].message


def test_stored_baseline_gate_in_a_run(tmp_path):
    s = session(tmp_path)
    # identical implementations measure ~1.0x; a stored 2.0x means this run dropped ~50 %: must fail at the
    # case's own 10 % tolerance (the CPU default, 50 %, would sit right at the boundary)
    s.stored = {"toy[fwd]": {**STORED, "ratios": {"eager": 2.0}}}
    rec, _ = run_case(case(ref, tolerance=0.10), s)
    assert [f["gate"] for f in rec["failures"]] == ["toy[fwd] ratio vs eager (stored)"]
    assert rec["tolerance"] == 0.10 and rec["attempts"] == 1 + s.cfg.retries
    s.stored = {"toy[fwd]": {**STORED, "ratios": {"eager": 0.5}}}
    rec, _ = run_case(case(ref, tolerance=0.10), s)
    assert rec["failures"] == [] and [o["status"] for o in rec["stored"]] == ["pass"]
    s.update = True  # --update-baselines: compared and reported, never failed
    s.stored = {"toy[fwd]": {**STORED, "ratios": {"eager": 2.0}}}
    rec, _ = run_case(case(ref, tolerance=0.10), s)
    assert rec["failures"] == [] and rec["stored"][0]["status"] == "skip"


def test_update_baselines_writes_the_file(tmp_path):
    s = session(tmp_path, update=True)
    run_case(case(ref), s)
    assert not (tmp_path / "base" / "cpu.json").exists()  # only written deliberately, at the end
    written = s.write_baselines()
    assert written == {"cpu": tmp_path / "base" / "cpu.json"}
    entry = load_baselines("cpu", tmp_path / "base")["toy[fwd]"]
    assert set(entry["ratios"]) == {"eager"} and entry["shapes"] == {"x": [64, 256]}
    assert entry["dtype"] == "float32" and entry["median_ms"] > 0
    # a later session of the same device kind compares against it
    assert "toy[fwd]" in session(tmp_path).stored


def test_update_baselines_cli(tmp_path, capsys):
    s = session(tmp_path)
    run_case(case(ref), s)
    run_case(case(ref, mode="fwd_bwd"), s)
    assert update_baselines.main([str(s.results_path), "--dir", str(tmp_path / "cli")]) == 0
    data = json.loads((tmp_path / "cli" / "cpu.json").read_text())
    assert set(data) == {"toy[fwd]", "toy[fwd_bwd]"}
    assert "toy[fwd] vs eager: new ->" in capsys.readouterr().out
    assert update_baselines.main([str(s.results_path), "--dir", str(tmp_path / "cli"), "--device", "h100"]) == 1


# ---------------------------------------------------------------------------------------- records and pieces
def test_results_record(tmp_path):
    s = session(tmp_path)
    rec, _ = run_case(case(ref, flops=123, bytes_moved=64 * 256 * 8), s)
    line = json.loads(s.results_path.read_text().splitlines()[-1])
    assert line == json.loads(json.dumps(rec))
    for key in ("timestamp", "device", "device_kind", "versions", "commit", "key", "shapes", "dtype", "ratios"):
        assert key in line
    assert {"torch", "triton", "transformers"} <= set(line["versions"])
    assert line["p20_ms"] <= line["median_ms"] <= line["p80_ms"]
    assert set(line["impls"]) == {"ours", "eager"} and line["gbps"] > 0 and line["tflops"] > 0


def test_make_step_modes():
    x = {"x": torch.randn(8, 16), "w": torch.randn(16)}
    out = make_step(ref, lambda: x, "fwd")()
    assert not out.requires_grad  # fwd is inference: no graph
    inputs = setup()
    step = make_step(ref, lambda: inputs, "bwd", ("x", "w"))
    step()
    g1 = inputs["x"].grad.clone()
    step()  # the retained graph again; grads reset, not accumulated
    torch.testing.assert_close(inputs["x"].grad, g1)
    with pytest.raises(ValueError, match="grad_inputs"):
        make_step(ref, setup, "fwd_bwd")


def test_cpu_peak_memory_sees_torch_allocations():
    x = torch.randn(256, 1024)  # 1 MiB
    assert peak_memory(lambda: x * 2, torch.device("cpu")) == pytest.approx(x.nbytes, rel=0.01)
    assert peak_memory(lambda: (x * 2) * 3, torch.device("cpu")) == pytest.approx(2 * x.nbytes, rel=0.01)


def test_device_kind_names():
    assert kind_from_name("NVIDIA H100 80GB HBM3") == "h100"
    assert kind_from_name("NVIDIA H200") == "h200"
    assert kind_from_name("NVIDIA A100-SXM4-80GB") == "a100"
    assert kind_from_name("NVIDIA GeForce RTX 4090") == "nvidia-geforce-rtx-4090"


def test_quantile_matches_torch():
    xs = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0]
    for q in (0.2, 0.5, 0.8):
        assert quantile(xs, q) == pytest.approx(torch.tensor(xs).quantile(q).item())


def test_plot_renders_all_record_kinds(tmp_path):
    pytest.importorskip("matplotlib")
    s = session(tmp_path)
    run_case(case(ref, [Gate("eager", 0.5, devices=(ANYWHERE,))]), s)
    for conc, tps in ((1, 50.0), (4, 180.0), (16, 500.0)):
        s.record(
            {"kind": "throughput", "name": "serve", "series": "fastllava", "concurrency": conc, "tokens_per_s": tps}
        )
    s.record(
        {
            "kind": "packed_vs_padded",
            "name": "train",
            "label": "bs8",
            "packed_tokens_per_s": 9e3,
            "padded_tokens_per_s": 5e3,
        }
    )
    assert plot.main([str(s.results_path), "--out", str(tmp_path / "plots")]) == 0
    for name in ("speedup_cpu.png", "memory_cpu.png", "throughput_cpu.png", "packed_vs_padded_cpu.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:4] == b"\x89PNG"
    table = (tmp_path / "plots" / "summary.md").read_text()
    assert "| toy[fwd] |" in table and "pass (1)" in table


def test_update_baselines_stores_the_median_of_several_runs(tmp_path):
    s = session(tmp_path)
    for _ in range(3):
        run_case(case(ref), s)
    recs = update_baselines.read_records(s.results_path)
    for rec, value in zip(recs, (1.0, 5.0, 1.2), strict=True):  # one outlier run must not set the baseline
        rec["ratios"]["eager"] = value
    update_baselines.update_baselines(recs, tmp_path / "med")
    entry = load_baselines("cpu", tmp_path / "med")["toy[fwd]"]
    assert entry["ratios"] == {"eager": 1.2} and entry["runs"] == 3
