"""Op 2: UniFormer's positional encoding and the norm after it, in one pass over the activation.

    y = x + DWConv(x; weight, bias)        (the block's residual stream)
    z = norm(y)                            (the input of the block's token mixer)

``norm="layernorm"``: LayerNorm over the channels of each pixel (SABlock's norm1, eps 1e-6).
``norm="affine"``: ``z = y * norm_weight + norm_bias`` per channel: an eval-mode BatchNorm (CBlock's
norm1) with its statistics folded in by the caller (see :func:`fold_batchnorm`).

The kernels compute y and z in the same pass, so y is read back from cache, not memory. The
backward composes the norm's backward (PyTorch) with the depthwise conv kernels. Backends as for
``depthwise_conv``. Registered as ``uniformer_kernels::pos_embed_norm`` (+ ``_backward``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _autocast
from . import _depthwise_common as common
from . import _device_guard
from ._direct_call import may_skip_dispatch
from .depthwise import _depthwise_conv_backward, eager_depthwise_conv

NORMS = {"layernorm": 0, "affine": 1}


def pos_embed_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   norm_weight: torch.Tensor, norm_bias: torch.Tensor, norm: str = "layernorm",
                   eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(y, z)``, both with x's shape, dtype and memory format.

    ``x`` (N, C, H, W) or (N, C, D, H, W); ``weight`` (C, 1, k...) with odd kernel sizes <= 7,
    ``bias`` (C,) or None; ``norm_weight``, ``norm_bias`` (C,). Differentiable in every tensor.
    Under ``torch.autocast``, y has the dtype of ``x + conv(x)`` (the autocast dtype promoted with
    x's) and z y's dtype; the norm computes in float32 either way.
    """
    x, weight, bias, norm_weight, norm_bias = _autocast.cast_residual_args(
        x, weight, bias, norm_weight, norm_bias)
    common.check_conv_args(x, weight, bias)
    if norm not in NORMS:
        raise ValueError(f"norm: expected one of {sorted(NORMS)}, got {norm!r}")
    channels = x.shape[1]
    for name, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        common.check_tensor(name, t, like=x)
        if tuple(t.shape) != (channels,):
            raise ValueError(f"{name}: expected shape ({channels},), got {tuple(t.shape)}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"eps: expected a non-negative number, got {eps!r}")
    if bias is None:
        bias = x.new_zeros(channels)
    direct = may_skip_dispatch(x, weight, bias, norm_weight, norm_bias)
    op = _pos_embed_norm_impl if direct else _pos_embed_norm
    y, z, _, _ = op(x, weight, bias, norm_weight, norm_bias, NORMS[norm], float(eps))
    return y, z


def fold_batchnorm(bn: torch.nn.BatchNorm2d | torch.nn.BatchNorm3d) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) with ``bn(y) == y * scale + shift`` per channel in eval mode."""
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


def _eager_norm(y: torch.Tensor, norm_weight, norm_bias, norm: int, eps: float) -> torch.Tensor:
    shape = (1, -1) + (1,) * (y.dim() - 2)
    if norm == 1:
        return y * norm_weight.view(shape) + norm_bias.view(shape)
    z = F.layer_norm(y.movedim(1, -1), (y.shape[1],), norm_weight, norm_bias, eps).movedim(-1, 1)
    return z.contiguous(memory_format=common.memory_format_of(y))


@_autocast.autocast_off
def _pos_embed_norm_impl(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                         norm_weight: torch.Tensor, norm_bias: torch.Tensor, norm: int, eps: float
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, z, mean, rstd); mean and rstd per pixel (N*D*H*W,) for layernorm, empty for affine."""
    backend = common.choose_backend(x, "pos_embed_norm")
    acc = common.accumulation_dtype(x.dtype)
    if backend == "eager":
        y = eager_depthwise_conv(x, weight, bias, residual=True)
        z = _eager_norm(y, norm_weight, norm_bias, norm, eps)
        if norm == 1:
            return y, z, x.new_empty(0, dtype=acc), x.new_empty(0, dtype=acc)
        y_pixels = common.to_channels_last_5d(y).flatten(0, 3).to(acc)
        var, mean = torch.var_mean(y_pixels, dim=1, correction=0)
        return y, z, mean, torch.rsqrt(var + eps)
    if backend == "cpu":  # one C++ call, relayouts included
        tensors = (x, weight, bias, norm_weight, norm_bias)
        if x.dtype in common.CPU_KERNEL_DTYPES:
            return torch.ops.uniformer_kernels_C.pos_embed_norm_cpu(*tensors, norm, eps)
        y, z, mean, rstd = torch.ops.uniformer_kernels_C.pos_embed_norm_cpu(
            *(t.float() for t in tensors), norm, eps)
        return y.to(x.dtype), z.to(x.dtype), mean, rstd
    kernels = common.kernels(backend)
    with _device_guard.on_device_of(x):
        y5, z5, mean, rstd = kernels.pos_embed_norm_forward(
            common.to_channels_last_5d(x),
            common.weight_to_kernel_layout(weight, acc),
            *(t.to(acc).contiguous() for t in (bias, norm_weight, norm_bias)), norm, eps)
    return (common.from_channels_last_5d(y5.to(x.dtype), x),
            common.from_channels_last_5d(z5.to(x.dtype), x), mean.to(acc), rstd.to(acc))


