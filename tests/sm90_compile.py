"""Compile every Triton kernel for sm_90 (H100/H200) on a machine without a GPU.

    python tests/sm90_compile.py [--json OUT.json]      # TRITON_INTERPRET must be unset (or 0)

The CPU tests run the kernels through Triton's interpreter, which never compiles them: it accepts programs the
GPU compiler rejects (a `tl.dot` tile under 16, a dtype an instruction lacks) and never sees shared memory. This
script runs Triton's real compiler (TTIR -> TTGIR -> LLVM -> PTX -> ptxas cubin, the ptxas that ships inside the
triton wheel) for an sm_90 target, through our own launchers, with the dtypes and shapes the model uses. No
kernel runs: a stand-in driver answers the JIT's questions about the device (target, device id, stream) and
every launch is turned into Triton's `warmup` (compile only). Autotuned kernels compile every config.

Checks: every launch compiles to a cubin; every kernel's shared memory fits an H100's 227 KiB per block (Triton
raises `OutOfResources` at load time otherwise; an autotuner skips such configs, so there only one fitting config
per launch is required). Exit status 1 on any failure; `tests/test_sm90_compile.py` runs this in CI (without the
fp32 attention configs: ~6 min of compiling on 2 cores). `--selftest` shows the check catches an oversized kernel.
Not covered: register spills and anything only a run shows (numerics, speed): that is `pytest -m gpu` on a GPU.
The script relies on Triton internals (`JITFunction.run`, `Autotuner.run`, the active driver) as of Triton 3.6-3.9.
To check the GPU machine's Triton too: `python -m venv --system-site-packages /tmp/t36 && /tmp/t36/bin/pip install
triton==3.6.0`, then run this script with `/tmp/t36/bin/python`. (That run found the NF4 GEMM and grad-x kernels
failing to compile under Triton 3.6 in bf16/fp16, which 3.9 and the interpreter accepted.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "0")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.driver import driver as triton_driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

SM90_MAX_SHARED = 232448  # bytes per block with the opt-in (cudaDevAttrMaxSharedMemoryPerBlockOptin on H100/H200)


class CompileOnlyDriver:
    """What Triton's JIT asks the active driver before a launch, answered for an sm_90 device that is not here."""

    def __init__(self, capability: int = 90, warp_size: int = 32):
        self.target = GPUTarget("cuda", capability, warp_size)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True


class Recorder:
    """Patches the JIT so that every launch compiles (warmup) instead of running; keeps what was compiled."""

    def __init__(self):
        self.compiled: list[dict] = []
        self.case = ""
        self._tuned_keys: set[str] = set()  # the current autotune config's kwargs, while compiling its configs

    def install(self) -> None:
        run, recorder = JITFunction.run, self

        def compile_only_run(fn, *args, grid, warmup, **kwargs):
            start = time.perf_counter()
            kernel = run(fn, *args, grid=grid, warmup=True, **kwargs)
            recorder.compiled.append(
                {
                    "case": recorder.case,
                    "kernel": fn.fn.__name__,
                    "autotuned": bool(recorder._tuned_keys),
                    "num_warps": kernel.metadata.num_warps,
                    "num_stages": kernel.metadata.num_stages,
                    "shared_bytes": kernel.metadata.shared,
                    "cubin_bytes": len(kernel.asm.get("cubin", b"")),
                    # the launch's own arguments, then the autotune config's (block sizes, warps, stages)
                    "constexprs": {
                        k: v
                        for k, v in kwargs.items()
                        if isinstance(v, (int, bool, str)) and k not in recorder._tuned_keys
                    },
                    "config": {k: v for k, v in kwargs.items() if k in recorder._tuned_keys},
                    "compile_s": round(time.perf_counter() - start, 2),
                }
            )
            return kernel

        def autotune_all(tuner, *args, **kwargs):
            # compile every config (what the autotuner would benchmark); no grid is needed to compile
            kwargs.pop("grid", None)
            kwargs.pop("warmup", None)
            try:
                for config in tuner.configs:
                    recorder._tuned_keys = set(config.all_kwargs())
                    tuner.fn.run(*args, grid=(1,), warmup=True, **kwargs, **config.all_kwargs())
            finally:
                recorder._tuned_keys = set()

        JITFunction.run = compile_only_run
        Autotuner.run = autotune_all
        triton_driver.set_active(CompileOnlyDriver())


def _force_triton() -> None:
    """The ops take their Triton path for CPU tensors (their `use_triton` refuses CPU without the interpreter)."""
    for name, module in list(sys.modules.items()):
        if name.startswith("fastllava.kernels.") and hasattr(module, "use_triton"):
            module.use_triton = lambda *tensors: True


# ---------------------------------------------------------------------------------------------------- cases
# Shapes: LLaVA-1.5-7B (Llama-7B: hidden 4096, 32 heads of 128, MLP 11008; CLIP-L/14-336: 1024 wide, 16 heads of
# 64, 576 patches), GQA and sliding-window (Mistral: 8 KV heads), a 64-wide head (Qwen2-0.5B), and odd sizes that
# switch off Triton's divisible-by-16 specialisation. dtypes: bf16 (the GPU default), fp16, fp32 (tests).

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _t(*shape, dtype=torch.float32, grad=False):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


