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
    """The extension's compile-time facts (see csrc/cpu/build_info.cpp) plus the run-time choice of
    CPU kernels: ``cpu_isas_supported`` (the builds this CPU and OS run, narrowest first) and
    ``cpu_kernel_isa`` (the one this process uses: the widest, or UNIFORMER_KERNELS_CPU_ISA's),
    None with ``cpu_kernel_isa_error`` saying why when that variable is invalid or names an ISA
    this CPU lacks (the CPU kernels then raise that ValueError). None when not loaded."""
    if _C is None:
        return None
    try:
        isa, isa_error = _C.cpu_kernel_isa(), None
    except ValueError as exc:
        isa, isa_error = None, str(exc).splitlines()[0]
    return {**_C.build_info(), "cpu_isas_supported": _C.cpu_isas_supported(),
            "cpu_kernel_isa": isa, "cpu_kernel_isa_error": isa_error}


# Compile-time facts that backend selection reads on every op call, taken once.
_FACTS = build_info() or {}
WITH_CUDA: bool = bool(_FACTS.get("with_cuda", False))
CUDA_ARCHS: str = _FACTS.get("cuda_archs", "")
CUDA_MISSING_REASON: str = _FACTS.get("cuda_missing_reason", "")
# Whether torch links the BLAS gemm that the C++ CPU attention kernel calls.
CPU_ATTENTION: bool = _C is not None and _C.cpu_attention_available()
