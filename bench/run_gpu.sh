#!/usr/bin/env bash
# The whole GPU benchmark suite in one command (~5-10 minutes on an H100/H200), results + plots in one folder:
#
#   bash bench/run_gpu.sh OUTDIR [extra pytest args, e.g. -k rms_norm or --update-baselines]
#
# OUTDIR gets: results.jsonl (one record per benchmark), pytest-benchmark.json, pytest.log, env.txt, plots/
# (speedup_<device>.png, memory_<device>.png, summary.md). The exit status is pytest's: non-zero when a gate
# failed. BENCH_TIMEOUT (seconds, default 540) bounds the pytest run so the plots are still drawn after it.
# Liger-Kernel and bitsandbytes baselines need `liger_kernel` / `bitsandbytes` importable; on a machine without
# network, wheels placed in .whl/ (e.g. `pip download --no-deps liger-kernel bitsandbytes -d .whl/` on a connected
# machine, for the GPU machine's Python) are installed from there.
set -uo pipefail

# shellcheck source=../scripts/gpu_prelude.sh
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/gpu_prelude.sh"
gpu_prelude run_gpu.sh "bash bench/run_gpu.sh OUTDIR [pytest args...]" "for the CPU suite run: pytest bench" "$@"
shift

{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    git rev-parse HEAD
    git status --short --untracked-files=no
    nvidia-smi
    python3 - <<'EOF'
import importlib.metadata as md
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name())
for dist in ("triton", "transformers", "liger-kernel", "bitsandbytes", "pytest-benchmark", "matplotlib"):
    try:
        print(dist, md.version(dist))
    except md.PackageNotFoundError:
        print(dist, "not installed")
EOF
} >"$OUT/env.txt" 2>&1

# `pytest`, not `python -m pytest`: the latter puts the repository root first on sys.path (bench/conftest.py
# adds it, last, only when fastllava is not installed).
# The files in this order (the ops first, the end-to-end runs after; eval, not GPU-gated, last) so that a run cut
# short by BENCH_TIMEOUT keeps the most; any other bench file follows.
FILES=()
for name in kernels attention nf4 model engine train eval; do
    [[ -f "bench/bench_$name.py" ]] && FILES+=("bench/bench_$name.py")
done
for f in bench/bench_*.py bench/test_*.py; do
    [[ " ${FILES[*]} " == *" $f "* ]] || FILES+=("$f")
done
timeout --signal=INT --kill-after=30 "${BENCH_TIMEOUT:-540}" \
    pytest "${FILES[@]}" -p no:randomly -rsfEw --bench-device=cuda --bench-out "$OUT" \
    --benchmark-json "$OUT/pytest-benchmark.json" "$@" 2>&1 | tee "$OUT/pytest.log"
status=${PIPESTATUS[0]}

if [[ -s "$OUT/results.jsonl" ]]; then
    python3 -m bench.plot "$OUT/results.jsonl" --out "$OUT/plots" 2>&1 | tee -a "$OUT/pytest.log"
    echo "run_gpu.sh: results in $OUT (summary: $OUT/plots/summary.md), pytest exit status $status"
else
    echo "run_gpu.sh: no results were written (pytest exit status $status)" >&2
fi
exit "$status"
