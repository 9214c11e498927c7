#!/usr/bin/env bash
# Everything that needs a GPU, in one command that fits one ~10-minute device call (H100/H200):
#
#   bash scripts/gpu_check.sh OUTDIR [extra pytest args for the benchmark suite, e.g. -k "rms_norm or engine"]
#
# 1. the GPU-marked tests (`pytest -m gpu tests`: bf16 kernels, CUDA-graph decode, the CUDA NF4 GEMV, ...),
#    bounded by TESTS_TIMEOUT seconds (default 200), log and JUnit XML in OUTDIR/tests.*;
# 2. the benchmark suite through bench/run_gpu.sh into OUTDIR/bench (results.jsonl, plots/summary.md, env.txt),
#    bounded by BENCH_TIMEOUT (default: what is left of GPU_CHECK_BUDGET, 540 s for the whole script, at
#    least 120 s).
# Works from an uninstalled checkout (the conftests put the repository on sys.path) on a machine without a
# package registry: wheels carried in .whl/ (liger-kernel, bitsandbytes) are installed first. The exit status
# is non-zero when either phase failed; both phases always run.
set -uo pipefail

# shellcheck source=gpu_prelude.sh
source "$(dirname "${BASH_SOURCE[0]}")/gpu_prelude.sh"
gpu_prelude gpu_check.sh "bash scripts/gpu_check.sh OUTDIR [pytest args for the benchmarks...]" \
    "on CPU run: bash scripts/test.sh" "$@"
shift

start=$SECONDS
# `pytest`, not `python -m pytest` (see bench/run_gpu.sh); TRITON_INTERPRET must stay unset on the GPU
env -u TRITON_INTERPRET timeout --signal=INT --kill-after=20 "${TESTS_TIMEOUT:-200}" \
    pytest tests -m gpu -q -rfEs -p no:randomly --timeout=150 --junitxml="$OUT/tests.xml" 2>&1 | tee "$OUT/tests.log"
tests_status=${PIPESTATUS[0]}
echo "gpu_check.sh: GPU tests exit status $tests_status in $((SECONDS - start)) s" | tee -a "$OUT/tests.log"

left=$((${GPU_CHECK_BUDGET:-540} - SECONDS))
start=$SECONDS
env -u TRITON_INTERPRET BENCH_TIMEOUT="${BENCH_TIMEOUT:-$((left > 120 ? left : 120))}" \
    bash bench/run_gpu.sh "$OUT/bench" "$@"
bench_status=$?
echo "gpu_check.sh: benchmarks exit status $bench_status in $((SECONDS - start)) s"
echo "gpu_check.sh: tests $tests_status, benchmarks $bench_status; results in $OUT"
((tests_status == 0 && bench_status == 0))
