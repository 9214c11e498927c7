"""Benchmarks of the fused ops in `kernels/`: forward, backward and forward+backward, time and peak memory.

    pytest bench/bench_kernels.py                      # CPU: reference path, small shapes, harness exercised
    pytest bench/bench_kernels.py -k rms_norm          # one op

Each op is timed against, in the same run: its torch eager reference (`<op>_ref`), `torch.compile` of that
reference, Liger-Kernel's op where one exists (RMSNorm, fused add+RMSNorm, RoPE; CUDA only), a device-to-device
copy of the bytes the op must move (the bandwidth bound), and for the scatter transformers' `masked_scatter` merge.

GPU shapes are LLaVA-1.5-7B's in bf16: hidden 4096, 32 heads of 128, 4096 packed tokens; the projector maps 8
images x 576 CLIP-L/14-336 tokens (width 1024) to 4096; the scatter writes them into an 8192-token stream.
GPU gates (h100/h200): RMSNorm and rotary >= 0.85 x copy bandwidth and >= 1.0 x Liger and torch.compile;
projector >= 1.1 x eager forward (>= 1.0 x in the backward, which is three GEMMs whatever is fused);
scatter >= 10 x masked_scatter forward (>= 1.0 x in the backward).
CPU (fp32, small shapes): `ours` is the reference behind the kernel switch, so the gate is that the dispatch does
not double the op's time (ratio to eager >= 0.5); everything else is recorded.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from bench.harness import GPU, MODES, BenchSession, Case, Gate, Impl
from fastllava.optional import HAS_LIGER

EPS = 1e-6
IMAGE_TOKEN_ID = 32000  # llava-hf's <image> id; only compared, never embedded

# Shapes per device class: GPU = LLaVA-1.5-7B, CPU = small enough for a 2-core machine.
SHAPES = {
    "gpu": {
        "norm": {"T": 4096, "H": 4096},
        "rotary": {"T": 4096, "Hq": 32, "Hk": 32, "D": 128, "seqs": 4},
        "projector": {"N": 8 * 576, "in": 1024, "hidden": 4096, "out": 4096},
        "scatter": {"T": 8192, "H": 4096, "images": 8, "per_image": 576, "prefix": 35},
    },
    "cpu": {
        "norm": {"T": 512, "H": 1024},
        "rotary": {"T": 256, "Hq": 8, "Hk": 8, "D": 64, "seqs": 4},
        "projector": {"N": 2 * 64, "in": 256, "hidden": 512, "out": 512},
        "scatter": {"T": 1024, "H": 256, "images": 4, "per_image": 64, "prefix": 35},
    },
}

# 0.5, not tighter: p20 ratios of identical code ranged 0.69-2.9x across runs on the loaded 2-core machine.
CPU_DISPATCH = Gate(
    "eager",
    0.5,
    devices=("cpu",),
    why="on CPU ours is the reference behind the kernel switch; the dispatch must not double the op's time",
)
BANDWIDTH_GATES = [
    Gate("copy", 0.85, GPU, why="memory-bound op: >= 85% of a d2d copy of the same bytes"),
    Gate("liger", 1.0, GPU),
    Gate("compile", 1.0, GPU),
    CPU_DISPATCH,
]


def tracked(session: BenchSession) -> tuple[str, ...] | None:
    """Ratios kept in the stored baseline: all on GPU; on CPU only ``eager``, the one whose true value is known
    (1.0: ours is the reference there) -- the others depend on the CPU's memory system and on the machine's load."""
    return None if session.is_cuda else ("eager",)


def shapes(session: BenchSession, op: str) -> dict[str, int]:
    return SHAPES["gpu" if session.is_cuda else "cpu"][op]


def kernel(name: str) -> Callable[..., Any]:
    """``fastllava.kernels.<name>``, or skip the test while that op has not landed."""
    kernels = importlib.import_module("fastllava.kernels")
    fn = getattr(kernels, name, None)
    if fn is None:
        pytest.skip(f"fastllava.kernels.{name} is not importable yet")
    return fn


def liger(session: BenchSession, module: str, attr: str) -> Impl:
    """A Liger-Kernel autograd Function as an Impl placeholder: the caller wraps ``.fn``; missing where absent."""
    if not session.is_cuda:
        return Impl.missing("liger", "Liger-Kernel runs on CUDA only")
    if not HAS_LIGER:
        return Impl.missing("liger", "liger-kernel is not installed (pip install liger-kernel)")
    try:
        mod = importlib.import_module(f"liger_kernel.ops.{module}")
    except ImportError as e:
        return Impl.missing("liger", f"liger_kernel.ops.{module}: {e}")
    fn = getattr(mod, attr, None)
    if fn is None:
        return Impl.missing("liger", f"liger_kernel.ops.{module} has no {attr} in this version")
    return Impl("liger", fn)


def liger_wrap(impl: Impl, wrap: Callable[[Any], Callable[..., Any]]) -> Impl:
    return impl if impl.fn is None else Impl(impl.name, wrap(impl.fn))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ------------------------------------------------------------------------------------------------- RMSNorm
def setup_norm(session: BenchSession, residual: bool) -> Callable[[], dict[str, Any]]:
    s, dev, dt = shapes(session, "norm"), session.device, session.dtype

    def make() -> dict[str, Any]:
        inputs = {
            "x": torch.randn(s["T"], s["H"], device=dev, dtype=dt),
            "weight": 1.0 + 0.1 * torch.randn(s["H"], device=dev, dtype=dt),
        }
        if residual:
            inputs["residual"] = torch.randn(s["T"], s["H"], device=dev, dtype=dt)
        return inputs

    return make


def norm_bytes(session: BenchSession, mode: str, residual: bool) -> int:
    s = shapes(session, "norm")
    n = s["T"] * s["H"] * session.dtype.itemsize
    # fwd: x (+ residual) in, y (+ h) out; bwd: dy (+ dh), x|h in, dx out (dresidual == dx may alias it).
    fwd, bwd = (4 * n, 4 * n) if residual else (2 * n, 3 * n)
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}[mode]


@pytest.mark.parametrize("mode", MODES)
def test_rms_norm(bench, mode):
    rms_norm, rms_norm_ref = kernel("rms_norm"), kernel("rms_norm_ref")
    s = bench.session
    ours = lambda x, weight: rms_norm(x, weight, EPS)
    ref = lambda x, weight: rms_norm_ref(x, weight, EPS)
    # in_place=False keeps the upstream gradient intact across the repeated backward calls (same traffic).
    lig = liger_wrap(
        liger(s, "rms_norm", "LigerRMSNormFunction"),
        lambda f: lambda x, weight: f.apply(x, weight, EPS, 0.0, "llama", False),
    )
    nbytes = norm_bytes(s, mode, residual=False)
    bench.run(
        Case(
            name="rms_norm",
            mode=mode,
            setup=setup_norm(s, residual=False),
            grad_inputs=("x", "weight"),
            candidate=Impl("ours", ours),
            baselines=[Impl("eager", ref), s.compiled("compile", ref), lig, s.copy_bound(nbytes)],
            gates=BANDWIDTH_GATES,
            shapes={"x": [shapes(s, "norm")["T"], shapes(s, "norm")["H"]]},
            dtype=dtype_name(s.dtype),
            track=tracked(s),
            bytes_moved=nbytes,
        )
    )


@pytest.mark.parametrize("mode", MODES)
def test_rms_norm_residual(bench, mode):
    rms_norm, rms_norm_ref = kernel("rms_norm"), kernel("rms_norm_ref")
    s = bench.session
    ours = lambda x, weight, residual: rms_norm(x, weight, EPS, residual=residual)
    ref = lambda x, weight, residual: rms_norm_ref(x, weight, EPS, residual=residual)

    def unfused(x, weight, residual):  # what a pre-norm block does without the fused residual: add, then norm
        h = x + residual
        return rms_norm(h, weight, EPS), h

    lig = liger_wrap(
        liger(s, "fused_add_rms_norm", "LigerFusedAddRMSNormFunction"),
        lambda f: lambda x, weight, residual: f.apply(x, residual, weight, EPS, 0.0, "llama", False),
    )
    nbytes = norm_bytes(s, mode, residual=True)
    T, H = shapes(s, "norm")["T"], shapes(s, "norm")["H"]
    bench.run(
        Case(
            name="rms_norm_residual",
            mode=mode,
            setup=setup_norm(s, residual=True),
            grad_inputs=("x", "weight", "residual"),
            candidate=Impl("ours", ours),
            baselines=[
                Impl("eager", ref),
                s.compiled("compile", ref),
                lig,
                Impl("unfused", unfused),
                s.copy_bound(nbytes),
            ],
            gates=BANDWIDTH_GATES,
            shapes={"x": [T, H], "residual": [T, H]},
            dtype=dtype_name(s.dtype),
            track=tracked(s),
            bytes_moved=nbytes,
        )
    )


# -------------------------------------------------------------------------------------------------- rotary
def setup_rotary(session: BenchSession) -> Callable[[], dict[str, Any]]:
    s, dev, dt = shapes(session, "rotary"), session.device, session.dtype
    rotary_cos_sin = kernel("rotary_cos_sin")
    per_seq = s["T"] // s["seqs"]

    def make() -> dict[str, Any]:
        # fp32 tables, as the model keeps them (LlamaModel.rope_tables); packed positions restart per sequence.
        cos, sin = rotary_cos_sin(s["D"], per_seq, 10000.0, device=dev, dtype=torch.float32)
        return {
            "q": torch.randn(s["T"], s["Hq"], s["D"], device=dev, dtype=dt),
            "k": torch.randn(s["T"], s["Hk"], s["D"], device=dev, dtype=dt),
            "cos": cos,
            "sin": sin,
            "position_ids": torch.arange(per_seq, device=dev).repeat(s["seqs"]),
        }

    return make


def rotary_bytes(session: BenchSession, mode: str) -> int:
    s = shapes(session, "rotary")
    qk = s["T"] * (s["Hq"] + s["Hk"]) * s["D"] * session.dtype.itemsize
    tables = 2 * s["T"] * s["D"] * 4 + s["T"] * 8  # gathered fp32 cos/sin rows + int64 positions
    one = 2 * qk + tables  # q, k (or dq, dk) read and written once
    return {"fwd": one, "bwd": one, "fwd_bwd": 2 * one}[mode]


@pytest.mark.parametrize("mode", MODES)
def test_rotary(bench, mode):
    apply_rotary, apply_rotary_ref = kernel("apply_rotary"), kernel("apply_rotary_ref")
    s = bench.session
    # Liger takes HF's [B, H, T, D] (a view of our [T, H, D]) and cos/sin already gathered per token, as
    # LlamaRotaryEmbedding hands them over; it rotates in place and returns views.
    lig = liger_wrap(
        liger(s, "rope", "LigerRopeFunction"),
        lambda f: (
            lambda q, k, cos, sin, position_ids: f.apply(
                q.unsqueeze(0).transpose(1, 2), k.unsqueeze(0).transpose(1, 2), cos[position_ids], sin[position_ids]
            )
        ),
    )
    nbytes = rotary_bytes(s, mode)
    r = shapes(s, "rotary")
    bench.run(
        Case(
            name="rotary",
            mode=mode,
            setup=setup_rotary(s),
            grad_inputs=("q", "k"),
            candidate=Impl("ours", apply_rotary),
            baselines=[
                Impl("eager", apply_rotary_ref),
                s.compiled("compile", apply_rotary_ref),
                lig,
                s.copy_bound(nbytes),
            ],
            gates=BANDWIDTH_GATES,
            shapes={"q": [r["T"], r["Hq"], r["D"]], "k": [r["T"], r["Hk"], r["D"]], "seqs": r["seqs"]},
            dtype=dtype_name(s.dtype),
            track=tracked(s),
            bytes_moved=nbytes,
        )
    )


# ----------------------------------------------------------------------------------------------- projector
def setup_projector(session: BenchSession) -> Callable[[], dict[str, Any]]:
    s, dev, dt = shapes(session, "projector"), session.device, session.dtype

    def make() -> dict[str, Any]:
        # nn.Linear layout [out, in], init scale 1/sqrt(fan_in) so activations stay O(1)
        return {
            "x": torch.randn(s["N"], s["in"], device=dev, dtype=dt),
            "w1": torch.randn(s["hidden"], s["in"], device=dev, dtype=dt) * s["in"] ** -0.5,
            "b1": torch.randn(s["hidden"], device=dev, dtype=dt) * 0.02,
            "w2": torch.randn(s["out"], s["hidden"], device=dev, dtype=dt) * s["hidden"] ** -0.5,
            "b2": torch.randn(s["out"], device=dev, dtype=dt) * 0.02,
        }

    return make


def projector_flops(session: BenchSession, mode: str) -> int:
    s = shapes(session, "projector")
    n, i, h, o = s["N"], s["in"], s["hidden"], s["out"]
    fwd = 2 * n * (i * h + h * o)
    bwd = 2 * n * (i * h + 2 * h * o)  # dW1, dW2 and dH; no dX (the vision tower is frozen in LLaVA training)
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}[mode]


def projector_eager(x, w1, b1, w2, b2):
    """LLaVA's mlp2x_gelu as nn.Sequential(Linear, GELU, Linear) runs it (independent of projector_mlp_ref)."""
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


