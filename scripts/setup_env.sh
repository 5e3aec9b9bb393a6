#!/usr/bin/env bash
# Create (or reuse) a virtualenv with torch, the test tools and Triton, and build uniformer_kernels
# into it (editable, so Python edits need no reinstall).
#
#   VENV        virtualenv path (default: .venv in the repository)
#   PYTHON      interpreter that creates it (default: python3; needs >= 3.10)
#   TORCH_SPEC  pip requirement for torch (default: "torch", a CUDA build, where nvidia-smi works;
#               else "torch==2.13.0", the CPU build)
#
# Idempotent: a second run reuses the venv, keeps a torch that matches, and rebuilds the extension
# only when csrc/, setup.py, pyproject.toml, torch or the CUDA build settings changed.
set -euo pipefail

start=$SECONDS
cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$PWD
log() { echo "[setup] $*"; }
die() { echo "[setup] ERROR: $*" >&2; exit 1; }

# --- virtualenv ----------------------------------------------------------------------------------
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
if [[ -x $VENV/bin/python ]]; then
    log "reusing virtualenv $VENV ($("$VENV/bin/python" --version))"
else
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
        || die "$PYTHON is $("$PYTHON" --version 2>&1); uniformer_kernels needs Python >= 3.10"
    log "creating virtualenv $VENV ($("$PYTHON" --version))"
    "$PYTHON" -m venv "$VENV"
fi
py="$(cd "$VENV" && pwd)/bin/python"
pip_install() { "$py" -m pip install --quiet "$@"; }

# --- torch: first and on its own, because which build depends on the machine ----------------------
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    want_cuda=1
    spec=${TORCH_SPEC:-torch}
else
    want_cuda=0
    spec=${TORCH_SPEC:-torch==2.13.0}
fi

# Prints the installed torch version and exits 0 if it satisfies $1 (and has CUDA when $2 is 1).
torch_matches() {
    "$py" - "$1" "$2" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
try:
    from packaging.requirements import InvalidRequirement, Requirement
except ImportError:  # a fresh venv: use the copy pip carries
    from pip._vendor.packaging.requirements import InvalidRequirement, Requirement
try:
    installed = version("torch")
except PackageNotFoundError:
    sys.exit(1)
print(installed)
try:
    req = Requirement(sys.argv[1])
except InvalidRequirement:  # a wheel path or URL: let pip decide
    sys.exit(1)
import torch
ok = req.name == "torch" and req.specifier.contains(installed, prereleases=True)
sys.exit(0 if ok and (sys.argv[2] == "0" or torch.version.cuda) else 1)
EOF
}

if installed=$(torch_matches "$spec" "$want_cuda" 2>/dev/null); then
    log "torch $installed already installed (wanted $spec), skipping"
else
    # pip would call an installed CPU build "already satisfied" by a plain `torch` requirement.
    if [[ $want_cuda == 1 && -n $installed ]] \
            && ! "$py" -c 'import sys, torch; sys.exit(torch.version.cuda is None)' 2>/dev/null; then
        log "removing torch $installed: a CPU build, and this machine has a GPU"
        "$py" -m pip uninstall --quiet --yes torch
    fi
    log "installing $spec"
    pip_install "$spec"
    installed=$(torch_matches torch "$want_cuda") \
        || die "torch from '$spec' has no CUDA although nvidia-smi works; set TORCH_SPEC to a CUDA build"
    log "torch $installed installed"
fi

# --- tools and Triton ----------------------------------------------------------------------------
log "installing numpy pytest pytest-benchmark matplotlib ninja"
pip_install numpy pytest pytest-benchmark matplotlib ninja
log "installing triton"
if ! pip_install triton; then
    log "WARNING: triton did not install; its backend and tests will be skipped (see python -m uniformer_kernels)"
fi

# --- uniformer_kernels ---------------------------------------------------------------------------
# Editable builds compile in a fresh temporary directory every time, so skip the build when its
# inputs are unchanged and this checkout's extension loads from the venv.
stamp="$VENV/.uniformer_kernels-build"
build_key=$(
    {
        echo "$repo ${FORCE_CUDA:-} ${TORCH_CUDA_ARCH_LIST:-} $installed"
        [[ -f models/__init__.py ]] && echo "models"   # setup.py maps models/ only when present
        find csrc setup.py pyproject.toml -type f -print0 | sort -z | xargs -0 sha256sum
    } | sha256sum | cut -d' ' -f1
)
installed_here() {
    (cd / && "$py" - "$repo" <<'EOF'
import os, sys
import uniformer_kernels
from uniformer_kernels import _extension
here = os.path.realpath(uniformer_kernels.__file__).startswith(os.path.realpath(sys.argv[1]) + os.sep)
sys.exit(0 if here and _extension.loaded() else 1)
EOF
    ) >/dev/null 2>&1
}
if [[ -f $stamp && $(cat "$stamp") == "$build_key" ]] && installed_here; then
    log "uniformer_kernels already built from these sources, skipping (delete $stamp to force)"
else
    log "building uniformer_kernels (pip install --no-build-isolation -e .; C++ extension, a minute or more)"
    build_log=$(mktemp)
    if ! "$py" -m pip install --no-build-isolation -v -e . >"$build_log" 2>&1; then
        tail -n 60 "$build_log" >&2
        die "build failed; full log: $build_log"
    fi
    # setup.py tags its lines, the CPU-only fallback's warning included.
    grep -h '^ *\[uniformer_kernels\]' "$build_log" | sed 's/^ */[setup] /' || true
    rm -f "$build_log"
    installed_here || die "uniformer_kernels built but its extension does not load; run: $py -m uniformer_kernels"
    echo "$build_key" >"$stamp"
fi

# On a GPU machine, an extension without CUDA kernels (a failed CUDA compile falls back to the CPU
# build with a warning that is easy to miss in a long log) is said again, last.
if [[ $want_cuda == 1 ]]; then
    missing=$(cd / && "$py" -c 'from uniformer_kernels import _extension as e; print("" if e.WITH_CUDA else e.CUDA_MISSING_REASON)')
    [[ -z $missing ]] || log "WARNING: uniformer_kernels._C has no CUDA kernels on this GPU machine: $missing"
fi
log "done in $((SECONDS - start)) s; environment: $py -m uniformer_kernels"
