#!/usr/bin/env bash
# The one-shot GPU acceptance run for a lent machine (bench/README.md, "GPU (run_gpu.sh)").
#
#   bash bench/run_gpu.sh [--phase 1|2|all] [--budget S] [--dry-run] OUT_DIR   (OUT_DIR: $OUT)
#
#   phase 1    build with CUDA (FORCE_CUDA=1, TORCH_CUDA_ARCH_LIST=9.0), environment report, every
#              test (pytest tests), compute-sanitizer memcheck over the CUDA tests on small shapes
#   phase 2    op benchmarks (depthwise, attention) and uk.accelerate end to end, bf16 then fp32
#              (rebuilds first unless phase 1's build of the same sources is there)
#   all        both, in one call (the default); the sanitizer then runs last, on what is left
#   --dry-run  the same plan on this CPU: no CUDA build (the interpreter's own build is checked),
#              test collection plus one small file, the sanitizer's test selection collected, the
#              benches on tiny shapes and budgets with --device cpu. Says so in every output.
#
# Uses that machine's python3 (PYTHON overrides; torch and Triton preinstalled, no network:
# pip --no-index --no-deps --no-build-isolation). Every step runs under `timeout` within the
# budget (default: phase 1 300 s, phase 2 400 s, all 540 s, dry run 340 s) and its status
# (PASS / FAIL / TIMEOUT / SKIP, or PARTIAL for a bench or the sanitizer cut short by its share of
# the budget) goes to summary.txt; a failed step never stops the next. Bench
# results are written after every case, so a step cut short keeps its rows. Exit status: 0 when
# no step failed or timed out, 1 otherwise.
#
# Files in OUT_DIR (the device tool brings back at most 8, two folders deep; this writes 7 at most):
#   summary.txt    step statuses, test counts, skip reasons, sanitizer errors, the compact tables
#                  (also printed last on stdout: the tool keeps only the last 12,000 characters)
#   env.txt        nvidia-smi, versions, tools found, build log, `python -m uniformer_kernels`
#   tests.txt      (phase 1) pytest output, then the compute-sanitizer run
#   bench.txt      (phase 2) the benches' progress lines and pytest output
#   results.json   (phase 2) every bench's rows and runs (environment, measured peaks)
#   results.md     (phase 2) the compact table, then every bench's own table
#   plots.png      (phase 2) every bench's plot, stacked
#
# Environment knobs: PYTHON, UK_CUDA_ARCHS (default 9.0), UK_TEST_WORKERS (pytest-xdist workers,
# default 8 where xdist is installed), UK_OP_BATCH (depthwise batch, default 32), UK_ATTN_BATCH
# (attention batch, default 64), UK_GIT_COMMIT (recorded in the results; the copied tree may have
# no .git), UK_SANITIZER_TESTS / UK_SANITIZER_K (the sanitizer's pytest selection).
set -u

usage() { echo "usage: bash bench/run_gpu.sh [--phase 1|2|all] [--budget S] [--dry-run] OUT_DIR" >&2; exit 2; }
PHASE=all
DRY=0
TOTAL_S=""
OUT_DIR=""
while [ $# -gt 0 ]; do
    case $1 in
        --phase) [ $# -ge 2 ] || usage; PHASE=$2; shift 2 ;;
        --phase=*) PHASE=${1#*=}; shift ;;
        --budget) [ $# -ge 2 ] || usage; TOTAL_S=$2; shift 2 ;;
        --budget=*) TOTAL_S=${1#*=}; shift ;;
        --dry-run) DRY=1; shift ;;
        -h|--help) sed -n '2,34p' "$0"; exit 0 ;;
        -*) usage ;;
        *) [ -z "$OUT_DIR" ] || usage; OUT_DIR=$1; shift ;;
    esac
done
case $PHASE in 1|2|all) ;; *) echo "--phase: 1, 2 or all, not '$PHASE'" >&2; exit 2 ;; esac
OUT_DIR=${OUT_DIR:-${OUT:-}}
[ -n "$OUT_DIR" ] || usage
if [ -z "$TOTAL_S" ]; then
    if [ "$DRY" = 1 ]; then TOTAL_S=340
    # 300 + 400 s, a machine start (1-2 min) and the transfers fit the 15 minutes of device time
    else case $PHASE in 1) TOTAL_S=300 ;; 2) TOTAL_S=400 ;; all) TOTAL_S=540 ;; esac
    fi
