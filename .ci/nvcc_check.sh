#!/usr/bin/env bash
# Compile-only check of every csrc/*.cu with nvcc, for sm_90 (H100/H200; one arch keeps CI short), against torch's headers (the same flags
# torch.utils.cpp_extension.load uses). Needs no GPU: it catches syntax, template and API errors before a GPU
# machine builds the extension for real. Usage: .ci/nvcc_check.sh   (NVCC=/path/to/nvcc to pick a compiler)
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC="${NVCC:-nvcc}"
if ! command -v "$NVCC" >/dev/null 2>&1; then
    echo "nvcc_check: $NVCC not found (install the CUDA toolkit or set NVCC=...)" >&2
    exit 1
fi

# torch's include dirs, python's include dir and the ABI flag, as cpp_extension passes them
mapfile -t FLAGS < <(python - <<'PY'
import sysconfig

import torch
import torch.utils.cpp_extension as ext

for path in ext.include_paths():
    print(f"-I{path}")
print(f"-I{sysconfig.get_paths()['include']}")
print(f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
for flag in ext.COMMON_NVCC_FLAGS:
    print(flag)
PY
)

OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
status=0
shopt -s nullglob
for src in csrc/*.cu; do
    name="$(basename "$src" .cu)"
    echo "nvcc_check: $src (sm_90)"
    if ! "$NVCC" -c "$src" -o "$OUT/$name.o" -std=c++20 -O3 \
        -gencode arch=compute_90,code=sm_90 \
        -DTORCH_EXTENSION_NAME="$name" -DTORCH_API_INCLUDE_EXTENSION_H -Xcompiler -fPIC \
        "${FLAGS[@]}"; then
        echo "nvcc_check: FAILED $src" >&2
        status=1
    fi
done
exit $status
