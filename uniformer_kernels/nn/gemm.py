"""UniFormer's 1x1 convs and Linears as GEMMs on (tokens, C) matrices, with their epilogues (bias,
exact GELU, residual add) inside the GEMM call where the backend allows. We write no GEMM.

Plain and GELU GEMMs at inference on CPU (no autograd, no autocast, float32, or bfloat16 where
oneDNN supports it): oneDNN's matmul with the bias and exact GELU as post-ops,
``torch.ops.mkldnn._linear_pointwise`` (the op inductor lowers to); measured on UniFormer-S
shapes it matches or beats MKL's sgemm, and the fused GELU saves a pass. Elsewhere (training,
autocast, CUDA) and under torch.compile (inductor lowers the oneDNN op only for frozen, constant
weights, and fuses epilogues into its own kernels): ``F.linear`` and ``F.gelu``, in place when
autograd does not need the GEMM's output.

Residual adds: ``torch.addmm`` with the residual as the accumulator, in place into a residual the
caller no longer needs. (oneDNN's binary-add post-op measured slower than that, up to 3x with a
bias, so it is not used.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_MKLDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_MKLDNN_BF16 = _MKLDNN and torch.ops.mkldnn._is_mkldnn_bf16_supported()
# oneDNN's call costs ~50 us more than MKL's (primitive lookup, weight reorder): below this many
# multiply-adds MKL is faster (measured: 64x64x256 MKL, 49x512x2048 oneDNN)
_ONEDNN_MIN_MACS = 1 << 22


def _needs_autograd(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _onednn(x: torch.Tensor, weight: torch.Tensor, *tensors) -> bool:
    """Whether the oneDNN post-op path serves this call."""
    if not _MKLDNN or x.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    if x.numel() * weight.shape[0] < _ONEDNN_MIN_MACS:
        return False
    if torch.is_autocast_enabled("cpu"):
        return False
    if x.dtype != torch.float32 and not (x.dtype == torch.bfloat16 and _MKLDNN_BF16):
        return False
    if any(t is not None and t.dtype != x.dtype for t in (weight, *tensors)):
        return False
    return not _needs_autograd(x, weight, *tensors)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           gelu: bool = False) -> torch.Tensor:
    """``x W^T + b`` over x's last dim, then the exact (erf) GELU when ``gelu``."""
    if _onednn(x, weight, bias):
        y = torch.ops.mkldnn._linear_pointwise(_rows(x), weight, bias, "gelu" if gelu else "none",
                                               [], "none" if gelu else "")
        return y.view(*x.shape[:-1], weight.shape[0])
    y = F.linear(x, weight, bias)
    if not gelu:
        return y
    # in place saves an allocation and a cold write when autograd does not need y (GELU's
    # backward reads its input)
    return F.gelu(y) if _needs_autograd(y) else torch.ops.aten.gelu_(y)


def linear_add(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               residual: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``residual + x W^T + b`` (residual has the output's shape), the residual as the GEMM's
    accumulator (``addmm``, beta 1). ``inplace``: the caller owns residual and no longer needs it,
    so without autograd the GEMM accumulates straight into it (no copy of the residual at all).

    Under autocast the GEMM runs in the autocast dtype and the sum in the residual's, as the
    reference's ``x + branch`` promotes it, so the residual stream keeps its precision.
    """
    if torch.is_autocast_enabled(x.device.type):
        return residual + F.linear(x, weight, bias)
    grad = _needs_autograd(x, weight, bias, residual)
    rows = _rows(residual)
    y = rows.addmm_(_rows(x), weight.t()) if inplace and not grad else torch.addmm(rows, _rows(x), weight.t())
    if bias is not None:
        y = y + bias if grad else y.add_(bias)
    return y.view(residual.shape)
