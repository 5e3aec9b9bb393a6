"""Helpers for parity tests and reports: relative errors that say where they are, random states,
and where the Triton and GPU tests run.

The numerical contract (DESIGN.md): compare against a float64 eager reference by
``||out - ref|| / ||ref|| <= tol`` and, so that a few wrong elements of a large tensor cannot hide
in the norm, by the worst element ``max|out - ref| / max|ref| <= ELEMENT_FACTOR * tol``; NaN never
passes.
"""
from __future__ import annotations

import os
import subprocess
import sys

import torch
import torch.nn as nn

from . import backends

__all__ = ["TOLERANCES", "ELEMENT_FACTOR", "tolerance", "rel_error", "max_rel_error", "assert_rel_close", "randomize_state_",
           "triton_test_device", "triton_test_dtypes", "triton_marks", "gpu_marks",
           "run_with_poisoned_malloc"]

# max relative error vs a float64 reference, by output dtype and kind of computation
TOLERANCES = {
    (torch.float32, "conv"): 1e-5,
    (torch.float32, "norm"): 1e-5,
    (torch.float32, "attention"): 1e-4,
    (torch.float32, "model"): 1e-4,
    (torch.float16, None): 2e-3,
    (torch.bfloat16, None): 1e-2,
}


# The worst element's bound, in units of the norm-wise tolerance. Correct code's worst element
# measured up to 2.5x its own norm-wise error (the eager bfloat16 blocks under autocast: 7.2e-3
# against 3-5e-3; the largest of many rounding errors sits where |ref| is largest), so 4 keeps a
# margin; a wrong element of size 1 in an N(0, 1) map (max|ref| ~ 5) is 0.2 of max|ref|, 5x over
# the bfloat16 bound and 5000x over float32's. The norm alone lets it pass: 8 such elements in
# 2x64x56x56 are a relative error of 4.5e-3.
ELEMENT_FACTOR = 4.0


def tolerance(dtype: torch.dtype, kind: str) -> float:
    return TOLERANCES.get((dtype, kind), TOLERANCES.get((dtype, None), 1e-5))


def _nonfinite_error(out64: torch.Tensor, ref64: torch.Tensor) -> bool:
    return bool(not torch.isfinite(out64).all() and torch.isfinite(ref64).all())


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; inf if out has a NaN/inf that ref does not."""
    out64, ref64 = out.detach().double(), ref.detach().double()
    if _nonfinite_error(out64, ref64):
        return float("inf")
    denom = ref64.norm().item()
    diff = (out64 - ref64).norm().item()
    return diff / denom if denom > 0 else diff


def max_rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max|out - ref| / max|ref| in float64 (the worst element against the reference's scale);
    inf if out has a NaN/inf that ref does not."""
    out64, ref64 = out.detach().double(), ref.detach().double()
    if _nonfinite_error(out64, ref64):
        return float("inf")
    if out64.numel() == 0:
        return 0.0
    denom = ref64.abs().max().item()
    diff = (out64 - ref64).abs().max().item()
    return diff / denom if denom > 0 else diff


def assert_rel_close(out: torch.Tensor, ref: torch.Tensor, tol: float, name: str = "output",
                     elem_tol: float | None = None) -> None:
    """Fail unless ``rel_error(out, ref) <= tol`` and ``max_rel_error(out, ref) <= elem_tol``
    (default ``ELEMENT_FACTOR * tol``), with the error and where the worst element is (index,
    both values)."""
    if out.shape != ref.shape:
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    elem_tol = ELEMENT_FACTOR * tol if elem_tol is None else elem_tol
    err, elem_err = rel_error(out, ref), max_rel_error(out, ref)
    if err <= tol and elem_err <= elem_tol:
        return
    out64, ref64 = out.detach().double(), ref.detach().double()
    nonfinite = ~torch.isfinite(out64)
    if nonfinite.any():
        idx = tuple(int(i) for i in nonfinite.nonzero()[0])
        where = f"{int(nonfinite.sum())} non-finite elements, first at {idx}"
    else:
        flat = (out64 - ref64).abs().argmax().item()
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), out.shape))
        where = f"max |diff| at {idx}: got {out64[idx].item():.6g}, expected {ref64[idx].item():.6g}"
    failed = (f"relative error {err:.3e} > tolerance {tol:.1e}" if err > tol else
              f"worst element {elem_err:.3e} of max|ref| > tolerance {elem_tol:.1e} (relative "
              f"error {err:.3e})")
    raise AssertionError(f"{name}: {failed}; {where}")


