#!/usr/bin/env bash
# The main job on whatever device is present (bench/main.py): environment report, parity summary,
# uk.accelerate vs eager and torch.compile on UniFormer-S, XXS, video S and dense S hybrid
# (inference and a training step) with a short op summary, then one compact table and a plot.
# Results go to a fresh bench/results/runs/<host-slug>-<time>/ (untracked).
# Run through `make main` (which sets up the virtualenv first). MAIN_ARGS: --quick (smoke run),
# --full (the whole suite, about an hour on 2 CPU cores), --results-dir bench/results (to commit),
# other arguments go to the benchmarks' pytest (e.g. --threads 1).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${VENV:-.venv}/bin/python"
read -r -a extra <<< "${MAIN_ARGS:-}"
exec "$PY" -m bench.main "${extra[@]}"