def case_rms_norm(dtype):
    from fastllava.kernels import rms_norm

    for rows, n in ((4099, 4096), (7, 1000)):
        w = _t(n, dtype=dtype, grad=True)
        y = rms_norm(_t(rows, n, dtype=dtype, grad=True), w, 1e-6)
        y.sum().backward()
        y, h = rms_norm(_t(rows, n, dtype=dtype, grad=True), w, 1e-6, residual=_t(rows, n, dtype=dtype, grad=True))
        (y.sum() + h.sum()).backward()


def case_rotary(dtype):
    from fastllava.kernels import apply_rotary, apply_rotary_, rotary_cos_sin

    for tokens, hq, hk, d in ((513, 32, 32, 128), (9, 14, 2, 64)):
        cos, sin = rotary_cos_sin(d, 4096, dtype=dtype)
        pos = torch.randint(0, 4096, (tokens,))
        q, k = apply_rotary(_t(tokens, hq, d, dtype=dtype, grad=True), _t(tokens, hk, d, dtype=dtype, grad=True),
                            cos, sin, pos)  # fmt: skip
        (q.sum() + k.sum()).backward()
        apply_rotary_(_t(tokens, hq, d, dtype=dtype), _t(tokens, hk, d, dtype=dtype), cos, sin, pos)


def case_projector_mlp(dtype):
    from fastllava.kernels import projector_mlp

    # LLaVA-1.5-7B (two-stage path: 4096 outputs), a narrow projector (fused path), odd sizes
    for m, k, h, n in ((1153, 1024, 4096, 4096), (37, 64, 128, 128), (5, 40, 72, 56)):
        out = projector_mlp(_t(m, k, dtype=dtype, grad=True), _t(h, k, dtype=dtype, grad=True),
                            _t(h, dtype=dtype, grad=True), _t(n, h, dtype=dtype, grad=True),
                            _t(n, dtype=dtype, grad=True))  # fmt: skip
        out.sum().backward()


def case_scatter_image_tokens(dtype):
    from fastllava.kernels import scatter_image_tokens, scatter_image_tokens_

    for d, counts in ((4096, [576, 576, 2880]), (100, [3, 0, 5])):
        counts_t = torch.tensor(counts)
        offsets = torch.cumsum(counts_t, 0) - counts_t + torch.arange(len(counts)) * 7
        total = int(offsets[-1] + counts_t[-1]) + 11
        out = scatter_image_tokens(_t(total, d, dtype=dtype, grad=True), _t(sum(counts), d, dtype=dtype, grad=True),
                                   offsets, counts_t)  # fmt: skip
        out.sum().backward()
        with torch.no_grad():
            scatter_image_tokens_(_t(total, d, dtype=dtype), _t(sum(counts), d, dtype=dtype), offsets, counts_t)


def case_flash_attention(dtype):
    from fastllava.kernels.flash_attention import flash_attn_varlen_triton

    # (lengths, Hq, Hk, D, causal, window): Llama-7B causal; CLIP-L tower (bidirectional); Mistral GQA + window;
    # Qwen2-0.5B-like 64-wide heads with odd lengths
    for lens, hq, hk, d, causal, window in (
        ([700, 1200, 77], 32, 32, 128, True, None),
        ([577, 577], 16, 16, 64, False, None),
        ([300, 45], 32, 8, 128, True, 256),
        ([33, 1, 17], 14, 2, 64, True, None),
    ):
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
        total = int(cu[-1])
        q = _t(total, hq, d, dtype=dtype, grad=True)
        k, v = _t(total, hk, d, dtype=dtype, grad=True), _t(total, hk, d, dtype=dtype, grad=True)
        out = flash_attn_varlen_triton(q, k, v, cu, cu, max(lens), max(lens), causal=causal, window=window)
        out.sum().backward()


def case_paged_attention(dtype):
    from fastllava.kernels.paged_attention import paged_attention_decode_triton

    # (batch, Hq, Hk, D, block_size, window, splits): decode at batch 1 (split-K) and 64, GQA, windows
    for b, hq, hk, d, bs, window, splits in (
        (1, 32, 32, 128, 16, None, 8),
        (64, 32, 32, 128, 16, None, 1),
        (5, 32, 8, 128, 16, 4096, None),
        (3, 14, 2, 64, 13, None, 3),
    ):
        blocks = 40
        k_cache, v_cache = _t(blocks * b, bs, hk, d, dtype=dtype), _t(blocks * b, bs, hk, d, dtype=dtype)
        tables = torch.arange(blocks * b, dtype=torch.int32).reshape(b, blocks)
        lens = torch.full((b,), blocks * bs - 3, dtype=torch.int32)
        paged_attention_decode_triton(_t(b, hq, d, dtype=dtype), k_cache, v_cache, tables, lens,
                                      window=window, num_splits=splits)  # fmt: skip


