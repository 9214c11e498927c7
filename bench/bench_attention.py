"""Benchmarks of attention: varlen (packed) prefill/training attention and paged decode attention.

    pytest bench/bench_attention.py                    # CPU: the reference path on small shapes (harness only)
    pytest bench/bench_attention.py -k paged           # one benchmark

Varlen attention (``fastllava.attention.varlen_attention``), forward and forward+backward, on one LLaVA-like packed
batch: five multimodal samples (576 image tokens + their text, ~600-700 tokens each) and five short text samples,
packed to 4096 tokens; 32 query heads of 128, MHA (32 K/V heads) and GQA (8 K/V heads), bf16. The candidate is our
``triton`` backend; baselines in the same run:
  * ``sdpa_flash``: torch SDPA restricted to its FlashAttention-2 backend (``SDPBackend.FLASH_ATTENTION``), one
    ``is_causal`` call per packed sequence (a Python loop over host-side lengths, outputs concatenated): what a
    varlen-less model does without padding (its Python launches count: ~10 per call);
  * ``torch_varlen``: ``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.10), the same FlashAttention-2 kernel
    called once over the packed batch -- the loop-free form of the SDPA flash backend;
  * ``cudnn``: the same loop restricted to ``SDPBackend.CUDNN_ATTENTION`` (recorded as an error where this torch or
    GPU has no cuDNN attention for the shape, e.g. GQA);
  * ``flex``, ``flash`` (flash-attn), ``xformers``: the registry's other backends, when installed (flex on the MHA
    case only: its torch.compile per shape and mode is the suite's largest fixed cost);
  * ``eager``: the registry's ``sdpa`` reference (one SDPA call with a dense block-diagonal mask).
GPU gates (h100/h200), forward: triton >= 0.8 x sdpa_flash, and >= 0.8 x torch_varlen where this torch has it.

Paged decode (``fastllava.attention.paged_attention``): 32 sequences, contexts drawn in [1024, 4096], block size 16,
blocks scattered over the cache, Llama-7B heads (32 x 128), bf16. Candidate: the ``triton`` paged kernel; baselines:
``paged_attention_ref`` (gathers every sequence's blocks, one masked SDPA) and a device copy of the K/V bytes the
kernel must read (the bandwidth bound: ``ratios["copy"]`` is the fraction of copy bandwidth, ``gbps`` the achieved
K/V read bandwidth). GPU gate: never slower than the gather reference.

CPU (fp32, small shapes): ``triton`` needs a GPU, so the candidate is the registry's ``sdpa`` reference; the gate is
only that the registry dispatch does not double the reference's time (as in bench_kernels.py).
"""

from __future__ import annotations

import importlib.util
import inspect
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.harness import GPU, BenchSession, Case, Gate, Impl
from fastllava.attention import (
    HAS_FLASH_ATTN,
    HAS_XFORMERS,
    available_backends,
    paged_attention,
    paged_attention_ref,
    varlen_attention,
)
from fastllava.kernels.flash_attention import flash_attn_varlen_ref

# Packed lengths. GPU: 5 multimodal samples (576 image slots + 20-130 text tokens) and 5 text-only samples = 4096.
# CPU: the same mix scaled down to 512 tokens.
SHAPES = {
    "gpu": {
        "lengths": [612, 688, 597, 641, 655, 176, 243, 98, 131, 255],
        "Hq": 32,
        "D": 128,
        "gqa_Hk": 8,
        "paged": {"B": 32, "ctx": (1024, 4096), "block": 16, "Hq": 32, "Hk": 32, "D": 128},
    },
    "cpu": {
        "lengths": [96, 110, 88, 40, 66, 30, 82],
        "Hq": 4,
        "D": 32,
        "gqa_Hk": 2,
        "paged": {"B": 4, "ctx": (32, 128), "block": 16, "Hq": 4, "Hk": 4, "D": 32},
    },
}
VARLEN_MODES = ("fwd", "fwd_bwd")
# torch.compile of flex costs ~10-30 s per shape and mode on a GPU: timed on the MHA case only (suite time budget)
FLEX_GQA_SKIP = "flex is timed on the MHA case only: each compiled shape/mode costs ~10-30 s of the suite's budget"

