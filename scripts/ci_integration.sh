#!/usr/bin/env bash
# CI: the timm and OpenMMLab integration tests (pytest -m integration: tests/test_timm.py,
# tests/test_openmmlab.py) against the real timm and mmengine. timm needs torchvision, and the
# torchvision that imports beside the CUDA torch of scripts/ci_cuda_build.sh (torch 2.14.1) is
# 0.29.1, so these run in that script's virtualenv, which calls this one after its CUDA build
# (uniformer_kernels already installed there, non-editable). On the CPU; nothing is downloaded by
# the tests (official-format files are made from random weights).
#
#   bash scripts/ci_integration.sh PYTHON TESTS_DIR
#     PYTHON     the venv's python, with torch 2.14.1 and uniformer_kernels installed
#     TESTS_DIR  the tests/ folder of the tree that was installed
# Environment: TORCHVISION_SPEC (default torchvision==0.29.1), INTEGRATION_PACKAGES (default
# "timm==1.0.31 mmengine==0.10.7").
# UK_REQUIRE_INTEGRATION=1 makes a missing timm or mmengine fail the tests instead of skipping them.
set -euo pipefail

py=${1:?usage: ci_integration.sh PYTHON TESTS_DIR}
py=$(cd "$(dirname "$py")" && pwd)/$(basename "$py")   # absolute: the tests run from elsewhere
tests=$(cd "${2:?usage: ci_integration.sh PYTHON TESTS_DIR}" && pwd)
start=$SECONDS
log() { echo "[integration] $*"; }
die() { echo "[integration] FAILED: $*" >&2; exit 1; }

TORCHVISION_SPEC=${TORCHVISION_SPEC:-torchvision==0.29.1}
INTEGRATION_PACKAGES=${INTEGRATION_PACKAGES:-timm==1.0.31 mmengine==0.10.7}
log "installing $TORCHVISION_SPEC $INTEGRATION_PACKAGES"
# shellcheck disable=SC2086
"$py" -m pip install --quiet "$TORCHVISION_SPEC" $INTEGRATION_PACKAGES \
    || die "pip install $TORCHVISION_SPEC $INTEGRATION_PACKAGES"
"$py" - <<'EOF' || die "the integration packages do not import (versions above)"
import torch, torchvision, timm, mmengine
print(f"[integration] torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"timm {timm.__version__}, mmengine {mmengine.__version__}")
import uniformer_models as um
assert not um.TIMM_MISSING_REASON, um.TIMM_MISSING_REASON
EOF
log "  ... $((SECONDS - start)) s"

# From a scratch folder, so that the installed packages are imported, not a source tree's.
run_dir=$(mktemp -d "${TMPDIR:-/tmp}/uk-integration.XXXXXX")
trap 'rm -rf "$run_dir"' EXIT
(cd "$run_dir" && UK_REQUIRE_INTEGRATION=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} \
    "$py" -m pytest -q -p no:cacheprovider -m integration "$tests/test_timm.py" \
    "$tests/test_openmmlab.py") \
    || die "integration tests failed"
log "done in $((SECONDS - start)) s"
