# Sourced by scripts/gpu_check.sh and bench/run_gpu.sh:  gpu_prelude NAME USAGE CPU_HINT "$@"
# Checks the arguments, sets OUT (the output folder, created) and cds to the repository root; exits 3 when torch
# sees no CUDA device; installs the wheels carried in .whl/ (the GPU machine has no package registry).
gpu_prelude() {
    local name=$1 usage=$2 cpu_hint=$3
    shift 3
    if [[ $# -lt 1 ]]; then
        echo "usage: $usage" >&2
        exit 2
    fi
    OUT="$(mkdir -p "$1" && cd "$1" && pwd)"
    cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
    if ! python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "$name: no CUDA device visible to torch; $cpu_hint" >&2
        exit 3
    fi
    if compgen -G ".whl/*.whl" >/dev/null; then
        python3 -m pip install --no-deps --no-index .whl/*.whl >"$OUT/pip-wheels.log" 2>&1 ||
            echo "$name: could not install the wheels in .whl/ (see $OUT/pip-wheels.log)" >&2
    fi
}