@pytest.mark.parametrize("mode", MODES)
def test_projector_mlp(bench, mode):
    projector_mlp, projector_mlp_ref = kernel("projector_mlp"), kernel("projector_mlp_ref")
    s = bench.session
    p = shapes(s, "projector")
    bench.run(
        Case(
            name="projector_mlp",
            mode=mode,
            setup=setup_projector(s),
            grad_inputs=("w1", "b1", "w2", "b2"),
            candidate=Impl("ours", projector_mlp),
            baselines=[
                Impl("eager", projector_mlp_ref),
                Impl("nn_sequential", projector_eager),
                s.compiled("compile", projector_mlp_ref),
            ],
            gates=[
                Gate("eager", 1.1, GPU, modes=("fwd",), why="GELU fused into the first GEMM's epilogue"),
                Gate("eager", 1.0, GPU, modes=("bwd", "fwd_bwd"), why="three GEMMs dominate: never slower"),
                CPU_DISPATCH,
            ],
            shapes={"x": [p["N"], p["in"]], "w1": [p["hidden"], p["in"]], "w2": [p["out"], p["hidden"]]},
            dtype=dtype_name(s.dtype),
            track=tracked(s),
            flops=projector_flops(s, mode),
        )
    )


# -------------------------------------------------------------------------------------------------- scatter
def setup_scatter(session: BenchSession) -> Callable[[], dict[str, Any]]:
    s, dev, dt = shapes(session, "scatter"), session.device, session.dtype
    seq = s["T"] // s["images"]  # one image per packed sequence, after a text prefix
    offsets = [i * seq + s["prefix"] for i in range(s["images"])]

    def make() -> dict[str, Any]:
        input_ids = torch.zeros(s["T"], dtype=torch.long, device=dev)
        for o in offsets:
            input_ids[o : o + s["per_image"]] = IMAGE_TOKEN_ID
        return {
            "embeds": torch.randn(s["T"], s["H"], device=dev, dtype=dt),
            "features": torch.randn(s["images"] * s["per_image"], s["H"], device=dev, dtype=dt),
            "offsets": torch.tensor(offsets, dtype=torch.int32, device=dev),
            "counts": torch.full((s["images"],), s["per_image"], dtype=torch.int32, device=dev),
            "input_ids": input_ids,  # for the masked_scatter baseline only
        }

    return make


