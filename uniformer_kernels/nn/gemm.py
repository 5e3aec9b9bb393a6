"""UniFormer's 1x1 convs and Linears as GEMMs on (tokens, C) matrices, with their epilogues (bias,
exact GELU, residual add) inside the GEMM call where the backend allows. We write no GEMM.

Plain and GELU GEMMs at inference on CPU (no autograd, no autocast, float32, or bfloat16 where
oneDNN supports it): oneDNN's matmul with the bias and exact GELU as post-ops,
``torch.ops.mkldnn._linear_pointwise`` (the op inductor lowers to); measured on UniFormer-S
shapes it matches or beats MKL's sgemm, and the fused GELU saves a pass. Elsewhere (training,
autocast, CUDA) and under torch.compile (inductor lowers the oneDNN op only for frozen, constant
weights, and fuses epilogues into its own kernels), export and torch.jit.trace (the TorchScript
tracer cannot record the oneDNN op's optional scalar list, and neither should keep a
machine-specific op): ``F.linear`` and ``F.gelu``, in place when autograd does not need the GEMM's
output.

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
    if not _MKLDNN or x.device.type != "cpu":
        return False
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
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


class _Matrix(torch.autograd.Function):
    """``weight.flatten(1)`` whose gradient comes back in weight's own strides (see ``matrix``)."""

    @staticmethod
    def forward(weight):
        return weight.flatten(1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.shape, ctx.strides = inputs[0].shape, inputs[0].stride()

    @staticmethod
    def backward(ctx, grad):
        return torch.empty_strided(ctx.shape, ctx.strides, dtype=grad.dtype,
                                   device=grad.device).copy_(grad.view(ctx.shape))


def matrix(weight: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv's or Linear's weight as the (out, in) GEMM matrix. A channels-last 1x1 weight
    (``model.to(memory_format=torch.channels_last)``) would get a gradient with other strides in
    its size-1 dims through flatten's backward, which DDP warns about and copies slowly; it goes
    through ``_Matrix`` instead."""
    rows = weight.shape[1:].numel()
    if weight.stride() == (rows, *(1,) * (weight.dim() - 1)):  # what flatten's backward gives
        return weight.flatten(1)
    return _Matrix.apply(weight)


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
