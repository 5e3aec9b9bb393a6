#!/usr/bin/env bash
# CI: build the whole CUDA extension the way setup.py builds it for users (kernels, bindings, torch's
# nvcc flags) against a CUDA torch, on a machine without a GPU, then check the fallback: a CUDA part
# that fails to compile still installs the CPU-only extension, with the reason in build_info, unless
# FORCE_CUDA=1. Steps, in a scratch folder that is deleted at the end:
#   1. a virtualenv with the CUDA torch ($TORCH_CUDA_SPEC) and the build and test tools;
#   2. a copy of this working tree (tracked and untracked files; pip writes build/ into it);
#   3. pip install --no-build-isolation . as users run it (FORCE_CUDA unset: the path with the
#      fallback, which must not be taken); `python -m uniformer_kernels` must say with_cuda True and
#      the archs, cuobjdump must list a cubin per arch, and the CPU ops must pass a fast test subset;
#   4. the timm / OpenMMLab integration tests in the same venv, against that install
#      (scripts/ci_integration.sh: torchvision, timm, mmengine; pytest -m integration);
#   5. one .cu made to fail (#error): without FORCE_CUDA pip install must succeed, CPU-only, with the
#      warning and the reason in build_info and the report; with FORCE_CUDA=1 it must fail.
# Environment:
#   TORCH_CUDA_SPEC       CUDA torch to build against (default torch==2.14.1)
#   TORCH_CUDA_ARCH_LIST  archs (default "8.0;9.0")
#   CUDA_HOME             CUDA toolkit (default: found from nvcc, which may be a wrapper script)
#   MAX_JOBS              parallel compile jobs (default 2)
#   KEEP_CUDA_BUILD=1     keep the scratch folder (venv, tree, logs) and print where it is
#   SKIP_INTEGRATION=1    skip step 4
#   CUDA_VENV             an existing virtualenv with the CUDA torch to use (and keep) instead of
#                         step 1's, for reruns while developing
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$PWD
start=$SECONDS
step_start=$SECONDS
log() { echo "[cuda-build] $*"; }
die() { echo "[cuda-build] FAILED: $*" >&2; exit 1; }
step() {
    log "  ... $((SECONDS - step_start)) s"
    step_start=$SECONDS
    log "== $*"
}

TORCH_CUDA_SPEC=${TORCH_CUDA_SPEC:-torch==2.14.1}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}
export MAX_JOBS=${MAX_JOBS:-2}
unset FORCE_CUDA

