"""The ops under ``torch.autocast``: they compute in the dtype the PyTorch ops they replace would.

Autocast has no rule for a custom op (its dispatch key falls through), so without one an op would
see float32 parameters next to 16-bit activations and refuse the mix, where ``nn.Conv2d`` runs.
The public functions therefore cast their arguments as autocast casts those of a lower-precision
op (conv, matmul, scaled_dot_product_attention): every floating tensor on the autocast device
except float64 goes to the autocast dtype (``cast_args``). A fused residual ``x + conv(x)``
returns what that sum returns in PyTorch: the conv in the autocast dtype, promoted with x's dtype;
ours computes it in that promoted dtype (float32 x: float32, as accurate as the reference or more).

The implementations themselves run with autocast off (``autocast_off``): their float32
accumulation must not be cast down by autocast, and the dtypes they return must be the ones the
fake implementations promise.
"""
from __future__ import annotations

import functools

import torch


def _lower_dtype(tensors) -> tuple[str, torch.dtype] | tuple[None, None]:
    """(device type, autocast dtype) when autocast is on for the first tensor's device type."""
    first = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    if first is None or not torch.is_autocast_enabled(first.device.type):
        return None, None
    return first.device.type, torch.get_autocast_dtype(first.device.type)


def _eligible(t, device_type: str) -> bool:
    return (isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
            and t.device.type == device_type)


def cast_args(*tensors):
    """``tensors`` as autocast would pass them to a lower-precision op (unchanged without it)."""
    device_type, dtype = _lower_dtype(tensors)
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if _eligible(t, device_type) else t for t in tensors)


def cast_residual_args(x, *tensors):
    """``(x, *tensors)`` for ``x + op(x, *tensors)``: the autocast dtype promoted with x's (x
    itself when it is float64, whose conv autocast does not cast and the op then refuses)."""
    device_type, dtype = _lower_dtype((x, *tensors))
    if dtype is None or not _eligible(x, device_type):
        return (x, *tensors)
    dtype = torch.promote_types(x.dtype, dtype)
    return tuple(t.to(dtype) if _eligible(t, device_type) else t for t in (x, *tensors))


def autocast_off(fn):
    """Runs ``fn`` (an op implementation taking a tensor first) with autocast off for that
    tensor's device type. Keeps fn's signature, from which torch.library reads the op schema."""
    @functools.wraps(fn)
    def run(first, *args, **kwargs):
        device_type = first.device.type
        if not torch.is_autocast_enabled(device_type):
            return fn(first, *args, **kwargs)
        with torch.autocast(device_type, enabled=False):
            return fn(first, *args, **kwargs)
    return run
