"""The stems between stages, producing the channels-last maps the blocks work in.

PatchEmbed: strided conv, then LayerNorm over channels on the token view (the reference
transposes to tokens, normalises and copies back to contiguous NCHW; here the conv's channels-last
output already is the token matrix). Conv stems (head_embedding, middle_embedding): their
Sequential with each eval-mode BatchNorm folded into the conv before it.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from uniformer_models import layers as reference

from . import _match
from ._base import Accelerated, channels_last, channels_last_weight, to_map, tokens
from .fold import conv_bn


class PatchEmbed(Accelerated, reference.PatchEmbed):
    """Drop-in PatchEmbed (2D and 3D). The first stem converts the NCHW input to channels-last
    (one copy of the image); every later one receives channels-last maps."""

    uk_reference_class = reference.PatchEmbed

    @classmethod
    def claims(cls, m: nn.Module) -> bool:
        return dict(m.named_children()).keys() == {"proj", "norm"} and isinstance(m.proj, _match.CONVS)

    @classmethod
    def mismatch(cls, m: nn.Module) -> str | None:
        if getattr(m, "flatten", False):
            return "flattens its output to tokens (a timm-style PatchEmbed), not a UniFormer stem"
        return _match.layernorm(m, "norm", m.proj.out_channels)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        proj = self.proj
        weight = channels_last_weight(proj, lambda: proj.weight, (proj.weight,))
        x = proj._conv_forward(channels_last(x), weight, proj.bias)
        return to_map(self.norm(tokens(x)), x.shape)


class _ConvStem(Accelerated):
    # the official conv stems: [Conv, BN, GELU, Conv, BN] (stage 1) and [Conv, BN] (later stages)
    pattern: tuple[type, ...]

    @classmethod
    def claims(cls, m: nn.Module) -> bool:
        proj = getattr(m, "proj", None)
        return (dict(m.named_children()).keys() == {"proj"} and isinstance(proj, nn.Sequential)
                and len(proj) == len(cls.pattern)
                and all(isinstance(layer, t) for layer, t in zip(proj, cls.pattern)))

    @classmethod
    def mismatch(cls, m: nn.Module) -> str | None:
        gelus = [layer for layer in m.proj if isinstance(layer, nn.GELU)]
        if any(g.approximate != "none" for g in gelus):
            return "uses the tanh GELU"
        return None

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = channels_last(x)
        layers = list(self.proj)
        i = 0
        while i < len(layers):  # the patterns pair every conv with the BatchNorm after it
            if isinstance(layers[i], nn.Conv2d):
                x = conv_bn(x, layers[i], layers[i + 1])
                i += 2
            else:
                x = layers[i](x)
                i += 1
        return x


class head_embedding(_ConvStem, reference.head_embedding):  # noqa: N801 - official name
    """Drop-in stage-1 conv stem (two 3x3 stride-2 convs with BatchNorm, GELU between)."""

    uk_reference_class = reference.head_embedding
    pattern = (nn.Conv2d, _BatchNorm, nn.GELU, nn.Conv2d, _BatchNorm)


class middle_embedding(_ConvStem, reference.middle_embedding):  # noqa: N801 - official name
    """Drop-in conv stem of stages 2-4 (3x3 stride-2 conv with BatchNorm)."""

    uk_reference_class = reference.middle_embedding
    pattern = (nn.Conv2d, _BatchNorm)
