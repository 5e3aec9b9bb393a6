#!/usr/bin/env bash
# Compile-check every csrc/cuda/*.cu with nvcc for sm_80 and sm_90, warnings as errors. The kernels
# are plain CUDA C++ (no torch headers), so this runs on any machine with nvcc, GPU or not; the
# binding files (csrc/cuda/*.cpp) need a CUDA torch: scripts/ci_cuda_build.sh builds the whole
# extension as setup.py does. This check stays as the quick one (seconds, no torch needed).
#   NVCC  the compiler (default: nvcc on PATH)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
shopt -s nullglob
sources=(csrc/cuda/*.cu)
if (( ${#sources[@]} == 0 )); then
    echo "[cuda-check] no CUDA sources yet (csrc/cuda/*.cu)"
    exit 0
fi
NVCC=${NVCC:-nvcc}
command -v "$NVCC" >/dev/null || { echo "[cuda-check] ERROR: $NVCC not found" >&2; exit 1; }

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
failed=0
for src in "${sources[@]}"; do
    if "$NVCC" -std=c++17 -Werror all-warnings \
            -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
            -c "$src" -o "$out/$(basename "$src").o"; then
        echo "[cuda-check] ok      $src"
    else
        echo "[cuda-check] FAILED  $src" >&2
        failed=1
    fi
done
exit "$failed"
