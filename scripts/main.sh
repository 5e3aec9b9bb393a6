#!/usr/bin/env bash
# The main job on whatever device is present: environment report, parity summary (reference and
# uk.accelerate vs float64), the accelerated models' speed-up table, and every variant eager vs
# torch.compile.
# Run through `make main` (which sets up the virtualenv first). MAIN_ARGS=--quick: a smoke run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${VENV:-.venv}/bin/python"
read -r -a extra <<< "${MAIN_ARGS:-}"
start=$SECONDS

step() { printf '\n==== %s (%d s) ====\n' "$1" $((SECONDS - start)); }

step "environment"
"$PY" -m uniformer_kernels

step "parity vs float64 eager"
"$PY" -m bench.parity "${extra[@]}"

step "benchmarks: uk.accelerate end to end vs eager and torch.compile"
"$PY" -m pytest bench/bench_accelerate.py -s -q -p no:cacheprovider "${extra[@]}"

step "benchmarks: every variant, eager vs torch.compile"
"$PY" -m pytest bench/bench_models.py -s -q -p no:cacheprovider "${extra[@]}"

step "done"
