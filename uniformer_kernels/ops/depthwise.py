"""Op 1: depthwise conv, 2-D and 3-D, stride 1, zero padding k//2, optional fused residual.

    y = conv(x, weight, bias, groups=C)  (+ x when residual)

UniFormer's positional encoding is ``x + DWConv3(x)`` (residual) and its local affinity is a
DWConv5. Backends: triton, cuda and cpu kernels (see _depthwise_common), eager (PyTorch's conv).
Registered as the custom op ``uniformer_kernels::depthwise_conv`` with a fake implementation and
autograd, its backward being the custom op ``uniformer_kernels::depthwise_conv_backward``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _autocast
from . import _depthwise_common as common
from . import _device_guard
from ._direct_call import may_skip_dispatch


def depthwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   residual: bool = False) -> torch.Tensor:
    """Depthwise conv of ``x`` (N, C, H, W) or (N, C, D, H, W), either memory format.

    ``weight`` is an ``nn.Conv2d/3d(C, C, k, groups=C)`` weight, (C, 1, [KD,] KH, KW), every kernel
    size odd and at most 7; ``bias`` (C,) or None. With ``residual`` the result is ``x + conv(x)``.
    Returns x's shape, dtype and memory format; computes in float32 (float64 for float64 input).
    Differentiable in x, weight and bias. Under ``torch.autocast`` the dtypes are those of
    ``F.conv2d/3d`` (and of ``x + conv(x)`` with ``residual``): see ``_autocast``.
    """
    if not isinstance(residual, bool):
        raise TypeError(f"residual: expected a bool, got {type(residual).__name__}")
    cast = _autocast.cast_residual_args if residual else _autocast.cast_args
    x, weight, bias = cast(x, weight, bias)
    common.check_conv_args(x, weight, bias)
    op = _depthwise_conv_impl if may_skip_dispatch(x, weight, bias) else _depthwise_conv
    return op(x, weight, bias, residual)


def eager_depthwise_conv(x, weight, bias, residual):
    """The eager composition (the eager backend, and what the kernels are checked against)."""
    conv = F.conv2d if x.dim() == 4 else F.conv3d
    y = conv(x, weight, bias, padding=[k // 2 for k in weight.shape[2:]], groups=x.shape[1])
    if residual:
        y = y + x
    return y.contiguous(memory_format=common.memory_format_of(x))


@_autocast.autocast_off
def _depthwise_conv_impl(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         residual: bool) -> torch.Tensor:
    backend = common.choose_backend(x, "depthwise_conv")
    if backend == "eager":
        return eager_depthwise_conv(x, weight, bias, residual)
    if backend == "cpu":  # one C++ call, relayouts included
        if x.dtype in common.CPU_KERNEL_DTYPES:
            return torch.ops.uniformer_kernels_C.depthwise_conv_cpu(x, weight, bias, residual)
        y = torch.ops.uniformer_kernels_C.depthwise_conv_cpu(
            x.float(), weight.float(), None if bias is None else bias.float(), residual)
        return y.to(x.dtype)
    kernels = common.kernels(backend)
    acc = common.accumulation_dtype(x.dtype)
    with _device_guard.on_device_of(x):
        y5 = kernels.depthwise_conv_forward(
            common.to_channels_last_5d(x),
            common.weight_to_kernel_layout(weight, acc),
            None if bias is None else bias.to(acc).contiguous(),
            residual)
    return common.from_channels_last_5d(y5.to(x.dtype), x)


_depthwise_conv = torch.library.custom_op("uniformer_kernels::depthwise_conv",
                                          mutates_args=())(_depthwise_conv_impl)


@_depthwise_conv.register_fake
def _(x, weight, bias, residual):
    return torch.empty_like(x, memory_format=common.memory_format_of(x))


@torch.library.custom_op("uniformer_kernels::depthwise_conv_backward", mutates_args=())
@_autocast.autocast_off
def _depthwise_conv_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                             has_bias: bool, residual: bool, output_mask: list[bool]
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight, grad_bias); an entry whose output_mask is False is an empty tensor."""
    need_x, need_weight, need_bias = output_mask
    backend = common.choose_backend(x, "depthwise_conv backward")
    if backend == "eager":
        spatial = x.dim() - 2
        grad_x, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
            grad_y, x, weight, [x.shape[1]] if has_bias else None, [1] * spatial,
            [k // 2 for k in weight.shape[2:]], [1] * spatial, False, [0] * spatial, x.shape[1],
            [need_x, need_weight, need_bias])
        if need_x:
            grad_x = grad_x + grad_y if residual else grad_x
            grad_x = grad_x.contiguous(memory_format=common.memory_format_of(x))
    elif backend == "cpu":  # one C++ call, relayouts included
        if x.dtype in common.CPU_KERNEL_DTYPES:
            grad_x, grad_weight, grad_bias = torch.ops.uniformer_kernels_C.depthwise_conv_backward_cpu(
                grad_y, x, weight, residual, output_mask)
        else:
            grads = torch.ops.uniformer_kernels_C.depthwise_conv_backward_cpu(
                grad_y.float(), x.float(), weight.float(), residual, output_mask)
            grad_x, grad_weight, grad_bias = (g.to(x.dtype) for g in grads)
    else:
        with _device_guard.on_device_of(x):
            grad_x, grad_weight, grad_bias = _kernel_backward(backend, grad_y, x, weight, residual,
                                                              need_x, need_weight or need_bias)
    # A fresh empty tensor per skipped gradient: a custom op may not return one tensor twice.
    return (grad_x if need_x else x.new_empty(0), grad_weight if need_weight else x.new_empty(0),
            grad_bias if need_bias else x.new_empty(0))


