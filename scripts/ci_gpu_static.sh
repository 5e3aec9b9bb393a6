#!/usr/bin/env bash
# CI: the ahead-of-time GPU check (bench/gpu_static.py) under the main venv's Triton (.venv, the
# newest) and under Triton 3.6 (the GPU machine's) in a second venv, plus the Triton interpreter
# tests under 3.6. No GPU needed. Run from the repository root after `make test` made .venv.
#   GPU_STATIC_ARGS   the check's scope (default: one compile per kernel configuration, all four
#                     dtypes, sm_80 and sm_90, under both Triton versions: ~700 compiles each, ~5 min
#                     on 2 quiet cores) - the full set (`--scope full`) is ~1500 compiles
# Spills listed in bench/results/gpu-static/known_spills.txt are reported as open defects, not
# failures; any other spill, any compile failure and any shared-memory overflow fails the run.
#   VENV36            the Triton 3.6 venv (default .venv-triton36, reused when present)
#   NVCC              nvcc for the CUDA rows (default /usr/local/cuda-13.0/bin/nvcc)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
start=$SECONDS
log() { echo "[ci-gpu-static +$((SECONDS - start))s] $*"; }
out=${GPU_STATIC_OUT:-$(mktemp -d)}
NVCC=${NVCC:-/usr/local/cuda-13.0/bin/nvcc}
VENV36=${VENV36:-.venv-triton36}
export TRITON_DEFAULT_FP_FUSION=1  # Triton's default, stated (3.9 warns when it is unset)

[[ -x .venv/bin/python ]] || { echo "[ci-gpu-static] ERROR: .venv missing (run make test first)" >&2; exit 1; }

log "AOT check, $(.venv/bin/python -c 'import triton; print("triton", triton.__version__)')"
.venv/bin/python -m bench.gpu_static --json "$out/newest.json" --md "$out/newest.md" --nvcc "$NVCC" \
    --known-spills bench/results/gpu-static/known_spills.txt ${GPU_STATIC_ARGS:---scope configs} \
    | grep -v '^|'

if [[ ! -x $VENV36/bin/python ]]; then
    log "creating $VENV36 (torch 2.13.0 CPU, triton 3.6.0, numpy<2.3, pytest)"
    python3 -m venv "$VENV36"
    "$VENV36/bin/python" -m pip install --quiet torch==2.13.0 triton==3.6.0 'numpy<2.3' pytest
fi
# the package from the source tree (no build: the Triton paths and the check do not need the C++
# extension), and models/ under its installed name uniformer_models
mkdir -p "$VENV36/src"
ln -sfn "$PWD/models" "$VENV36/src/uniformer_models"
export PYTHONPATH=$PWD:$PWD/$VENV36/src${PYTHONPATH:+:$PYTHONPATH}
log "AOT check, $("$VENV36/bin/python" -c 'import triton; print("triton", triton.__version__)')"
"$VENV36/bin/python" -m bench.gpu_static --json "$out/triton36.json" --md "$out/triton36.md" --no-cuda \
    --known-spills bench/results/gpu-static/known_spills.txt ${GPU_STATIC_ARGS:---scope configs} \
    | grep -v '^|'

# The kernels' own tests and the three ops' Triton cases (~5 min on 2 quiet cores).
log "Triton interpreter tests under triton 3.6"
TRITON_INTERPRET=1 "$VENV36/bin/python" -m pytest -q -p no:cacheprovider \
    tests/test_triton_depthwise_kernels.py tests/test_attention.py tests/test_depthwise.py -k triton
log "done; tables in $out"
