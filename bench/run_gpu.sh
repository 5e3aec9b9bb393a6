#!/usr/bin/env bash
# One shot on a lent GPU machine: install, environment report, tests, model benchmarks.
#
#   bash bench/run_gpu.sh OUT_DIR        (from the repository root; OUT_DIR defaults to $OUT)
#
# Uses that machine's python3 (torch + Triton preinstalled; no network: --no-deps, no build
# isolation). Every step runs under `timeout`, its exit code and duration go to summary.txt, and
# the script always continues: a failed install or test run still leaves the benches to run.
# The whole script keeps within UK_TOTAL_S seconds (default 540, for a 10-minute command limit).
#
# Files written (the device tool brings back at most 8 files, two folders deep):
#   OUT/env.txt       nvidia-smi, versions, pip install log, `python3 -m uniformer_kernels`
#   OUT/tests.txt     pytest -m gpu tests, then the rest of tests/
#   OUT/bench.txt     bench/bench_models.py output (bf16, then fp32)
#   OUT/summary.txt   step / exit code / seconds, then the results tables
#   OUT/results/<device-slug>/models.{json,md,png}
#
# Environment knobs:
#   UK_TOTAL_S=540            wall-time budget for the whole script
#   UK_SKIP_INSTALL=1         don't pip install (import from the source tree instead)
#   UK_SKIP_TESTS=1           don't run tests/
#   UK_MODELS_BF16=...        comma list for the bf16 model bench (default: a priority order, all)
#   UK_MODELS_FP32=...        comma list for the fp32 model bench (default: a few)
#   UK_BENCH_ARGS="..."       extra arguments for both bench runs (e.g. "--modes fwd --batch 16")
#   UK_GIT_COMMIT=<sha>       recorded in the results (the copied tree may have no .git)
set -u

OUT_DIR=${1:-${OUT:-}}
if [ -z "$OUT_DIR" ]; then
    echo "usage: bash bench/run_gpu.sh OUT_DIR" >&2
    exit 2
fi
mkdir -p "$OUT_DIR/results"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)

TOTAL_S=${UK_TOTAL_S:-540}
PY=${PYTHON:-python3}
SUMMARY="$OUT_DIR/summary.txt"
ENV_TXT="$OUT_DIR/env.txt"
TESTS_TXT="$OUT_DIR/tests.txt"
BENCH_TXT="$OUT_DIR/bench.txt"
: >"$SUMMARY"; : >"$ENV_TXT"; : >"$TESTS_TXT"; : >"$BENCH_TXT"

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export UK_GIT_COMMIT=${UK_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
# Keep compile caches inside the run (a fresh machine has none anyway).
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/uk_inductor_cache}

START=$SECONDS
remaining() { echo $(( TOTAL_S - (SECONDS - START) )); }

# step NAME CAP_S RESERVE_S LOG cmd...: run cmd under timeout min(CAP_S, remaining - RESERVE_S),
# append its output to LOG, record exit code and duration. SIGINT first so pytest still writes
# its results (sessionfinish), SIGKILL 30 s later.
step() {
    local name=$1 cap=$2 reserve=$3 log=$4
    shift 4
    local left=$(( $(remaining) - reserve ))
    local limit=$(( cap < left ? cap : left ))
    if [ "$limit" -lt 10 ]; then
        printf '%-28s skipped (no time left)\n' "$name" >>"$SUMMARY"
        return 0
    fi
    {
        echo
        echo "===== $name (limit ${limit}s): $*"
    } >>"$log"
    local t0=$SECONDS
    timeout -s INT -k 30 "$limit" "$@" >>"$log" 2>&1
    local rc=$?
    local note=""
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && note=" (TIMED OUT at ${limit}s)"
    [ "$rc" -eq 130 ] && note=" (interrupted)"
    printf '%-28s rc=%-4s %4ss%s\n' "$name" "$rc" "$(( SECONDS - t0 ))" "$note" >>"$SUMMARY"
    echo "===== $name: rc=$rc$note" >>"$log"
    return 0
}

