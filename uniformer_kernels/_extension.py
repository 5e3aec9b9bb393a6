"""The compiled extension ``uniformer_kernels._C``, or the reason it could not be loaded.

The package works without it (Triton and eager backends); what needs it asks :func:`load_error`
and says why it is missing instead of failing with a bare ImportError.
"""
from __future__ import annotations

import importlib

import torch  # loads libtorch, which _C links against, before _C is imported

BUILD_COMMAND = "pip install --no-build-isolation -e ."

try:
    _C = importlib.import_module("uniformer_kernels._C")
except ImportError as exc:
    _C = None
    if isinstance(exc, ModuleNotFoundError) and exc.name == "uniformer_kernels._C":
        _LOAD_ERROR = f"uniformer_kernels._C is not built ({exc}); build with: {BUILD_COMMAND}"
    else:
        # Built but unloadable: typically compiled against another torch (undefined symbols).
        _LOAD_ERROR = (f"uniformer_kernels._C failed to load ({type(exc).__name__}: {exc}); "
                       f"rebuild it against torch {torch.__version__} with: {BUILD_COMMAND}")
else:
    _LOAD_ERROR = None


def loaded() -> bool:
    return _C is not None


def load_error() -> str | None:
    """Why the extension is unavailable and how to get it, or None when it is loaded."""
    return _LOAD_ERROR


def build_info() -> dict | None:
    """The extension's compile-time facts (see csrc/cpu/build_info.cpp) plus ``cpu_kernel_isa``,
    the CPU kernel build chosen at run time for this CPU (avx2 or baseline); None when not loaded."""
    if _C is None:
        return None
    return {**_C.build_info(), "cpu_kernel_isa": _C.cpu_kernel_isa()}


# Compile-time facts that backend selection reads on every op call, taken once.
_FACTS = build_info() or {}
WITH_CUDA: bool = bool(_FACTS.get("with_cuda", False))
CUDA_ARCHS: str = _FACTS.get("cuda_archs", "")
CUDA_MISSING_REASON: str = _FACTS.get("cuda_missing_reason", "")
# Whether torch links the BLAS gemm that the C++ CPU attention kernel calls.
CPU_ATTENTION: bool = _C is not None and _C.cpu_attention_available()
