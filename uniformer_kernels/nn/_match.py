"""Structure checks behind ``accelerate``: does a module (ours or the official code's, whatever its
class) have the attributes, layer types and hyper-parameters a drop-in forward assumes? Each
check returns None when it holds, else a short reason that ends up in the conversion error."""
from __future__ import annotations

import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..ops._depthwise_common import MAX_KERNEL_SIZE
from ..ops.attention import MAX_HEAD_DIM

CONVS = (nn.Conv2d, nn.Conv3d)


def first(*problems: str | None) -> str | None:
    return next((p for p in problems if p), None)


def missing(m: nn.Module, *names: str) -> str | None:
    absent = [n for n in names if not hasattr(m, n)]
    return f"has no {', '.join(absent)}" if absent else None


def _plain_conv(conv: nn.Conv2d | nn.Conv3d, name: str) -> str | None:
    ones = (1,) * len(conv.kernel_size)
    if conv.stride != ones or conv.dilation != ones or conv.padding_mode != "zeros":
        return f"{name} is not a stride-1, undilated, zero-padded conv"
    return None


def depthwise_conv(m: nn.Module, name: str, dim: int) -> str | None:
    conv = getattr(m, name)
    if not isinstance(conv, CONVS):
        return f"{name} is a {type(conv).__name__}, not a depthwise Conv2d/Conv3d"
    k = conv.kernel_size
    if not (conv.groups == conv.in_channels == conv.out_channels == dim):
        return f"{name} is not a depthwise conv over {dim} channels"
    if any(s % 2 == 0 or s > MAX_KERNEL_SIZE for s in k) or conv.padding != tuple(s // 2 for s in k):
        return f"{name} has kernel {k} / padding {conv.padding}: need odd kernels <= " \
               f"{MAX_KERNEL_SIZE} with padding k//2"
    return _plain_conv(conv, name)


def pointwise(m: nn.Module, name: str, in_dim: int, out_dim: int | None = None) -> str | None:
    """A Linear or 1x1 conv (groups 1): a GEMM on tokens."""
    layer = getattr(m, name)
    if isinstance(layer, nn.Linear):
        shape = (layer.out_features, layer.in_features)
    elif isinstance(layer, CONVS) and set(layer.kernel_size) == {1} and layer.groups == 1:
        if set(layer.padding) != {0}:
            return f"{name} is a padded 1x1 conv"
        shape = (layer.out_channels, layer.in_channels)
        problem = _plain_conv(layer, name)
        if problem:
            return problem
    else:
        return f"{name} is a {type(layer).__name__}, not a Linear or 1x1 conv"
    if shape[1] != in_dim or (out_dim is not None and shape[0] != out_dim):
        return f"{name} maps {shape[1]} -> {shape[0]} features, expected {in_dim} -> {out_dim or 'any'}"
    return None


def batchnorm(m: nn.Module, name: str, dim: int) -> str | None:
    bn = getattr(m, name)
    if not isinstance(bn, _BatchNorm) or not bn.affine or bn.num_features != dim:
        return f"{name} is not an affine BatchNorm over {dim} channels"
    return None


def layernorm(m: nn.Module, name: str, dim: int) -> str | None:
    ln = getattr(m, name)
    if (not isinstance(ln, nn.LayerNorm) or tuple(ln.normalized_shape) != (dim,)
            or ln.weight is None or ln.bias is None):
        return f"{name} is not a LayerNorm over {dim} channels with weight and bias"
    return None


def mlp(block_mlp: nn.Module, dim: int, name: str = "mlp") -> str | None:
    """fc1 -> exact GELU ``act`` -> fc2 back to dim (Linears or 1x1 convs)."""
    problem = missing(block_mlp, "fc1", "act", "fc2", "drop")
    if problem:
        return f"{name} {problem}"
    act = block_mlp.act
    if type(act) is not nn.GELU or act.approximate != "none":
        return f"{name}.act is {act!r}, not the exact nn.GELU()"
    fc1 = block_mlp.fc1
    hidden = fc1.out_features if isinstance(fc1, nn.Linear) else getattr(fc1, "out_channels", None)
    return first(pointwise(block_mlp, "fc1", dim), pointwise(block_mlp, "fc2", hidden, dim))


def attention(m: nn.Module, name: str, dim: int, score_update: bool = False) -> str | None:
    """``m.<name>``: multi-head attention with a packed qkv Linear and a proj Linear.
    ``score_update``: it may be the official light Attention (``trade_off``), whose module-global
    score update the converted EvoSABlock does explicitly instead."""
    attn = getattr(m, name)
    problem = missing(attn, "qkv", "proj", "num_heads", "scale", "attn_drop")
    if problem:
        return f"{name} {problem}"
    if hasattr(attn, "trade_off") and not score_update:
        return (f"{name} is the official light models' Attention, which updates module-level "
                f"token scores in its forward")
    heads = attn.num_heads
    if not isinstance(heads, int) or heads < 1 or dim % heads or dim // heads > MAX_HEAD_DIM:
        return f"{name}.num_heads={heads!r} does not split {dim} channels into heads of <= " \
               f"{MAX_HEAD_DIM}"
    if not isinstance(attn.qkv, nn.Linear) or not isinstance(attn.proj, nn.Linear):
        return f"{name}.qkv / {name}.proj are not Linears"
    return first(pointwise(attn, "qkv", dim, 3 * dim), pointwise(attn, "proj", dim, dim))


def gammas(m: nn.Module, dim: int, *names: str) -> str | None:
    for name in names:
        g = getattr(m, name, None)
        if g is not None and g.numel() != dim:
            return f"{name} has {g.numel()} elements, expected {dim}"
    return None


def biases(m: nn.Module, *names: str) -> str | None:
    absent = [n for n in names if getattr(_submodule(m, n), "bias", None) is None]
    return f"{', '.join(absent)} without bias" if absent else None


def _submodule(m: nn.Module, path: str) -> nn.Module | None:
    for name in path.split("."):
        m = getattr(m, name, None)
    return m
