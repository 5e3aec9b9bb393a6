"""Drop-in depthwise convs: ``nn.Conv2d/3d(C, C, k, padding=k // 2, groups=C)`` with the same
constructor, parameters (``weight``, ``bias``) and state_dict keys, forward on op 1.

    conv = uk.nn.DepthwiseConv3d(64, 64, 5, padding=2, groups=64)
    conv = uk.nn.DepthwiseConv2d.from_conv(model.pos_embed)     # shares the existing parameters

Only what op 1 computes can be built (stride 1, dilation 1, zero padding k//2, odd kernels <= 7,
groups == in_channels == out_channels): anything else is a ValueError naming the argument, at
construction, rather than a module that silently runs PyTorch's conv.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..ops._depthwise_common import MAX_KERNEL_SIZE
from ..ops.depthwise import depthwise_conv


def _check(conv: nn.Conv2d | nn.Conv3d) -> None:
    name = type(conv).__name__
    ones = (1,) * len(conv.kernel_size)
    if not conv.in_channels == conv.out_channels == conv.groups:
        raise ValueError(f"{name}: in_channels, out_channels and groups must be equal (a "
                         f"depthwise conv), got {conv.in_channels}, {conv.out_channels}, "
                         f"{conv.groups}")
    if any(k % 2 == 0 or k > MAX_KERNEL_SIZE for k in conv.kernel_size):
        raise ValueError(f"{name}: kernel_size must be odd and <= {MAX_KERNEL_SIZE} in every "
                         f"dim, got {conv.kernel_size}")
    if conv.stride != ones:
        raise ValueError(f"{name}: stride must be 1, got {conv.stride}")
    if conv.dilation != ones:
        raise ValueError(f"{name}: dilation must be 1, got {conv.dilation}")
    same = tuple(k // 2 for k in conv.kernel_size)
    if conv.padding not in (same, "same"):
        raise ValueError(f"{name}: padding must be kernel_size // 2 = {same} (or 'same'), got "
                         f"{conv.padding}")
    if conv.padding_mode != "zeros":
        raise ValueError(f"{name}: padding_mode must be 'zeros', got {conv.padding_mode!r}")


class _DepthwiseConv:
    torch_class: type  # the nn.ConvNd it replaces

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _check(self)

    @classmethod
    def from_conv(cls, conv: nn.Module):
        """A drop-in module holding ``conv``'s own parameters (no copy: training either trains
        both). Raises ValueError when ``conv`` is not a depthwise conv op 1 computes."""
        if not isinstance(conv, cls.torch_class):
            raise TypeError(f"from_conv: expected an nn.{cls.torch_class.__name__}, got "
                            f"{type(conv).__name__}")
        _check(conv)
        module = cls.__new__(cls)
        module.__dict__ = {k: dict(v) if k in ("_parameters", "_buffers", "_modules") else v
                           for k, v in conv.__dict__.items()}
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return depthwise_conv(x, self.weight, self.bias)


class DepthwiseConv2d(_DepthwiseConv, nn.Conv2d):
    """``nn.Conv2d(C, C, k, padding=k // 2, groups=C)`` on op 1 (either memory format in, the
    same out)."""

    torch_class = nn.Conv2d


class DepthwiseConv3d(_DepthwiseConv, nn.Conv3d):
    """``nn.Conv3d(C, C, k, padding=k // 2, groups=C)`` on op 1."""

    torch_class = nn.Conv3d