fi
case $TOTAL_S in ''|*[!0-9]*) echo "--budget: whole seconds, not '$TOTAL_S'" >&2; exit 2 ;; esac
RUN_P1=0; RUN_P2=0
[ "$PHASE" = 2 ] || RUN_P1=1
[ "$PHASE" = 1 ] || RUN_P2=1

mkdir -p "$OUT_DIR" || exit 2
OUT_DIR=$(cd "$OUT_DIR" && pwd)
cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)
PY=${PYTHON:-python3}
SUMMARY="$OUT_DIR/summary.txt"
ENV_TXT="$OUT_DIR/env.txt"
TESTS_TXT="$OUT_DIR/tests.txt"
BENCH_TXT="$OUT_DIR/bench.txt"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/uk_run_gpu.XXXXXX")   # bench results before packing
STEPS="$WORK/steps"
SCRATCH="$WORK/results"
: >"$SUMMARY"; : >"$ENV_TXT"; : >"$STEPS"
[ "$RUN_P1" = 1 ] && : >"$TESTS_TXT"
[ "$RUN_P2" = 1 ] && : >"$BENCH_TXT"

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export UK_GIT_COMMIT=${UK_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/uk_inductor_cache}
if [ "$DRY" = 1 ]; then
    MODE_NOTE="DRY RUN: CPU, not GPU numbers"
    export CUDA_VISIBLE_DEVICES=""   # the same plan on the CPU even where a GPU is visible
else
    MODE_NOTE="GPU run"
fi

START=$SECONDS
remaining() { echo $(( TOTAL_S - (SECONDS - START) )); }

# record NAME STATUS SECONDS NOTE: one line of the step table.
record() { printf '%s\t%s\t%s\t%s\n' "$2" "$1" "$3" "$4" >>"$STEPS"; }
failures() { awk -F'\t' '$1 == "FAIL" || $1 == "TIMEOUT"' "$STEPS" | wc -l; }

# step NAME CAP_S RESERVE_S LOG cmd...: run cmd under timeout min(CAP_S, remaining - RESERVE_S),
# output appended to LOG. SIGINT first so pytest still reports what finished, SIGKILL 10 s later.
step() {
    local name=$1 cap=$2 reserve=$3 log=$4
    shift 4
    local left=$(( $(remaining) - reserve ))
    local limit=$(( cap < left ? cap : left ))
    if [ "$limit" -lt 10 ]; then
        record "$name" SKIP 0 "no time left in the ${TOTAL_S}s budget"
        return 1
    fi
    printf '\n===== %s (limit %ss, %ss into the run): %s\n' "$name" "$limit" "$((SECONDS - START))" "$*" >>"$log"
    local t0=$SECONDS
    timeout -s INT -k 10 "$limit" "$@" >>"$log" 2>&1
    local rc=$?
    local status=PASS note="rc=$rc"
    if { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && [ "${UK_STEP_MAY_BE_CUT:-0}" = 1 ]; then
        status=PARTIAL; note="cut at ${limit}s (allowed: runs only while time is left)"
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status=TIMEOUT; note="cut at ${limit}s"
    elif [ "$rc" -ne 0 ]; then status=FAIL
    fi
    record "$name" "$status" "$((SECONDS - t0))" "$note"
    echo "===== $name: $status ($note)" >>"$log"
    [ "$status" = PASS ]
}

skip() { record "$1" SKIP 0 "$2"; }

has_module() { "$PY" -c "import $1" >/dev/null 2>&1; }

# ---- environment ---------------------------------------------------------------------------------
{
    echo "run_gpu.sh: $MODE_NOTE; phase $PHASE; budget ${TOTAL_S}s; repo $REPO; commit $UK_GIT_COMMIT"
    echo "date $(date -u +%FT%TZ); host $(uname -srm); cores $(nproc 2>/dev/null)"
} >>"$ENV_TXT"
if [ "$DRY" = 1 ]; then
    skip "nvidia-smi" "dry run: no GPU"
else
    step "nvidia-smi" 30 0 "$ENV_TXT" nvidia-smi
fi

# CUDA toolkit: nvcc for the build, compute-sanitizer for memcheck (the toolkit ships it).
find_cuda_home() {
    local c
    for c in "${CUDA_HOME:-}" "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc 2>/dev/null)" 2>/dev/null)" 2>/dev/null)" 2>/dev/null)" \
             /usr/local/cuda /usr/local/cuda-13.0; do
        [ -n "$c" ] && [ -f "$c/include/cuda_runtime.h" ] && [ -x "$c/bin/nvcc" ] && { echo "$c"; return 0; }
    done
    return 1
}
CUDA_HOME_FOUND=$(find_cuda_home || true)
find_sanitizer() {
    local c
    for c in "$(command -v compute-sanitizer 2>/dev/null)" "$CUDA_HOME_FOUND/bin/compute-sanitizer" \
             "$CUDA_HOME_FOUND/compute-sanitizer/compute-sanitizer" /usr/local/cuda/bin/compute-sanitizer; do
        [ -n "$c" ] && [ -x "$c" ] && { echo "$c"; return 0; }
    done
    find /usr/local /opt -maxdepth 4 -name compute-sanitizer -type f -perm -u+x 2>/dev/null | head -n 1
}
SANITIZER=$(find_sanitizer || true)
XDIST=0; has_module xdist && XDIST=1
PTIMEOUT=0; has_module pytest_timeout && PTIMEOUT=1
{
    echo "CUDA_HOME: ${CUDA_HOME_FOUND:-not found}"
    [ -n "$CUDA_HOME_FOUND" ] && "$CUDA_HOME_FOUND/bin/nvcc" --version | tail -n 2
    echo "compute-sanitizer: ${SANITIZER:-not found}"
    echo "pytest-xdist: $XDIST; pytest-timeout: $PTIMEOUT"
} >>"$ENV_TXT" 2>&1
step "versions" 60 0 "$ENV_TXT" "$PY" -c "
import sys, torch
print('python', sys.version.split()[0], sys.executable)
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(),
      'cudnn', torch.backends.cudnn.version())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print('device', p.name, 'capability', f'{p.major}.{p.minor}', 'SMs', p.multi_processor_count,
          'memory GiB', round(p.total_memory / 2**30, 1))