def masked_scatter_merge(embeds, features, input_ids, **_):
    """transformers' LlavaModel merge: boolean mask from the <image> ids, then `masked_scatter`."""
    special_image_mask = (input_ids == IMAGE_TOKEN_ID).unsqueeze(-1)  # (T, 1), as get_placeholder_mask builds it
    return embeds.masked_scatter(special_image_mask, features.to(embeds.dtype))


def scatter_bytes(session: BenchSession, mode: str) -> int:
    s = shapes(session, "scatter")
    e = session.dtype.itemsize
    stream, feats = s["T"] * s["H"] * e, s["images"] * s["per_image"] * s["H"] * e
    fwd = 2 * stream  # every row of the merged stream read once (text or feature) and written once
    bwd = 2 * stream + feats  # d_out read, d_embeds written, d_features written
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}[mode]


@pytest.mark.parametrize("mode", MODES)
def test_scatter_image_tokens(bench, mode):
    scatter, scatter_ref = kernel("scatter_image_tokens"), kernel("scatter_image_tokens_ref")
    s = bench.session
    sc = shapes(s, "scatter")
    ours = lambda embeds, features, offsets, counts, **_: scatter(embeds, features, offsets, counts)
    ref = lambda embeds, features, offsets, counts, **_: scatter_ref(embeds, features, offsets, counts)
    nbytes = scatter_bytes(s, mode)
    bench.run(
        Case(
            name="scatter_image_tokens",
            mode=mode,
            setup=setup_scatter(s),
            grad_inputs=("embeds", "features"),
            candidate=Impl("ours", ours),
            baselines=[
                Impl("masked_scatter", masked_scatter_merge),
                Impl("eager", ref),
                s.compiled("compile", ref),
                s.copy_bound(nbytes),
            ],
            gates=[
                Gate("masked_scatter", 10.0, GPU, modes=("fwd",), why="no mask, no prefix sum, no host sync"),
                Gate("masked_scatter", 1.0, GPU, modes=("bwd", "fwd_bwd")),
                CPU_DISPATCH,
            ],
            shapes={
                "embeds": [sc["T"], sc["H"]],
                "features": [sc["images"] * sc["per_image"], sc["H"]],
                "images": sc["images"],
            },
            dtype=dtype_name(s.dtype),
            track=tracked(s),
            bytes_moved=nbytes,
        )
    )