CPU_DISPATCH = Gate(
    "eager",
    0.5,
    devices=("cpu",),
    why="on CPU ours is the reference behind the registry; the dispatch must not double the op's time",
)


def shapes(session: BenchSession) -> dict[str, Any]:
    return SHAPES["gpu" if session.is_cuda else "cpu"]


def tracked(session: BenchSession) -> tuple[str, ...] | None:
    """All ratios on GPU; on CPU only ``eager`` (its true value, 1.0, is known there)."""
    return None if session.is_cuda else ("eager",)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ------------------------------------------------------------------------------------------------ varlen
def setup_varlen(session: BenchSession, Hk: int) -> Callable[[], dict[str, Any]]:
    s, dev, dt = shapes(session), session.device, session.dtype
    lengths = s["lengths"]
    T = sum(lengths)
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)

    def make() -> dict[str, Any]:
        return {
            "q": torch.randn(T, s["Hq"], s["D"], device=dev, dtype=dt),  # (T, Hq, D)
            "k": torch.randn(T, Hk, s["D"], device=dev, dtype=dt),  # (T, Hk, D)
            "v": torch.randn(T, Hk, s["D"], device=dev, dtype=dt),
            "cu_seqlens": torch.tensor(cu, dtype=torch.int32, device=dev),
            "max_seqlen": max(lengths),
        }

    return make


def bounds(session: BenchSession) -> list[tuple[int, int]]:
    """Host-side (start, end) of each packed sequence: the per-sequence baselines never sync to read cu_seqlens."""
    out, start = [], 0
    for n in shapes(session)["lengths"]:
        out.append((start, start + n))
        start += n
    return out


def sdpa_per_sequence(backend: SDPBackend, seqs: list[tuple[int, int]]) -> Callable[..., torch.Tensor]:
    """torch SDPA restricted to ``backend``, one causal call per sequence, outputs concatenated into [T, Hq, D].

    ``q[s:e].transpose(0, 1)[None]`` is a (1, H, L, D) view whose memory is flash's native (B, L, H, D) layout: no
    copies on the way in; the ``cat`` on the way out is one extra write of the output (~1-2 % of the call here).
    """

    def fn(q, k, v, cu_seqlens, max_seqlen):
        gqa = k.shape[1] != q.shape[1]
        outs = []
        with sdpa_kernel(backend):
            for s, e in seqs:
                qs, ks, vs = (x[s:e].transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # (1, H, L, D)
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=gqa)
                outs.append(o[0].transpose(0, 1))  # (L, Hq, D)
        return torch.cat(outs)

    return fn


def torch_varlen(session: BenchSession, gqa: bool) -> Impl:
    """``torch.nn.attention.varlen.varlen_attn``: torch's own FlashAttention-2 varlen call (torch >= 2.10, CUDA),
    the SDPA flash kernel without the per-sequence loop. Its keywords moved between releases: ``is_causal`` (2.10)
    became ``window_size=(-1, 0)``, ``enable_gqa`` came later; whichever this torch has is used."""
    if not session.is_cuda:
        return Impl.missing("torch_varlen", "torch's varlen_attn runs FlashAttention on CUDA only")
    if importlib.util.find_spec("torch.nn.attention.varlen") is None:
        return Impl.missing("torch_varlen", f"torch {torch.__version__} has no torch.nn.attention.varlen (>= 2.10)")
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    kw: dict[str, Any] = {}
    if "window_size" in params:
        kw["window_size"] = (-1, 0)  # causal
    elif "is_causal" in params:
        kw["is_causal"] = True
    else:
        return Impl.missing("torch_varlen", f"varlen_attn{inspect.signature(varlen_attn)}: no causal option")
    if gqa:
        if "enable_gqa" not in params:
            return Impl.missing("torch_varlen", f"torch {torch.__version__}'s varlen_attn has no enable_gqa")
        kw["enable_gqa"] = True

    def fn(q, k, v, cu_seqlens, max_seqlen):
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kw)

    return Impl("torch_varlen", fn)


def backend_impl(session: BenchSession, name: str) -> Impl:
    """A registry backend as a baseline, or missing (with the reason) where it cannot run here."""
    if name not in available_backends(session.device):
        hints = {"flash": "pip install flash-attn", "xformers": "pip install xformers", "triton": "needs CUDA"}
        return Impl.missing(name, f"backend {name!r} not available on {session.kind}: {hints.get(name, '')}")
    return Impl(
        name,
        lambda q, k, v, cu_seqlens, max_seqlen: varlen_attention(q, k, v, cu_seqlens, max_seqlen, True, backend=name),
    )