missing = []
for m in ('triton', 'numpy', 'pytest', 'pytest_benchmark', 'xdist', 'pytest_timeout', 'matplotlib', 'PIL'):
    try:
        mod = __import__(m); print(m, getattr(mod, '__version__', '?'))
    except Exception as e:
        print(m, 'MISSING', e); missing.append(m)
# triton and pytest are needed; the rest only improve the run (plots, parallel tests, timeouts)
sys.exit(1 if {'triton', 'pytest'} & set(missing) else 0)
"

# ---- build ---------------------------------------------------------------------------------------
# The key of a build: sources, python, torch, archs. Phase 2 on the same (warm) machine reuses it.
BUILD_STAMP="$REPO/build/uk_run_gpu.stamp"
CUDA_ARCHS=${UK_CUDA_ARCHS:-9.0}
build_key() {
    { echo "$CUDA_ARCHS"; "$PY" -c 'import sys, torch; print(sys.version, torch.__version__)' 2>&1
      find csrc setup.py pyproject.toml -type f -print0 | sort -z | xargs -0 sha256sum; } | sha256sum | cut -d' ' -f1
}
CHECK_CUDA_PY="
import sys
from uniformer_kernels import _extension
info = _extension.build_info()
print('extension:', info if info is not None else _extension.load_error())
sys.exit(0 if info and info['with_cuda'] and '$CUDA_ARCHS' in info['cuda_archs'] else 1)"
build() {
    if [ "$DRY" = 1 ]; then
        skip "build (CUDA)" "dry run: no CUDA build; GPU runs: FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=$CUDA_ARCHS pip install --no-index --no-deps --no-build-isolation -e ."
        step "extension loads" 60 0 "$ENV_TXT" "$PY" -c "
from uniformer_kernels import _extension
assert _extension.loaded(), _extension.load_error()
print('extension:', _extension.build_info())"
        return
    fi
    local key
    key=$(build_key)
    if [ -f "$BUILD_STAMP" ] && [ "$(cat "$BUILD_STAMP")" = "$key" ] && "$PY" -c "$CHECK_CUDA_PY" >>"$ENV_TXT" 2>&1; then
        record "build (CUDA)" PASS 0 "reused: this machine's build of the same sources"
        return
    fi
    if [ -z "$CUDA_HOME_FOUND" ]; then
        record "build (CUDA)" FAIL 0 "no CUDA toolkit (nvcc + include/cuda_runtime.h) found"
        return
    fi
    rm -f "$BUILD_STAMP"
    # Leave at least 2 minutes for what follows.
    if step "build (CUDA)" 300 120 "$ENV_TXT" env CUDA_HOME="$CUDA_HOME_FOUND" FORCE_CUDA=1 \
            TORCH_CUDA_ARCH_LIST="$CUDA_ARCHS" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
            "$PY" -m pip install --no-index --no-deps --no-build-isolation -v -e . \
        && step "extension has CUDA $CUDA_ARCHS" 60 0 "$ENV_TXT" "$PY" -c "$CHECK_CUDA_PY"; then
        mkdir -p "$(dirname "$BUILD_STAMP")" && echo "$key" >"$BUILD_STAMP"
    fi
}