# ------------------------------------------------------------------------------------------ fair comparisons
def test_baselines_compute_what_ours_computes(bench_session):
    """Every baseline timed above returns what the reference returns (same work, or the ratios mean nothing)."""
    s = bench_session
    tol = {"atol": 2e-2, "rtol": 2e-2} if s.dtype == torch.bfloat16 else {"atol": 1e-5, "rtol": 1e-5}
    rms_norm_ref, apply_rotary_ref = kernel("rms_norm_ref"), kernel("apply_rotary_ref")
    projector_mlp_ref, scatter_ref = kernel("projector_mlp_ref"), kernel("scatter_image_tokens_ref")
    with torch.no_grad():
        sc = setup_scatter(s)()
        torch.testing.assert_close(
            masked_scatter_merge(**sc), scatter_ref(sc["embeds"], sc["features"], sc["offsets"], sc["counts"])
        )
        p = setup_projector(s)()
        torch.testing.assert_close(projector_eager(**p), projector_mlp_ref(**p), **tol)
        n = setup_norm(s, residual=True)()
        y_ref, h_ref = rms_norm_ref(n["x"], n["weight"], EPS, residual=n["residual"])
        lig = liger(s, "fused_add_rms_norm", "LigerFusedAddRMSNormFunction")
        if lig.fn is not None:
            y, h = lig.fn.apply(n["x"], n["residual"], n["weight"], EPS, 0.0, "llama", False)
            torch.testing.assert_close((y, h), (y_ref, h_ref), **tol)
        lig = liger(s, "rms_norm", "LigerRMSNormFunction")
        if lig.fn is not None:
            y = lig.fn.apply(n["x"], n["weight"], EPS, 0.0, "llama", False)
            torch.testing.assert_close(y, rms_norm_ref(n["x"], n["weight"], EPS), **tol)
        r = setup_rotary(s)()
        lig = liger(s, "rope", "LigerRopeFunction")
        if lig.fn is not None:  # rotates q and k in place: the reference first
            q_ref, k_ref = apply_rotary_ref(r["q"], r["k"], r["cos"], r["sin"], r["position_ids"])
            pos = r["position_ids"]
            q, k = lig.fn.apply(
                r["q"].unsqueeze(0).transpose(1, 2), r["k"].unsqueeze(0).transpose(1, 2), r["cos"][pos], r["sin"][pos]
            )
            torch.testing.assert_close((q[0].transpose(0, 1), k[0].transpose(0, 1)), (q_ref, k_ref), **tol)