def _kernel_backward(backend, grad_y, x, weight, residual, need_x, need_weight_or_bias):
    """(grad_x, grad_weight, grad_bias) from the triton or cuda kernels; None where not needed."""
    kernels = common.kernels(backend)
    acc = common.accumulation_dtype(x.dtype)
    grad_y5 = common.to_channels_last_5d(grad_y)
    grad_x = grad_weight = grad_bias = None
    if need_x:
        flipped = common.weight_to_kernel_layout(weight, acc).flip(0, 1, 2).contiguous()
        grad_x5 = kernels.depthwise_conv_forward(grad_y5, flipped, None, residual)
        grad_x = common.from_channels_last_5d(grad_x5.to(x.dtype), x)
    if need_weight_or_bias:
        x5 = common.to_channels_last_5d(x)
        grad_w5, grad_b = kernels.depthwise_conv_backward_weight(
            grad_y5, x5, common.kernel_size_5d(tuple(weight.shape[2:])),
            torch.are_deterministic_algorithms_enabled())
        grad_weight = common.weight_from_kernel_layout(grad_w5, weight)
        grad_bias = grad_b.to(x.dtype)
    return grad_x, grad_weight, grad_bias


@_depthwise_conv_backward.register_fake
def _(grad_y, x, weight, has_bias, residual, output_mask):
    need_x, need_weight, need_bias = output_mask
    return (torch.empty_like(x, memory_format=common.memory_format_of(x)) if need_x else x.new_empty(0),
            torch.empty_like(weight, memory_format=torch.contiguous_format) if need_weight
            else x.new_empty(0),
            x.new_empty(x.shape[1]) if need_bias else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None
    ctx.residual = residual


def _backward(ctx, grad_y):
    x, weight = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1],
            ctx.has_bias and ctx.needs_input_grad[2]]
    grad_x, grad_weight, grad_bias = _depthwise_conv_backward(grad_y, x, weight, ctx.has_bias,
                                                              ctx.residual, mask)
    return (grad_x if mask[0] else None,
            common.in_layout_of(grad_weight, weight) if mask[1] else None,
            grad_bias if mask[2] else None, None)


_depthwise_conv.register_autograd(_backward, setup_context=_setup_context)