build_and_report() {
    build
    step "python -m uniformer_kernels" 60 0 "$ENV_TXT" "$PY" -m uniformer_kernels
}

# ---- phase 1: tests and compute-sanitizer --------------------------------------------------------
SAN_TESTS=${UK_SANITIZER_TESTS:-tests/test_depthwise_cuda.py}
SAN_K=${UK_SANITIZER_K:-not uniformer_shapes and not 2_to_the_31}
run_tests() {
    local common=(-p no:cacheprovider -rfEs)
    if [ "$DRY" = 1 ]; then
        step "pytest tests (collect all)" 120 0 "$TESTS_TXT" "$PY" -m pytest tests --co -q "${common[@]}"
        step "pytest tests (dry subset)" 120 0 "$TESTS_TXT" "$PY" -m pytest tests/test_gpu_report.py -q "${common[@]}"
        return
    fi
    local par=() tmo=()
    [ "$XDIST" = 1 ] && par=(-n "${UK_TEST_WORKERS:-8}")
    [ "$PTIMEOUT" = 1 ] && tmo=(--timeout 240)
    # -v: a cut-off run still lists what passed. With the benches to follow (phase all), at most 4
    # minutes; alone (phase 1), all but the last minute.
    local cap=420
    [ "$RUN_P2" = 1 ] && cap=240
    step "pytest tests" "$cap" 60 "$TESTS_TXT" "$PY" -m pytest tests -v --durations 15 "${par[@]}" "${tmo[@]}" "${common[@]}"
}

run_sanitizer() {
    if [ "$DRY" = 1 ]; then
        # the sanitizer's selection must still name tests (it rots when tests are renamed)
        step "sanitizer selection (collect)" 60 0 "$TESTS_TXT" bash -c \
            'out=$("$0" -m pytest "$1" -k "$2" --co -q -p no:cacheprovider 2>&1); echo "$out"
             echo "$out" | grep -qE "^[1-9][0-9]*(/[0-9]+)? tests? collected"' \
            "$PY" "$SAN_TESTS" "$SAN_K"
        skip "compute-sanitizer memcheck" "dry run: needs a GPU (${SANITIZER:-compute-sanitizer not found here})"
        return
    fi
    if [ -z "$SANITIZER" ]; then
        record "compute-sanitizer memcheck" FAIL 0 "compute-sanitizer not found (PATH, CUDA_HOME, /usr/local, /opt)"
        return
    fi
    local tmo=() log="$WORK/sanitizer.txt"
    [ "$PTIMEOUT" = 1 ] && tmo=(--timeout 240)
    # "If time allows": cut short, it is PARTIAL (neither a pass nor a failure). No caching
    # allocator: each tensor its own cudaMalloc, so an out-of-bounds access cannot land unseen in a
    # neighbouring block of the cache.
    UK_STEP_MAY_BE_CUT=1 step "compute-sanitizer memcheck" 240 15 "$log" \
        env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck --error-exitcode 99 --print-limit 50 \
        "$PY" -m pytest "$SAN_TESTS" -k "$SAN_K" -q "${tmo[@]}" -p no:cacheprovider -rfEs
    cat "$log" >>"$TESTS_TXT" 2>/dev/null
    # an error found before a cut still fails the run
    if grep -qE "^========= (Invalid|Program hit|Uninitialized|Race|Barrier)|ERROR SUMMARY: [1-9]" "$log" 2>/dev/null; then
        record "compute-sanitizer errors found" FAIL 0 "memcheck reported errors: see tests.txt"
    fi
}

# ---- phase 2: benches ----------------------------------------------------------------------------
pack() {  # pack [--png]: scratch results -> OUT/results.json, results.md (, plots.png)
    local dry=()
    [ "$DRY" = 1 ] && dry=(--dry-run)
    "$PY" -m bench.gpu_report pack "$SCRATCH" "$OUT_DIR" "${dry[@]}" "$@" >>"$BENCH_TXT" 2>&1
}

