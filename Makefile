# Entry points; scripts/ holds the logic. VENV picks the virtualenv (default .venv).
VENV ?= .venv
export VENV

.PHONY: setup test main cuda-check

# Virtualenv with torch, test tools, Triton and an editable build of the package (idempotent).
setup:
	bash scripts/setup_env.sh

# The test suite (tests/, per pyproject.toml). pytest's exit code, including 5 for "no tests
# collected", fails the target.
test: setup
	$(VENV)/bin/python -m pytest -q

main: setup
	bash scripts/main.sh

# nvcc compile check of the CUDA kernels for sm_80 and sm_90; needs no GPU.
cuda-check:
	bash scripts/check_cuda_sources.sh