_pos_embed_norm = torch.library.custom_op("uniformer_kernels::pos_embed_norm",
                                          mutates_args=())(_pos_embed_norm_impl)


@_pos_embed_norm.register_fake
def _(x, weight, bias, norm_weight, norm_bias, norm, eps):
    acc = common.accumulation_dtype(x.dtype)
    pixels = x.numel() // x.shape[1] if norm == 0 else 0
    fmt = common.memory_format_of(x)
    return (torch.empty_like(x, memory_format=fmt), torch.empty_like(x, memory_format=fmt),
            x.new_empty(pixels, dtype=acc), x.new_empty(pixels, dtype=acc))


@torch.library.custom_op("uniformer_kernels::pos_embed_norm_backward", mutates_args=())
@_autocast.autocast_off
def _pos_embed_norm_backward(grad_y: torch.Tensor, grad_z: torch.Tensor, x: torch.Tensor,
                             weight: torch.Tensor, y: torch.Tensor, mean: torch.Tensor,
                             rstd: torch.Tensor, norm_weight: torch.Tensor, norm: int
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                        torch.Tensor]:
    """(grad_x, grad_weight, grad_bias, grad_norm_weight, grad_norm_bias)."""
    acc = common.accumulation_dtype(x.dtype)
    # The norm's backward on (pixels, C) rows in the accumulation dtype.
    g = common.to_channels_last_5d(grad_z).flatten(0, 3).to(acc)
    y_pixels = common.to_channels_last_5d(y).flatten(0, 3).to(acc)
    if norm == 1:
        grad_y_from_z = g * norm_weight.to(acc)
        grad_norm_weight = (g * y_pixels).sum(0)
        grad_norm_bias = g.sum(0)
    else:  # ATen's fused LayerNorm backward, on the statistics the forward kernel saved
        w = norm_weight.to(acc)
        # the bias argument only shapes grad_bias (ATen refuses None when grad_bias is wanted)
        grad_y_from_z, grad_norm_weight, grad_norm_bias = torch.ops.aten.native_layer_norm_backward(
            g, y_pixels, [g.shape[1]], mean.to(acc), rstd.to(acc), w, w, [True, True, True])
    grad_y5 = common.to_channels_last_5d(grad_y).to(acc) + grad_y_from_z.view(
        common.to_channels_last_5d(grad_y).shape)
    grad_y_total = common.from_channels_last_5d(grad_y5, x).to(x.dtype)
    grad_x, grad_weight, grad_bias = _depthwise_conv_backward(
        grad_y_total, x, weight, True, True, [True, True, True])
    return (grad_x, grad_weight, grad_bias, grad_norm_weight.to(x.dtype),
            grad_norm_bias.to(x.dtype))


@_pos_embed_norm_backward.register_fake
def _(grad_y, grad_z, x, weight, y, mean, rstd, norm_weight, norm):
    channels = x.shape[1]
    return (torch.empty_like(x, memory_format=common.memory_format_of(x)),
            torch.empty_like(weight, memory_format=torch.contiguous_format),
            x.new_empty(channels), x.new_empty(channels), x.new_empty(channels))


def _setup_context(ctx, inputs, output):
    x, weight, bias, norm_weight, norm_bias, norm, eps = inputs
    y, z, mean, rstd = output
    ctx.save_for_backward(x, weight, y, mean, rstd, norm_weight)
    ctx.mark_non_differentiable(mean, rstd)  # saved statistics, not results anyone differentiates
    ctx.norm = norm


def _backward(ctx, grad_y, grad_z, grad_mean, grad_rstd):
    x, weight, y, mean, rstd, norm_weight = ctx.saved_tensors
    grad_y = torch.zeros_like(y) if grad_y is None else grad_y
    grad_z = torch.zeros_like(y) if grad_z is None else grad_z
    grad_x, grad_weight, *grad_vectors = _pos_embed_norm_backward(
        grad_y, grad_z, x, weight, y, mean, rstd, norm_weight, ctx.norm)
    return (grad_x, common.in_layout_of(grad_weight, weight), *grad_vectors, None, None)


_pos_embed_norm.register_autograd(_backward, setup_context=_setup_context)