# bench NAME CAP FILE args...: one bench process, then pack what exists so far. Its cases run in
# priority order and each is kept as it finishes, so a bench cut by its cap is PARTIAL (the table
# shows which cases ran), not a failure; a case that raised fails it.
bench() {
    local name=$1 cap=$2 file=$3
    shift 3
    UK_STEP_MAY_BE_CUT=1 step "$name" "$cap" 25 "$BENCH_TXT" "$PY" -m pytest "bench/$file" -s -q -p no:cacheprovider \
        --results-dir "$SCRATCH" "$@"
    pack
}

# plan_bench NAME CAP FILE args...: the dry run notes a GPU bench invocation (one argument a line,
# a blank line after each) for collect_gpu_plan.
plan_bench() {
    shift 2
    printf '%s\n' "bench/$1" "${@:2}" "" >>"$WORK/gpu_plan"
}

# The dry run's check of the GPU plan: pytest collects every GPU bench invocation with --device
# cuda (case names, impls and options must still exist), in one process; runs nothing.
collect_gpu_plan() {
    : >"$WORK/gpu_plan"
    gpu_benches plan_bench
    step "collect the GPU bench plan" 120 0 "$BENCH_TXT" "$PY" -c "
import sys, pytest
plan = open(sys.argv[1]).read().split('\n\n')
bad = 0
for args in (p.split('\n') for p in plan if p.strip()):
    print('pytest', *args, '--co --device cuda', flush=True)
    rc = pytest.main([*args, '--co', '-q', '-p', 'no:cacheprovider', '--device', 'cuda'])
    bad += rc != 0
sys.exit(1 if bad else 0)" "$WORK/gpu_plan"
}

# The GPU run's benches, in priority order (the issue's targets first in each); $1 runs each.
gpu_benches() {
    local run=$1 B=${UK_OP_BATCH:-32} AB=${UK_ATTN_BATCH:-64} dw attn
    dw="target_2d,target_3d,S-224:CBlock:local:${B}x64x56x56,S-224:CBlock:pos_embed:${B}x64x56x56"
    dw+=",video-S-8x224:CBlock:local:${B}x64x4x56x56,pe_norm:batchnorm:${B}x64x56x56,pe_norm:layernorm:${B}x320x14x14"
    dw+=",S-224:SABlock:pos_embed:${B}x320x14x14,dense-XXS-512:CBlock:local:${B}x56x128x128"
    attn="S-224-global-N196,XXS-224-global_cls-N197,video-S-split-8x224-temporal-T4-HW196-C320"
    attn+=",video-S-split-8x224-spatial-T4-HW196-C320,dense-S-hybrid-512-window14-32x32,S-224-global-N49"
    # 0.2 s of timed rounds per op case (do_bench, L2 flushed between rounds); peaks 0.5 s each
    local gpu=(--peaks-budget 0.5) fp32=(--peaks-budget 0.5 --dtype fp32 --modes fwd+bwd,fwd)
    $run "bench depthwise bf16" 75 bench_depthwise.py "${gpu[@]}" --budget 0.2 --dtype bf16 --batch "$B" --models "$dw"
    $run "bench attention bf16" 75 bench_attention.py "${gpu[@]}" --budget 0.2 --dtype bf16 --batch "$AB" --models "$attn"
    $run "bench accelerate bf16" 120 bench_accelerate.py "${gpu[@]}" --dtype bf16 --models uniformer_small-bs64 \
        --modes fwd+bwd,fwd --impls eager,ours,compile
    $run "bench depthwise fp32" 25 bench_depthwise.py "${fp32[@]}" --budget 0.2 --batch "$B" --models target_2d,target_3d
    $run "bench attention fp32" 25 bench_attention.py "${fp32[@]}" --budget 0.2 --batch "$AB" \
        --models S-224-global-N196,XXS-224-global_cls-N197
    $run "bench accelerate fp32" 100000 bench_accelerate.py "${fp32[@]}" --models uniformer_small-bs64 \
        --impls eager,ours,compile
}

