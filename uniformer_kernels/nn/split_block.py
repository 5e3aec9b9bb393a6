"""SplitSABlock (video, ``split=True``): temporal attention over T at each spatial position, then
spatial attention over H*W in each frame, then the MLP.

The reference permutes the activation into (B*H*W, T, C) and back into (B*T, H*W, C) sequences;
here both attentions read strided views of the qkv GEMM's output in the channels-last (T, H*W)
token order, so the activation is never permuted.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from uniformer_models import blocks as reference

from ._base import Accelerated, drop_path_active, to_map
from .attention import attend, pos_embed_norm_tokens
from .gemm import linear, linear_add
from .mlp import add_mlp
from .sablock import attention_block_mismatch


class SplitSABlock(Accelerated, reference.SplitSABlock):
    """Drop-in SplitSABlock."""

    uk_reference_class = reference.SplitSABlock

    @classmethod
    def claims(cls, m: nn.Module) -> bool:
        return hasattr(m, "pos_embed") and hasattr(m, "t_attn")

    @classmethod
    def mismatch(cls, m: nn.Module) -> str | None:
        if getattr(getattr(m, "pos_embed", None), "weight", torch.empty(0)).dim() != 5:
            return "pos_embed is not a Conv3d (split attention is for video)"
        if hasattr(m, "gamma_1"):
            return "has layer-scale gammas, which split blocks do not apply"
        return attention_block_mismatch(m, attentions=("t_attn", "attn"),
                                        norms=("t_norm", "norm1", "norm2"))

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._dropout_active():
            return self._reference_forward(x)
        T = x.shape[2]
        y, z = pos_embed_norm_tokens(self, x, self.t_norm)  # (B, T*H*W, C) in (t, h, w) order
        o = attend(self.t_attn, z, frames=T, temporal=True)
        t = self._add_proj(self.t_attn.proj, y, o, T, per_position=True, inplace=False)
        o = attend(self.attn, self.norm1(t), frames=T)
        # the spatial branch is added to y, not to t, as the reference does
        s = self._add_proj(self.attn.proj, y, o, T, per_position=False, inplace=True)
        return to_map(add_mlp(self, s, self.norm2(s)), x.shape)

    def _add_proj(self, proj: nn.Linear, residual: torch.Tensor, o: torch.Tensor, frames: int,
                  per_position: bool, inplace: bool) -> torch.Tensor:
        """``residual + drop_path(proj(o))``. The reference's stochastic depth drops whole
        sequences (one per position for the temporal branch, per frame for the spatial one): the
        mask is drop_path applied to ones, one per sequence, broadcast over the (B, T, H*W, C)
        token view."""
        if not drop_path_active(self):
            return linear_add(o, proj.weight, proj.bias, residual, inplace=inplace)
        branch = linear(o, proj.weight, proj.bias)
        B, N, C = branch.shape
        shape = (B, 1, N // frames, 1) if per_position else (B, frames, 1, 1)
        mask = self.drop_path(branch.new_ones(math.prod(shape), 1, 1)).view(shape)
        return residual + (branch.view(B, frames, N // frames, C) * mask).view(B, N, C)
