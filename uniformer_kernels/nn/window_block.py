"""SABlock_Windows (dense backbones): SABlock with attention inside window_size^2 windows.

The reference pads the H x W grid right/bottom after norm1 and before the qkv Linear, without a
mask; the fused attention reproduces that from the unpadded qkv (padding tokens' q, k and v are the
qkv bias), so no padded, partitioned or cropped copy of the activation is made here.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from uniformer_models import blocks as reference

from ._base import Accelerated, add_linear, to_map
from .attention import attend, pos_embed_norm_tokens
from .mlp import add_mlp
from .sablock import attention_block_mismatch


class SABlock_Windows(Accelerated, reference.SABlock_Windows):  # noqa: N801 - official name
    """Drop-in SABlock_Windows."""

    uk_reference_class = reference.SABlock_Windows

    @classmethod
    def claims(cls, m: nn.Module) -> bool:
        return hasattr(m, "pos_embed") and hasattr(m, "window_size")

    @classmethod
    def mismatch(cls, m: nn.Module) -> str | None:
        if not isinstance(m.window_size, int) or m.window_size < 1:
            return f"window_size={m.window_size!r} is not a positive int"
        if m.pos_embed.weight.dim() != 4:
            return "pos_embed is not 2-D (window attention is for images)"
        if hasattr(m, "gamma_1"):
            return "has layer-scale gammas, which window blocks do not apply"
        return attention_block_mismatch(m)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._dropout_active():
            return self._reference_forward(x)
        y, z = pos_embed_norm_tokens(self, x, self.norm1)
        o = attend(self.attn, z, grid=tuple(x.shape[2:]), window_size=self.window_size)
        x1 = add_linear(self, y, o, self.attn.proj.weight, self.attn.proj.bias)
        x2 = add_mlp(self, x1, self.norm2(x1))
        return to_map(x2, x.shape)