phase2() {
    mkdir -p "$SCRATCH"
    local dw attn acc dev=()
    if [ "$DRY" = 1 ]; then
        dev=(--device cpu --quick --budget 0.05 --peaks-budget 0.1 -p no:benchmark)
        dw="target_2d"
        attn="S-224-global-N49"
        acc="uniformer_small-bs1"
        bench "bench depthwise bf16" 120 bench_depthwise.py "${dev[@]}" --dtype bf16 --batch 1 --models "$dw" --modes fwd
        bench "bench attention bf16" 120 bench_attention.py "${dev[@]}" --dtype bf16 --batch 1 --models "$attn" --modes fwd \
            --impls eager,compile,sdpa_math,ours_cpu
        # whole-model torch.compile takes minutes on this CPU: left to the GPU run
        bench "bench accelerate bf16" 120 bench_accelerate.py "${dev[@]}" --dtype bf16 --img-size 64 --models "$acc" \
            --modes fwd --impls eager,ours
        bench "bench depthwise fp32" 60 bench_depthwise.py "${dev[@]}" --dtype fp32 --batch 1 --models "$dw" --modes fwd+bwd \
            --impls eager_nchw,eager_cl,ours_cpu
        bench "bench attention fp32" 60 bench_attention.py "${dev[@]}" --dtype fp32 --batch 1 --models "$attn" --modes fwd+bwd \
            --impls eager,sdpa_math,ours_cpu
        bench "bench accelerate fp32" 90 bench_accelerate.py "${dev[@]}" --dtype fp32 --img-size 64 --models "$acc" \
            --modes fwd+bwd --impls eager,ours
    else
        gpu_benches bench
    fi
    local t0=$SECONDS
    if pack --png; then record "pack results (+ plots.png)" PASS $((SECONDS - t0)) ""
    else record "pack results (+ plots.png)" FAIL $((SECONDS - t0)) "see bench.txt"; fi
}

# ---- the plan ------------------------------------------------------------------------------------
# The sanitizer runs only on what time is left: after the tests in phase 1, after the benches in
# phase all.
# The dry run checks the cheap things first (collections of what the GPU run will run), then the
# tiny benches.
build_and_report
if [ "$DRY" = 1 ]; then
    if [ "$RUN_P1" = 1 ]; then run_tests; run_sanitizer; fi
    if [ "$RUN_P2" = 1 ]; then collect_gpu_plan; phase2; fi
else
    [ "$RUN_P1" = 1 ] && run_tests
    [ "$PHASE" = 1 ] && run_sanitizer
    [ "$RUN_P2" = 1 ] && phase2
    [ "$PHASE" = all ] && run_sanitizer
fi

# ---- summary: last on stdout, compact --------------------------------------------------------------
summarize_tests() {
    [ -s "$TESTS_TXT" ] || return 0
    echo
    echo "== tests (tests.txt)"
    grep -E "^=+ .*(passed|failed|error|skipped|no tests ran|deselected|collected).* =+$|^[0-9/]+ tests? collected|^[0-9]+ (passed|failed|errors?|skipped|deselected)" "$TESTS_TXT" | tail -n 4
    grep -E "^(FAILED|ERROR) " "$TESTS_TXT" | sort -u | head -n 15
    # skip reasons, grouped (-rs): on a GPU, a skipped GPU test is a finding
    grep -E "^SKIPPED \[" "$TESTS_TXT" | sed -E 's/^SKIPPED \[([0-9]+)\] ([^:]+):[0-9]+: /\1 \2: /' \
        | sort -rn | head -n 8 | sed -E 's/^([0-9]+) /skipped \1x /' | cut -c1-160
    grep -E "ERROR SUMMARY" "$TESTS_TXT" | sed "s/^/sanitizer: /" | sort -u | head -n 3
}
# Benches first and the step table last: the device tool keeps only the output's last 12,000
# characters, so what is cut when the tables are long is the start, never the verdict.
{
    echo "run_gpu.sh: $MODE_NOTE; phase $PHASE; commit ${UK_GIT_COMMIT:0:12}; ${SECONDS}s of ${TOTAL_S}s"
    if [ "$RUN_P2" = 1 ] && [ -f "$OUT_DIR/results.json" ]; then
        echo
        echo "== benches (results.md has every table)"
        "$PY" -m bench.gpu_report summary "$OUT_DIR/results.json" 2>&1
    fi
    summarize_tests
    echo
    echo "== files"
    (cd "$OUT_DIR" && find . -type f | sort | while read -r f; do printf '%s %s\n' "$f" "$(wc -c <"$f")"; done)
    echo
    echo "== steps (${SECONDS}s of ${TOTAL_S}s)"
    awk -F'\t' '{ printf "%-7s %-34s %5ss  %s\n", $1, $2, $3, $4 }' "$STEPS"
    echo
    echo "RESULT: $(failures) step(s) failed or timed out ($MODE_NOTE)"
} >>"$SUMMARY"
FAILED=$(failures)
rm -rf "$WORK"
cat "$SUMMARY"
[ "$FAILED" -eq 0 ]