@torch.no_grad()
def randomize_state_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every floating parameter and buffer random values that keep activations O(1).

    Weights ~ N(0, 1/fan_in); biases ~ N(0, 0.1); norm scales and layer-scale gammas ~ U(0.5, 1.5);
    BatchNorm running means ~ N(0, 0.1) and variances ~ U(0.5, 1.5); anything else ~ N(0, 1).
    Random BN statistics make eval-mode folding and loading mistakes visible.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        if not tensor.is_floating_point():
            continue
        leaf = name.rsplit(".", 1)[-1]
        owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
        is_norm = isinstance(owner, (nn.LayerNorm, nn.modules.batchnorm._BatchNorm, nn.GroupNorm))
        if leaf == "running_var" or (is_norm and leaf == "weight") or leaf.startswith("gamma"):
            values = torch.rand(tensor.shape, generator=gen) + 0.5
        elif leaf in ("bias", "running_mean"):
            values = torch.randn(tensor.shape, generator=gen) * 0.1
        elif tensor.ndim >= 2:
            fan_in = tensor[0].numel()
            values = torch.randn(tensor.shape, generator=gen) / fan_in ** 0.5
        else:
            values = torch.randn(tensor.shape, generator=gen)
        tensor.copy_(values.to(tensor.dtype))
    return module


# ---- where the Triton and GPU tests run ----------------------------------------------------------

def triton_test_device() -> tuple[str | None, str]:
    """(device, why not) for the Triton backend's tests, decided once for every test file.

    "cpu" when Triton's interpreter is on (TRITON_INTERPRET=1 before the kernels were imported:
    tests/conftest.py sets it when there is no GPU); else "cuda" when Triton can compile for a
    CUDA GPU here; else None and the reason.
    """
    cpu_ok, cpu_reason = backends.available_backends("cpu")["triton"]
    if cpu_ok:
        return "cpu", ""
    if torch.cuda.is_available():
        cuda_ok, cuda_reason = backends.available_backends("cuda")["triton"]
        return ("cuda", "") if cuda_ok else (None, cuda_reason)
    return None, cpu_reason


def triton_test_dtypes(device: str | None) -> tuple[torch.dtype, ...]:
    """The dtypes the Triton tests run in on ``device``: all four compiled; no bfloat16 in the
    interpreter, whose bfloat16 dots are wrong (DESIGN.md, "Testing without a GPU")."""
    if device == "cuda":
        return (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    return (torch.float32, torch.float16, torch.float64)


def gpu_marks(min_devices: int = 1) -> list:
    """pytest marks of a test that needs CUDA (``min_devices`` GPUs): ``gpu``, and a skip saying
    what is missing."""
    import pytest  # test-only dependency
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    reason = ("needs a CUDA GPU" if min_devices == 1 else
              f"needs {min_devices} CUDA GPUs, found {count}")
    return [pytest.mark.gpu, pytest.mark.skipif(count < min_devices, reason=reason)]


def triton_marks() -> list:
    """pytest marks of a Triton-backend test: skipped (with the reason) where Triton cannot run,
    ``gpu`` where it runs compiled on CUDA, none in the interpreter."""
    import pytest
    device, reason = triton_test_device()
    if device is None:
        return [pytest.mark.skip(reason=f"the triton backend cannot run here: {reason}")]
    return [pytest.mark.gpu] if device == "cuda" else []


def run_with_poisoned_malloc(script: str, timeout: float = 600) -> str:
    """Runs ``script`` in a fresh Python whose glibc malloc fills every new block with a non-zero
    byte pattern (mmap off below 32 MiB, so torch's CPU buffers come from malloc too): an output
    element a kernel never writes shows as garbage, not as a lucky zero. Asserts the script exits
    0 and printed ``checked``; returns its stdout. Linux/glibc only."""
    env = dict(os.environ,
               GLIBC_TUNABLES="glibc.malloc.perturb=128:glibc.malloc.mmap_threshold=33554432")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "checked" in result.stdout, result.stdout
    return result.stdout
