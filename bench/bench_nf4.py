"""Benchmarks of 4-bit (NF4) inference: the fused dequant-matmul on Llama-7B shapes, and a 4-bit vs bf16 decode.

    pytest bench/bench_nf4.py                          # CPU: the reference path on small shapes (harness only)
    pytest bench/bench_nf4.py -k up_proj               # one projection

Matmul, forward (inference), bf16 activations, weights quantized with ``fastllava.quantization.quantize_nf4``
(blocksize 64, double-quantized absmax: what ``Linear4bit`` / QLoRA checkpoints hold), Llama-7B projections
``q_proj`` (N x K = 4096 x 4096), ``up_proj`` (11008 x 4096) and ``down_proj`` (4096 x 11008), at batch 1 (decode)
and 16. The candidate ``ours`` is what ``Linear4bit`` runs: ``fastllava.csrc.nf4.nf4_gemv`` (the CUDA GEMV; it falls
back to the Triton kernel where the extension cannot be built or for more than 8 rows, and the record's
``shapes["cuda_gemv"]`` says which) at <= 8 rows, ``fastllava.kernels.nf4_matmul`` above. Baselines in the same run:
  * ``dense``: cuBLAS ``x @ W.T`` with the dequantized weight in the activation dtype (bf16 on GPU);
  * ``bnb``: ``bitsandbytes.matmul_4bit`` on bitsandbytes' own quantization of the same weight (CUDA only);
  * ``triton_gemv``: ``nf4_matmul`` (the Triton GEMV) at batch 1, beside the CUDA GEMV;
  * ``eager``: ``nf4_matmul_ref`` (dequantize to bf16, then ``F.linear``);
  * ``copy``: a device copy of the bytes the 4-bit matmul must move (packed weight + absmax + x + y): the bandwidth
    bound. ``ratios["copy"]`` is the fraction of copy bandwidth reached, ``gbps`` the achieved bandwidth.
GPU gates (h100/h200, batch 1, the issue's targets): ours >= 3 x dense, >= 2 x bitsandbytes, >= 0.75 x copy.

Decode (GPU only): tokens/s at batch 1 of a Llama-7B-*shaped* language model with random weights, bf16 vs every
decoder linear in NF4 (``quantize_model_``; lm_head stays bf16 as in LLaVA), one token over a 1024-token paged KV
cache. Time-boxed proxy: ``DECODE_LAYERS`` (4) of the 32 decoder layers (recorded in ``shapes``); eager and, where
capture works, CUDA-graph replay (launch overhead off). Recorded as ``"kind": "throughput"`` (concurrency 1); no gate.

CPU (fp32, small shapes): ours is the reference behind the dispatch; the only gate is that the dispatch does not
double the reference's time (as in bench_kernels.py).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from bench.harness import GPU, BenchSession, Case, Gate, Impl
from fastllava.config import TextConfig
from fastllava.csrc.nf4 import CUDA_GEMV_MAX_ROWS, cuda_gemv_status, nf4_gemv
from fastllava.kernels import NestedAbsmax, nf4_matmul, nf4_matmul_ref
from fastllava.model.language import AttnMetadata, KVCache, LanguageModel
from fastllava.optional import HAS_BITSANDBYTES as HAS_BNB
from fastllava.quantization import dequantize_nf4, quantize_model_, quantize_nf4

BLOCKSIZE = 64
# (N, K) per Llama-7B projection on GPU; the same aspect ratios, small, on CPU.
PROJ = {
    "gpu": {"q_proj": (4096, 4096), "up_proj": (11008, 4096), "down_proj": (4096, 11008)},
    "cpu": {"q_proj": (256, 256), "up_proj": (688, 256), "down_proj": (256, 688)},
}
BATCHES = (1, 16)
DECODE_LAYERS = 4  # of Llama-7B's 32: the time-boxed proxy (per-layer work is identical, so tokens/s scales ~1/L)
DECODE_CONTEXT = 1024

CPU_DISPATCH = Gate(
    "eager",
    0.5,
    devices=("cpu",),
    why="on CPU ours is the reference behind the dispatch; the dispatch must not double the op's time",
)
BATCH1_GATES = [
    Gate("dense", 3.0, GPU, why="decode GEMV is bandwidth-bound: 4-bit weights are ~0.28x bf16's bytes"),
    Gate("bnb", 2.0, GPU, why="the issue's target against bitsandbytes' gemv_4bit"),
    Gate("copy", 0.75, GPU, why=">= 75% of the bandwidth bound of the 4-bit weight bytes"),
]


def _gemv_state() -> str:
    """``"ok"`` or ``"fallback"`` for the records (a stable value: stored baselines compare shapes); why it fell
    back goes to the warnings summary."""
    status = cuda_gemv_status()
    if status != "ok":
        warnings.warn(f"CUDA NF4 GEMV not built, Triton fallback timed instead: {status}", stacklevel=2)
    return "ok" if status == "ok" else "fallback"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def proj_shape(session: BenchSession, proj: str) -> tuple[int, int]:
    return PROJ["gpu" if session.is_cuda else "cpu"][proj]


# --------------------------------------------------------------------------------------------- matmul
def quantized_weight(session: BenchSession, N: int, K: int) -> dict[str, Any]:
    """A random [N, K] weight (nn.Linear's scale), its NF4 quantization and the bf16 (CPU: fp32) dequantized copy."""
    g = torch.Generator(device=session.device).manual_seed(0)
    w = torch.randn(N, K, device=session.device, generator=g) * K**-0.5
    packed, state = quantize_nf4(w, BLOCKSIZE, compress_statistics=True)
    return {
        "qweight": packed,  # uint8 [N*K/2, 1]
        "absmax": state.absmax,  # uint8 [N*K/64] (double-quantized)
        "nested": state.nested,
        "w": dequantize_nf4(packed, state, session.dtype),  # the dense baseline multiplies the same values
        "w_fp32": w,
    }


def setup_matmul(session: BenchSession, weight: dict[str, Any], M: int, K: int) -> Callable[[], dict[str, Any]]:
    def make() -> dict[str, Any]:
        # fresh activations; the (large) weights are shared by every implementation
        x = torch.randn(M, K, device=session.device, dtype=session.dtype)
        return {"x": x, **{k: weight[k] for k in ("qweight", "absmax", "nested", "w")}}

    return make


def nf4_bytes(session: BenchSession, M: int, N: int, K: int) -> int:
    """Packed weight + 8-bit absmax + its fp32 nested absmax, x read, y written."""
    blocks = N * K // BLOCKSIZE
    e = session.dtype.itemsize
    return N * K // 2 + blocks + 4 * -(-blocks // 256) + M * K * e + M * N * e


def bnb_impl(session: BenchSession, weight: dict[str, Any]) -> tuple[Impl, Any]:
    """``bitsandbytes.matmul_4bit`` on bnb's own NF4 quantization of the weight, and bnb's (packed, state)."""
    if not session.is_cuda:
        return Impl.missing("bnb", "bitsandbytes is timed on CUDA only"), None
    if not HAS_BNB:
        return Impl.missing("bnb", "bitsandbytes is not installed (pip install bitsandbytes)"), None
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf

        packed, state = bnbf.quantize_4bit(
            weight["w_fp32"].to(session.dtype), blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4"
        )
    except (ImportError, RuntimeError, OSError) as e:  # a bnb build without this GPU's kernels
        return Impl.missing("bnb", f"bitsandbytes unusable here: {type(e).__name__}: {e}"), None
    # bnb's documented inference call: the packed weight transposed, its quant_state (gemv_4bit at batch 1)
    return Impl("bnb", lambda x, **_: bnb.matmul_4bit(x, packed.t(), quant_state=state)), (packed, state)


def ours_fn(N: int, K: int, M: int) -> Callable[..., torch.Tensor]:
    """What ``Linear4bit.forward`` runs at inference: the CUDA GEMV shim at <= 8 rows, the fused matmul above."""
    op = nf4_gemv if M <= CUDA_GEMV_MAX_ROWS else nf4_matmul
    return lambda x, qweight, absmax, nested, **_: op(x, qweight, absmax, (N, K), BLOCKSIZE, None, nested)


@pytest.mark.parametrize("M", BATCHES)
@pytest.mark.parametrize("proj", list(PROJ["gpu"]))
def test_nf4_matmul(bench, proj, M):
    s = bench.session
    N, K = proj_shape(s, proj)
    weight = quantized_weight(s, N, K)
    nbytes = nf4_bytes(s, M, N, K)
    bnb, _ = bnb_impl(s, weight)

    def ref(x, qweight, absmax, nested, **_):
        return nf4_matmul_ref(x, qweight, absmax, (N, K), BLOCKSIZE, None, nested)

    def fused(x, qweight, absmax, nested, **_):
        return nf4_matmul(x, qweight, absmax, (N, K), BLOCKSIZE, None, nested)

    if s.is_cuda and M <= CUDA_GEMV_MAX_ROWS:
        triton_gemv = Impl("triton_gemv", fused)
    else:
        triton_gemv = Impl.missing("triton_gemv", "same kernel as ours here" if s.is_cuda else "Triton runs on CUDA")
    bench.run(
        Case(
            name=f"nf4_{proj}_m{M}",
            mode="fwd",
            setup=setup_matmul(s, weight, M, K),
            candidate=Impl("ours", ours_fn(N, K, M)),
            baselines=[
                Impl("dense", lambda x, w, **_: F.linear(x, w)),
                bnb,
                triton_gemv,
                Impl("eager", ref),
                s.copy_bound(nbytes),
            ],
            gates=(BATCH1_GATES if M == 1 else []) + [CPU_DISPATCH],
            shapes={
                "x": [M, K],
                "w": [N, K],
                "blocksize": BLOCKSIZE,
                "double_quant": True,
                "cuda_gemv": _gemv_state() if s.is_cuda and M <= CUDA_GEMV_MAX_ROWS else "n/a",
            },
            dtype=dtype_name(s.dtype),
            track=None if s.is_cuda else ("eager",),
            bytes_moved=nbytes,
            flops=2 * M * N * K,
        )
    )


# --------------------------------------------------------------------------------------------- decode
def decode_step(model: LanguageModel, cache: KVCache, context: int) -> Callable[[], torch.Tensor]:
    """One decode step at batch 1: the token at position ``context - 1`` over a paged cache of ``context`` keys."""
    dev = model.embed_tokens.weight.device
    blocks = -(-context // cache.block_size)
    meta = AttnMetadata(
        cu_seqlens=torch.tensor([0, 1], dtype=torch.int32, device=dev),
        max_seqlen=1,
        slot_mapping=torch.tensor([context - 1], dtype=torch.long, device=dev),
        block_tables=torch.arange(blocks, dtype=torch.int32, device=dev)[None],  # (1, blocks)
        context_lens=torch.tensor([context], dtype=torch.int32, device=dev),
        decode=True,
    )
    ids = torch.tensor([7], device=dev)
    pos = torch.tensor([context - 1], device=dev)

    def step() -> torch.Tensor:
        with torch.no_grad():
            h = model(model.embed_tokens(ids), pos, meta, cache, max_position=context)  # (1, D)
            return model.lm_head(h)  # (1, V): serving computes logits at the last token only

    return step


def cuda_graph(step: Callable[[], torch.Tensor]) -> Impl | str:
    """``step`` captured in a CUDA graph (its replay), or why capture failed."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # Triton compiles, the CUDA GEMV extension build, rope tables: all before capture
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            step()
    except RuntimeError as e:  # an op that syncs or allocates on the host inside capture
        return f"CUDA graph capture failed: {e}"
    return graph.replay


def test_nf4_decode_tokens_per_s(bench):
    s = bench.session
    if not s.is_cuda:
        pytest.skip("decode tokens/s of a 7B-shaped model needs a GPU")
    cfg = TextConfig(num_hidden_layers=DECODE_LAYERS)  # Llama-7B widths: 4096 hidden, 11008 MLP, 32 x 128 heads
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(s.device):
            bf16 = LanguageModel(cfg).eval()  # random weights: speed does not depend on them
    finally:
        torch.set_default_dtype(previous)
    nf4 = quantize_model_(copy.deepcopy(bf16))  # every decoder linear -> Linear4bit (NF4, double-quant, bs 64)
    cache = KVCache(cfg, num_blocks=-(-DECODE_CONTEXT // 16), block_size=16, device=s.device, dtype=torch.bfloat16)
    steps = {"nf4": decode_step(nf4, cache, DECODE_CONTEXT), "bf16": decode_step(bf16, cache, DECODE_CONTEXT)}
    graphs = {}
    with s.kernels():  # capture the Triton path, as bench.run times the eager steps
        for name, step in steps.items():
            got = cuda_graph(step)
            graphs[f"{name}_graph"] = (
                Impl.missing(f"{name}_graph", got) if isinstance(got, str) else Impl(f"{name}_graph", got, raw=True)
            )
    rec = bench.run(
        Case(
            name="nf4_decode_7b_proxy",
            mode="fwd",
            setup=dict,
            candidate=Impl("ours", steps["nf4"], raw=True),
            baselines=[Impl("bf16", steps["bf16"], raw=True), *graphs.values()],
            shapes={
                "layers": DECODE_LAYERS,
                "of_layers": 32,
                "hidden": cfg.hidden_size,
                "intermediate": cfg.intermediate_size,
                "heads": cfg.num_attention_heads,
                "batch": 1,
                "context": DECODE_CONTEXT,
                "note": f"7B-shaped proxy: {DECODE_LAYERS} of 32 decoder layers, random weights; lm_head bf16",
                "cuda_gemv": _gemv_state(),
            },
            dtype="bfloat16",
        )
    )
    for impl, m in rec["impls"].items():
        series = {"ours": "nf4", "bf16": "bf16"}.get(impl, impl)
        s.record(
            {
                "kind": "throughput",
                "name": f"decode_7b_{DECODE_LAYERS}layers",
                "series": series,
                "concurrency": 1,
                "tokens_per_s": 1e3 / m["median_ms"],
                "layers": DECODE_LAYERS,
                "context": DECODE_CONTEXT,
            }
        )
    assert rec["impls"]["ours"]["median_ms"] > 0


# ------------------------------------------------------------------------------------------ fair comparisons
def test_baselines_compute_what_ours_computes(bench_session):
    """Every 4-bit baseline timed above returns what the reference returns on the same weight bytes."""
    s = bench_session
    tol = {"atol": 3e-2, "rtol": 2e-2} if s.dtype == torch.bfloat16 else {"atol": 1e-4, "rtol": 1e-4}
    N, K = proj_shape(s, "q_proj")
    weight = quantized_weight(s, N, K)
    bnb, bnb_weight = bnb_impl(s, weight)
    with torch.no_grad():
        for M in BATCHES:
            x = setup_matmul(s, weight, M, K)()
            ref = nf4_matmul_ref(x["x"], x["qweight"], x["absmax"], (N, K), BLOCKSIZE, None, x["nested"])
            torch.testing.assert_close(ours_fn(N, K, M)(**x), ref, **tol)
            torch.testing.assert_close(
                nf4_matmul(x["x"], x["qweight"], x["absmax"], (N, K), BLOCKSIZE, None, x["nested"]), ref, **tol
            )
            torch.testing.assert_close(F.linear(x["x"], x["w"]), ref, **tol)
            if bnb.fn is not None:  # bnb's bytes through our reference: same format, same product
                packed, state = bnb_weight
                nested = NestedAbsmax(state.state2.absmax, state.state2.code, state.offset, state.state2.blocksize)
                bnb_ref = nf4_matmul_ref(x["x"], packed, state.absmax, (N, K), BLOCKSIZE, None, nested)
                torch.testing.assert_close(bnb.fn(**x), bnb_ref, **tol)
