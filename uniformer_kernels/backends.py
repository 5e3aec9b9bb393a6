"""Which implementation runs an op: the backends, what is available where, and how to force one.

Backends, in the order the automatic choice tries them:

    triton  Triton kernels: CUDA tensors; CPU tensors under TRITON_INTERPRET=1, but only when
            forced (the interpreter is for testing, so it is never chosen automatically)
    cuda    CUDA kernels compiled into uniformer_kernels._C (csrc/cuda)
    cpu     C++ CPU kernels compiled into uniformer_kernels._C (csrc/cpu)
    eager   the reference composition of PyTorch ops: always available, the fallback

Force one with ``with uniformer_kernels.backend("eager"): ...`` (this thread or async task only,
nests) or the environment variable UNIFORMER_KERNELS_BACKEND (empty means unset); the context
manager wins over the variable. Forcing never falls back silently: an op that cannot run on the
forced backend raises and says why.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Callable, Iterable, Iterator

import torch

from . import _extension

BACKENDS = ("triton", "cuda", "cpu", "eager")
_BACKEND_SET = frozenset(BACKENDS)
ENV_VAR = "UNIFORMER_KERNELS_BACKEND"

# A ContextVar rather than a global: a backend forced in one thread or asyncio task must not leak
# into another.
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "uniformer_kernels_backend", default=None)


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}: unknown backend {name!r}; valid backends: {', '.join(BACKENDS)}")
    return name


@contextlib.contextmanager
def backend(name: str) -> Iterator[str]:
    """Force backend ``name`` for the ops called inside the block; the previous choice comes back
    on exit, exceptions included."""
    token = _forced.set(_check_name(name, "uniformer_kernels.backend()"))
    try:
        yield name
    finally:
        _forced.reset(token)


def _forced_backend() -> tuple[str | None, str]:
    """(the forced backend or None, what forced it). Reads the environment on every call."""
    name = _forced.get()
    if name is not None:
        return name, "uniformer_kernels.backend()"
    value = os.environ.get(ENV_VAR, "")
    if value:
        source = f"environment variable {ENV_VAR}"
        return _check_name(value, source), source
    return None, ""


def current_backend() -> str | None:
    """The forced backend, or None when each op chooses by device and availability."""
    return _forced_backend()[0]


def _device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@functools.lru_cache(maxsize=None)
def _import_triton():
    """(triton module or None, why not). Cached: a failed import would otherwise be retried, with
    its file system search, on every op call."""
    try:
        import triton
    except Exception as exc:  # noqa: BLE001  a broken install (not only a missing one) is reported too
        return None, f"triton is not importable ({type(exc).__name__}: {exc}); install it with: pip install triton"
    return triton, ""


def _triton_status(device: torch.device) -> tuple[bool, str]:
    triton, error = _import_triton()
    if triton is None:
        return False, error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, f"triton {triton.__version__} is installed but no CUDA device is available"
        return True, f"triton {triton.__version__} on {torch.cuda.get_device_name(device)}"
    if device.type == "cpu":
        # Triton's own reading of the variable (it accepts 1/true/on/yes), read live.
        if triton.knobs.runtime.interpret:
            return True, f"triton {triton.__version__} interpreter (TRITON_INTERPRET=1; slow, for testing)"
        return False, ("CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before "
                       "importing uniformer_kernels (slow, for testing)")
    return False, f"triton serves CUDA tensors (or CPU ones under TRITON_INTERPRET=1), not {device.type}"


def _cuda_status(device: torch.device) -> tuple[bool, str]:
    if device.type != "cuda":
        return False, f"the cuda backend serves CUDA tensors, not {device.type}"
    if not _extension.loaded():
        return False, _extension.load_error()
    if not _extension.WITH_CUDA:
        return False, (f"uniformer_kernels._C was built without CUDA kernels: "
                       f"{_extension.CUDA_MISSING_REASON}; FORCE_CUDA=1 makes a rebuild stop "
                       "with the cause instead")
    if not torch.cuda.is_available():
        return False, "uniformer_kernels._C has CUDA kernels but no CUDA device is available"
    return True, f"extension loaded, built for sm {_extension.CUDA_ARCHS}; kernels registered per op"


def _cpu_status(device: torch.device) -> tuple[bool, str]:
    if device.type != "cpu":
        return False, f"the cpu backend serves CPU tensors, not {device.type}"
    if not _extension.loaded():
        return False, _extension.load_error()
    return True, "extension loaded; kernels registered per op"


def _eager_status(device: torch.device) -> tuple[bool, str]:
    return True, "reference composition of PyTorch ops; always available"


_STATUS: dict[str, Callable[[torch.device], tuple[bool, str]]] = {
    "triton": _triton_status, "cuda": _cuda_status, "cpu": _cpu_status, "eager": _eager_status,
}


def available_backends(device: torch.device | str | None = None) -> dict[str, tuple[bool, str]]:
    """{backend: (available, reason)} for tensors on ``device`` (default: CUDA if present, else CPU).

    The reason says what is missing for an unavailable backend. For cuda/cpu, "available" means the
    compiled extension is loaded with those kernels; each op states which backends it implements.
    """
    device = _device(device)
    return {name: _STATUS[name](device) for name in BACKENDS}


def resolve_backend(device: torch.device | str, supported: Iterable[str] = BACKENDS,
                    op: str = "this op") -> str:
    """The backend an op implemented by ``supported`` backends runs on for tensors on ``device``.

    A forced backend (context manager, else environment variable) is returned as is, or raises
    ValueError naming why it cannot serve this call. Otherwise the first available of triton, cuda,
    cpu, eager among ``supported`` (triton only for CUDA tensors: on CPU the interpreter must be
    forced).
    """
    supported = tuple(supported)
    if not set(supported) <= _BACKEND_SET:  # checked without formatting: this runs on every call
        for name in supported:
            _check_name(name, f"{op}: supported backends")
    device = _device(device)
    forced, source = _forced_backend()
    if forced is not None:
        if forced not in supported:
            raise ValueError(f"backend {forced!r} (forced by {source}) does not implement {op}; "
                             f"it has: {', '.join(supported)}")
        ok, reason = _STATUS[forced](device)
        if not ok:
            raise ValueError(f"backend {forced!r} (forced by {source}) cannot run {op} on "
                             f"{device.type} tensors: {reason}")
        return forced
    automatic = _automatic_backend(device, supported)
    if automatic is None:
        reasons = "; ".join(f"{name}: {_STATUS[name](device)[1]}" for name in supported)
        raise RuntimeError(f"no backend can run {op} on {device.type} tensors ({reasons})")
    return automatic


@functools.lru_cache(maxsize=None)
def _automatic_backend(device: torch.device, supported: tuple[str, ...]) -> str | None:
    """The first available of ``supported`` in BACKENDS order, or None. Cached: what it reads (the
    extension, Triton's import, CUDA's presence) is fixed for the process, and the status checks
    cost ~10 µs a call next to batch-1 kernels of ~40 µs."""
    for name in BACKENDS:
        if name == "triton" and device.type == "cpu":
            continue  # the interpreter runs only when forced
        if name in supported and _STATUS[name](device)[0]:
            return name
    return None