# --- the CUDA toolkit: nvcc reports its own folder, also when the nvcc on PATH is a wrapper -------
if [[ -z ${CUDA_HOME:-} ]]; then
    command -v nvcc >/dev/null || die "nvcc not found on PATH and CUDA_HOME unset"
    nvcc_dir=$(nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=//p')
    [[ -n $nvcc_dir ]] || die "could not read nvcc's folder from nvcc --dryrun; set CUDA_HOME"
    CUDA_HOME=$(cd "$nvcc_dir/.." && pwd)
fi
[[ -x $CUDA_HOME/bin/nvcc && -f $CUDA_HOME/include/cuda_runtime.h ]] \
    || die "CUDA_HOME=$CUDA_HOME is not a CUDA toolkit (no bin/nvcc or include/cuda_runtime.h)"
export CUDA_HOME
log "CUDA toolkit $CUDA_HOME ($("$CUDA_HOME/bin/nvcc" --version | tail -n 2 | head -n 1))"

scratch=$(mktemp -d "${TMPDIR:-/tmp}/uk-cuda-build.XXXXXX")
if [[ ${KEEP_CUDA_BUILD:-0} == 1 ]]; then
    trap 'log "kept $scratch (KEEP_CUDA_BUILD=1)"' EXIT
else
    trap 'rm -rf "$scratch"' EXIT
fi
venv=${CUDA_VENV:-$scratch/venv}
src=$scratch/src
py=$venv/bin/python

# Builds $src non-editable (objects stay in $src/build, so the rebuilds below are incremental);
# the pip log goes to $scratch/$1.log. Returns pip's status.
build() {
    local name=$1
    shift
    (cd "$src" && env "$@" "$py" -m pip install --no-build-isolation --no-deps -v . \
        >"$scratch/$name.log" 2>&1)
}
show_tagged() { grep -h '^ *\[uniformer_kernels\]' "$1" | sed 's/^ *//' || true; }
report_json() { (cd "$scratch" && "$py" -m uniformer_kernels --json) >"$scratch/$1.json"; }
# Runs python code on the report $1.json (bound to `r`, its extension's build_info to `e`).
check_report() {
    "$py" - "$scratch/$1.json" "$2" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
e = r["extension"]
assert e is not None, f"extension not loaded: {r['extension_missing']}"
exec(sys.argv[2])
EOF
}

# --- 1. virtualenv with the CUDA torch -------------------------------------------------------------
if [[ -n ${CUDA_VENV:-} ]]; then
    step "virtualenv $CUDA_VENV (CUDA_VENV)"
    "$py" -m pip uninstall --quiet --yes uniformer-kernels 2>/dev/null || true
else
    step "virtualenv with $TORCH_CUDA_SPEC (a CUDA build, several GB)"
    python3 -m venv "$venv"
    "$py" -m pip install --quiet "$TORCH_CUDA_SPEC" numpy ninja setuptools wheel pytest
fi
"$py" -c 'import sys, torch; print(f"[cuda-build] torch {torch.__version__}, CUDA {torch.version.cuda}"); sys.exit(torch.version.cuda is None)' \
    || die "$TORCH_CUDA_SPEC is not a CUDA build of torch"

# --- 2. a copy of the working tree -----------------------------------------------------------------
step "copy of the working tree"
mkdir "$src"
git ls-files -z --cached --others --exclude-standard \
    | tar --null --files-from=- --ignore-failed-read -cf - | tar -xf - -C "$src"

# --- 3. the CUDA build -----------------------------------------------------------------------------
step "build, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS"
if ! build cuda; then
    tail -n 80 "$scratch/cuda.log" >&2
    die "the CUDA build failed (log above)"
fi
show_tagged "$scratch/cuda.log"
report_json cuda
(cd "$scratch" && "$py" -m uniformer_kernels) | sed 's/^/[cuda-build]   /'
check_report cuda "
assert e['with_cuda'] is True, e
assert e['cuda_archs'] == '$TORCH_CUDA_ARCH_LIST', e['cuda_archs']
assert e['cuda_missing_reason'] == '', e
" || die "the report does not show the CUDA build (the build log's warning above says why)"
so=$(cd "$scratch" && "$py" -c 'import uniformer_kernels._C as c; print(c.__file__)')
[[ $so == "$venv"/* ]] || die "uniformer_kernels._C loads from $so, not from the venv"
# cuobjdump: the toolkit's, else the copy in the triton wheel (a dependency of the CUDA torch).
cuobjdump=$CUDA_HOME/bin/cuobjdump
[[ -x $cuobjdump ]] || cuobjdump=$("$py" -c 'import os, triton; print(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))')
[[ -x $cuobjdump ]] || die "no cuobjdump in $CUDA_HOME/bin or the triton wheel"
cubins=$("$cuobjdump" --list-elf "$so" | grep -o 'sm_[0-9]*' | sort -u | tr '\n' ' ')
log "cubins in $(basename "$so"): $cubins"
for arch in ${TORCH_CUDA_ARCH_LIST//;/ }; do
    [[ " $cubins" == *" sm_${arch/./} "* ]] || die "no sm_${arch/./} cubin in $so"
done

step "CPU tests in the CUDA venv (package; depthwise and pos_embed_norm CPU parity, opcheck)"
# From $scratch, so that the installed package is imported, not the source tree's.
(cd "$scratch" && "$py" -m pytest -q -p no:cacheprovider "$src/tests/test_package.py" \
    "$src/tests/test_depthwise.py" \
    -k "test_package or (cpu and (matches_float64 or 16bit or opcheck))") \
    || die "tests failed in the CUDA venv"

# --- 4. timm / OpenMMLab integration --------------------------------------------------------------
if [[ ${SKIP_INTEGRATION:-0} != 1 ]]; then
    step "timm / OpenMMLab integration tests in the CUDA venv (scripts/ci_integration.sh)"
    bash "$repo/scripts/ci_integration.sh" "$py" "$src/tests" || die "integration tests failed"
fi

# --- 5. a CUDA compile error ----------------------------------------------------------------------
broken=$(cd "$src" && ls csrc/cuda/*.cu | head -n 1)
echo '#error injected by scripts/ci_cuda_build.sh' >>"$src/$broken"
step "build with an #error in $broken, FORCE_CUDA unset: CPU-only, with a warning"
if ! build broken; then
    tail -n 80 "$scratch/broken.log" >&2
    die "pip install failed on a CUDA compile error; it should have built the CPU-only extension"
fi
show_tagged "$scratch/broken.log"
grep -q 'WARNING: the CUDA kernels failed to compile' "$scratch/broken.log" || die "no warning in the build log"
report_json broken
text=$(cd "$scratch" && "$py" -m uniformer_kernels)
echo "$text" | grep -E 'with_cuda|cuda_missing_reason' | sed 's/^/[cuda-build]   /'
fallback_log=$(check_report broken "
assert e['with_cuda'] is False and e['cuda_archs'] == '', e
reason = e['cuda_missing_reason']
assert 'failed to compile' in reason and 'error injected' in reason and 'build log: ' in reason, reason
print(reason.rsplit('build log: ', 1)[1])
") || die "build_info does not say why CUDA is missing"
# setup.py leaves the failed compile's log in the temp folder for the user; here it goes with the rest.
mv "$fallback_log" "$scratch/"
grep -q 'cuda_missing_reason .*failed to compile' <<<"$text" \
    || die "python -m uniformer_kernels does not say why CUDA is missing"
(cd "$scratch" && "$py" -m pytest -q -p no:cacheprovider "$src/tests/test_package.py" -k build_info) \
    || die "build_info tests failed on the CPU-only fallback"

step "the same build with FORCE_CUDA=1 must fail"
if build broken-forced FORCE_CUDA=1; then
    die "FORCE_CUDA=1 installed despite the CUDA compile error"
fi
grep -q 'error injected' "$scratch/broken-forced.log" || die "the failed build's log does not show the error"
log "failed as it should: $(grep -m1 'error injected' "$scratch/broken-forced.log" | sed 's/^ *//')"

step "done"
log "all CUDA build checks passed in $((SECONDS - start)) s"