def case_nf4(dtype):
    from fastllava.kernels import NestedAbsmax, nf4_dequantize, nf4_matmul

    # Llama-7B q_proj / down_proj, and an odd projection; GEMV (<= 16 rows), GEMM, grad x; nested absmax or not
    for n, k, rows in ((4096, 4096, (1, 16, 300)), (4096, 11008, (1, 200)), (50, 100, (3, 33))):
        n_blocks = -(-n * k // 64)
        qweight = torch.randint(0, 255, (n * k // 2, 1), dtype=torch.uint8)
        for nested in (None, NestedAbsmax(torch.rand(-(-n_blocks // 256)), torch.randn(256), torch.tensor(0.1))):
            absmax = torch.randint(0, 255, (n_blocks,), dtype=torch.uint8) if nested else torch.rand(n_blocks)
            nf4_dequantize(qweight, absmax, (n, k), 64, dtype, nested)
            for m in rows:
                x = _t(m, k, dtype=dtype, grad=m > 16)
                out = nf4_matmul(x, qweight, absmax, (n, k), 64, _t(n, dtype=dtype), nested)
                if m > 16:
                    out.sum().backward()


CASES = {
    "rms_norm": case_rms_norm,
    "rotary": case_rotary,
    "projector_mlp": case_projector_mlp,
    "scatter_image_tokens": case_scatter_image_tokens,
    "flash_attention": case_flash_attention,
    "paged_attention": case_paged_attention,
    "nf4": case_nf4,
}


def selftest(recorder: Recorder) -> int:
    """Exit 0 when a small kernel compiles to a cubin and the same kernel on tiles too big for an H100's shared
    memory (which Triton's interpreter runs happily, and the GPU refuses at load time) is flagged by `check`."""
    import triton.language as tl

    @triton.jit
    def _square_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        a = tl.load(x_ptr + offs[:, None] * BLOCK + offs[None, :])
        tl.store(y_ptr + offs[:, None] * BLOCK + offs[None, :], tl.dot(a, a))

    for block in (16, 256):
        x = torch.zeros(block, block)
        _square_kernel[(1,)](x, x, BLOCK=block)
        print(f"selftest: BLOCK={block}: {recorder.compiled[-1]['shared_bytes']} B shared, "
              f"{recorder.compiled[-1]['cubin_bytes']} B cubin")  # fmt: skip
    small, big = recorder.compiled[-2:]
    ok = small["cubin_bytes"] > 0 and not check([small]) and len(check([big])) == 1
    print("selftest:", "passed" if ok else "FAILED", file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


def check(records: list[dict]) -> list[str]:
    """Shared-memory problems: any plain kernel over the limit; an autotuned launch with no config under it."""
    problems, tuned = [], {}
    for r in records:
        fits = r["shared_bytes"] <= SM90_MAX_SHARED
        if r["autotuned"]:
            key = (r["case"], r["kernel"], json.dumps(r["constexprs"], sort_keys=True))
            tuned[key] = tuned.get(key, False) or fits
        elif not fits:
            problems.append(f"{r['case']}: {r['kernel']} needs {r['shared_bytes']} B of shared memory ({r})")
    problems += [f"{c}: no config of {k} fits shared memory ({s})" for (c, k, s), ok in tuned.items() if not ok]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write every compiled kernel's record here")
    parser.add_argument("--cases", nargs="*", choices=sorted(CASES), help="a subset of the cases (default: all)")
    parser.add_argument("--dtypes", nargs="*", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--selftest", action="store_true", help="show that a kernel only ptxas rejects fails")
    parser.add_argument("--exclude", nargs="*", default=[], help="case[dtype] pairs to leave out")
    args = parser.parse_args(argv)

    import fastllava.kernels.flash_attention  # noqa: F401  (defines the kernels)
    import fastllava.kernels.paged_attention  # noqa: F401

    if not isinstance(sys.modules["fastllava.kernels.rms_norm"]._rms_norm_fwd_kernel, JITFunction):
        sys.exit("sm90_compile: the kernels were defined for the interpreter: unset TRITON_INTERPRET")
    recorder = Recorder()
    recorder.install()
    if args.selftest:
        return selftest(recorder)
    _force_triton()
    dtypes = [getattr(torch, d) for d in args.dtypes] if args.dtypes else DTYPES
    failures = []
    start = time.perf_counter()
    for name in args.cases or CASES:
        for dtype in dtypes:
            recorder.case = f"{name}[{str(dtype).removeprefix('torch.')}]"
            if recorder.case in args.exclude:
                continue
            before = len(recorder.compiled)
            try:
                CASES[name](dtype)
            except Exception:
                failures.append(f"{recorder.case}: compile failed\n{traceback.format_exc()}")
            n = len(recorder.compiled) - before
            print(f"{recorder.case:32s} {n:3d} launches compiled", flush=True)
    failures += check(recorder.compiled)
    shared = max((r["shared_bytes"] for r in recorder.compiled), default=0)
    elapsed = time.perf_counter() - start
    print(f"{len(recorder.compiled)} launches compiled for sm_90 in {elapsed:.0f} s (triton {triton.__version__}); "
          f"max shared memory {shared} B")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "kernels": recorder.compiled, "failures": failures}, f, indent=1)
    for failure in failures:
        print("FAIL", failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