def varlen_flops(session: BenchSession, mode: str) -> int:
    """Causal attention FLOPs: 2 matmuls x 2 flops x L^2/2 x D per head; backward = 2.5 x forward (flash-attn's)."""
    s = shapes(session)
    fwd = sum(2 * n * n * s["D"] * s["Hq"] for n in s["lengths"])
    return {"fwd": fwd, "fwd_bwd": int(3.5 * fwd)}[mode]


def varlen_case(session: BenchSession, name: str, mode: str, Hk: int) -> Case:
    s = session
    seqs = bounds(s)
    if s.is_cuda:
        ours = backend_impl(s, "triton")
        cudnn = Impl("cudnn", sdpa_per_sequence(SDPBackend.CUDNN_ATTENTION, seqs))
    else:
        ours = backend_impl(s, "sdpa")
        cudnn = Impl.missing("cudnn", "cuDNN attention runs on CUDA only")
    sh = shapes(s)
    T = sum(sh["lengths"])
    return Case(
        name=name,
        mode=mode,
        setup=setup_varlen(s, Hk),
        grad_inputs=("q", "k", "v"),
        candidate=Impl("ours", ours.fn, ours.skip_reason),
        baselines=[
            Impl("sdpa_flash", sdpa_per_sequence(SDPBackend.FLASH_ATTENTION, seqs)),
            torch_varlen(s, gqa=Hk != sh["Hq"]),
            cudnn,
            backend_impl(s, "flex") if Hk == sh["Hq"] else Impl.missing("flex", FLEX_GQA_SKIP),
            backend_impl(s, "flash") if HAS_FLASH_ATTN else Impl.missing("flash", "flash-attn is not installed"),
            backend_impl(s, "xformers") if HAS_XFORMERS else Impl.missing("xformers", "xformers is not installed"),
            Impl(
                "eager",
                lambda q, k, v, cu_seqlens, max_seqlen: flash_attn_varlen_ref(
                    q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, True, 1.0 / math.sqrt(q.shape[-1])
                ),
            ),
        ],
        gates=[
            Gate("sdpa_flash", 0.8, GPU, modes=("fwd",), why="varlen FA-2 in Triton within 20% of torch's FA-2"),
            Gate("torch_varlen", 0.8, GPU, modes=("fwd",), why="the same target against the same kernel, no loop"),
            CPU_DISPATCH,
        ],
        shapes={
            "q": [T, sh["Hq"], sh["D"]],
            "k": [T, Hk, sh["D"]],
            "seqlens": sh["lengths"],
            "causal": True,
            "sdpa_flash": "per-sequence loop",
        },
        dtype=dtype_name(s.dtype),
        track=tracked(s),
        flops=varlen_flops(s, mode),
    )


@pytest.mark.parametrize("mode", VARLEN_MODES)
def test_varlen_attention(bench, mode):
    bench.run(varlen_case(bench.session, "varlen_attention", mode, shapes(bench.session)["Hq"]))


@pytest.mark.parametrize("mode", VARLEN_MODES)
def test_varlen_attention_gqa(bench, mode):
    bench.run(varlen_case(bench.session, "varlen_attention_gqa", mode, shapes(bench.session)["gqa_Hk"]))


# ------------------------------------------------------------------------------------------------- paged
def paged_layout(session: BenchSession) -> tuple[list[int], list[list[int]], int]:
    """(context lengths, block table rows, number of physical blocks): blocks scattered by a seeded permutation,
    as a cache looks after many sequences came and went."""
    p = shapes(session)["paged"]
    g = torch.Generator().manual_seed(0)
    lo, hi = p["ctx"]
    lens = torch.randint(lo, hi + 1, (p["B"],), generator=g).tolist()
    per_seq = [math.ceil(n / p["block"]) for n in lens]
    num_blocks = sum(per_seq)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    rows, used = [], 0
    width = max(per_seq)
    for n in per_seq:
        rows.append(perm[used : used + n] + [0] * (width - n))  # entries past a sequence's last block: never read
        used += n
    return lens, rows, num_blocks


