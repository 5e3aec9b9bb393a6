"""Helpers for parity tests and reports: relative errors that say where they are, random states.

The numerical contract (DESIGN.md): compare against a float64 eager reference by
``||out - ref|| / ||ref||``; NaN never passes.
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["TOLERANCES", "tolerance", "rel_error", "assert_rel_close", "randomize_state_"]

# max relative error vs a float64 reference, by output dtype and kind of computation
TOLERANCES = {
    (torch.float32, "conv"): 1e-5,
    (torch.float32, "norm"): 1e-5,
    (torch.float32, "attention"): 1e-4,
    (torch.float32, "model"): 1e-4,
    (torch.float16, None): 2e-3,
    (torch.bfloat16, None): 1e-2,
}


def tolerance(dtype: torch.dtype, kind: str) -> float:
    return TOLERANCES.get((dtype, kind), TOLERANCES.get((dtype, None), 1e-5))


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; inf if out has a NaN/inf that ref does not."""
    out64, ref64 = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out64).all() and torch.isfinite(ref64).all():
        return float("inf")
    denom = ref64.norm().item()
    diff = (out64 - ref64).norm().item()
    return diff / denom if denom > 0 else diff


def assert_rel_close(out: torch.Tensor, ref: torch.Tensor, tol: float, name: str = "output") -> None:
    """Fail with the error, the tolerance and where the worst element is (index, both values)."""
    if out.shape != ref.shape:
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    err = rel_error(out, ref)
    if err <= tol:
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
    raise AssertionError(f"{name}: relative error {err:.3e} > tolerance {tol:.1e}; {where}")


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