echo "run_gpu.sh: repo $REPO, out $OUT_DIR, budget ${TOTAL_S}s, commit $UK_GIT_COMMIT" >>"$SUMMARY"

# 1. environment
step "nvidia-smi" 30 0 "$ENV_TXT" nvidia-smi
step "versions" 60 0 "$ENV_TXT" "$PY" -c "
import sys, torch
print('python', sys.version.split()[0], sys.executable)
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())
if torch.cuda.is_available():
    print('device', torch.cuda.get_device_name(), torch.cuda.get_device_capability())
try:
    import triton; print('triton', triton.__version__)
except Exception as e: print('triton: not importable:', e)
for m in ('pytest', 'pytest_benchmark', 'matplotlib', 'numpy'):
    try: mod = __import__(m); print(m, getattr(mod, '__version__', '?'))
    except Exception as e: print(m, 'MISSING', e)
"

# 2. install (leave at least 5 minutes for tests and benches)
if [ "${UK_SKIP_INSTALL:-0}" != "1" ]; then
    step "pip install" 240 300 "$ENV_TXT" "$PY" -m pip install --no-deps --no-build-isolation -e .
fi
step "python -m uniformer_kernels" 60 240 "$ENV_TXT" "$PY" -m uniformer_kernels

# 3. tests: GPU-marked first (they are what this machine is for), then the rest
if [ "${UK_SKIP_TESTS:-0}" != "1" ]; then
    step "pytest -m gpu tests" 120 200 "$TESTS_TXT" "$PY" -m pytest -m gpu tests -q -rfEs
    step "pytest -m 'not gpu' tests" 90 200 "$TESTS_TXT" "$PY" -m pytest -m "not gpu" tests -q -rfEs
fi

# 4. model benchmarks: bf16 (the GPU default), then fp32 on a few models. Results are written
# after every case, so a run cut short by the time limit still leaves its rows.
MODELS_BF16=${UK_MODELS_BF16:-uniformer_small,uniformer_xxs,uniformer_small_video,dense_small_hybrid,dense_xxs,uniformer_base,uniformer_small_plus,uniformer_xs,uniformer_base_video,uniformer_small_plus_dim64,uniformer_base_ls,uniformer_large_ls}
MODELS_FP32=${UK_MODELS_FP32:-uniformer_small,uniformer_xxs}
left=$(remaining)
bf16_cap=$(( (left - 30) * 65 / 100 ))
# shellcheck disable=SC2086
step "bench models bf16" "$bf16_cap" 60 "$BENCH_TXT" "$PY" -m pytest bench/bench_models.py -s -q \
    --dtype bf16 --models "$MODELS_BF16" --results-dir "$OUT_DIR/results" ${UK_BENCH_ARGS:-}
# shellcheck disable=SC2086
step "bench models fp32" 100000 25 "$BENCH_TXT" "$PY" -m pytest bench/bench_models.py -s -q \
    --dtype fp32 --models "$MODELS_FP32" --results-dir "$OUT_DIR/results" ${UK_BENCH_ARGS:-}

# 5. re-render tables and plots from whatever JSON exists (covers runs that were cut short)
shopt -s nullglob
jsons=("$OUT_DIR"/results/*/*.json)
if [ ${#jsons[@]} -gt 0 ]; then
    step "render results" 60 0 "$BENCH_TXT" "$PY" -m bench.results "${jsons[@]}"
fi

{
    echo
    echo "total ${SECONDS}s"
    echo
    echo "== tests (last lines)"
    grep -E "passed|failed|error|no tests ran" "$TESTS_TXT" | tail -n 6
    for md in "$OUT_DIR"/results/*/*.md; do
        echo
        echo "== $md"
        cat "$md"
    done
    echo
    echo "== files"
    (cd "$OUT_DIR" && find . -type f | sort)
} >>"$SUMMARY"
cat "$SUMMARY"
exit 0