def setup_paged(session: BenchSession) -> Callable[[], dict[str, Any]]:
    p, dev, dt = shapes(session)["paged"], session.device, session.dtype
    lens, rows, num_blocks = paged_layout(session)

    def make() -> dict[str, Any]:
        cache = (num_blocks, p["block"], p["Hk"], p["D"])
        return {
            "q": torch.randn(p["B"], p["Hq"], p["D"], device=dev, dtype=dt),  # (B, Hq, D): one new token each
            "k_cache": torch.randn(cache, device=dev, dtype=dt),  # (num_blocks, block_size, Hk, D)
            "v_cache": torch.randn(cache, device=dev, dtype=dt),
            "block_tables": torch.tensor(rows, dtype=torch.int32, device=dev),
            "context_lens": torch.tensor(lens, dtype=torch.int32, device=dev),
        }

    return make


def paged_bytes(session: BenchSession) -> int:
    """K and V rows of every context read once, q read, out written (block tables and lengths: negligible)."""
    p = shapes(session)["paged"]
    lens, _, _ = paged_layout(session)
    e = session.dtype.itemsize
    return 2 * sum(lens) * p["Hk"] * p["D"] * e + 2 * p["B"] * p["Hq"] * p["D"] * e


def test_paged_attention(bench):
    s = bench.session
    p = shapes(s)["paged"]
    backend = "triton" if s.is_cuda else "sdpa"  # the Triton kernel needs CUDA; the reference on CPU
    lens, rows, num_blocks = paged_layout(s)
    nbytes = paged_bytes(s)
    bench.run(
        Case(
            name="paged_attention",
            mode="fwd",
            setup=setup_paged(s),
            candidate=Impl("ours", lambda **kw: paged_attention(**kw, backend=backend)),
            baselines=[Impl("eager", paged_attention_ref), s.copy_bound(nbytes)],
            gates=[
                Gate("eager", 1.0, GPU, why="reads each K/V row once; the reference gathers and pads every context"),
                CPU_DISPATCH,
            ],
            shapes={
                "q": [p["B"], p["Hq"], p["D"]],
                "k_cache": [num_blocks, p["block"], p["Hk"], p["D"]],
                "block_tables": [len(rows), len(rows[0])],
                "context_lens": {"min": min(lens), "max": max(lens), "sum": sum(lens)},
            },
            dtype=dtype_name(s.dtype),
            track=tracked(s),
            bytes_moved=nbytes,
            flops=4 * sum(lens) * p["Hq"] * p["D"],
        )
    )


# ------------------------------------------------------------------------------------------ fair comparisons
def test_baselines_compute_what_ours_computes(bench_session):
    """Every attention baseline timed above returns what the reference returns (same work, or ratios mean nothing)."""
    s = bench_session
    tol = {"atol": 2e-2, "rtol": 2e-2} if s.dtype == torch.bfloat16 else {"atol": 1e-4, "rtol": 1e-4}
    seqs = bounds(s)
    with torch.no_grad():
        for Hk in (shapes(s)["Hq"], shapes(s)["gqa_Hk"]):
            x = setup_varlen(s, Hk)()
            ref = flash_attn_varlen_ref(
                x["q"],
                x["k"],
                x["v"],
                x["cu_seqlens"],
                x["cu_seqlens"],
                x["max_seqlen"],
                x["max_seqlen"],
                True,
                1.0 / math.sqrt(x["q"].shape[-1]),
            )
            torch.testing.assert_close(sdpa_per_sequence(SDPBackend.FLASH_ATTENTION, seqs)(**x), ref, **tol)
            tv = torch_varlen(s, gqa=Hk != shapes(s)["Hq"])
            if tv.fn is not None:
                torch.testing.assert_close(tv.fn(**x), ref, **tol)
            for name in available_backends(s.device):
                if name == "flex" and Hk != shapes(s)["Hq"]:
                    continue  # not timed on GQA (FLEX_GQA_SKIP): checking it would compile one more shape
                torch.testing.assert_close(backend_impl(s, name).fn(**x), ref, **tol, msg=lambda m, n=name: f"{n}: {m}")
        x = setup_paged(s)()
        backend = "triton" if s.is_cuda else "sdpa"
        torch.testing.assert_close(paged_attention(**x, backend=backend), paged_attention_ref(**x), **tol)
