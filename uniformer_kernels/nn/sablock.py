"""SABlock, the global relation aggregator (2D and 3D), on token-major activations.

Reference: ``x = x + pos_embed(x)``, then on tokens ``x = x + attn(norm1(x)); x = x + mlp(norm2(x))``.
Here: positional encoding + norm1 in one pass (op 2), qkv GEMM, fused attention (op 4), proj GEMM
with the residual in the call, norm2, the MLP (op 5). Returns a channels-last map (the reference
returns the same channels-last-strided view).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from uniformer_models import blocks as reference

from . import _match
from ._base import Accelerated, add_linear, gamma, to_map
from .attention import attend, pos_embed_norm_tokens
from .mlp import add_mlp


def attention_block_mismatch(m: nn.Module, *extra: str, attentions=("attn",),
                             norms=("norm1", "norm2"), score_update: bool = False) -> str | None:
    """The checks every attention block shares (SABlock, windows, split, Evo); ``score_update``:
    see ``_match.attention``."""
    problem = _match.missing(m, "pos_embed", "mlp", "drop_path", *norms, *attentions, *extra)
    if problem:
        return problem
    dim = getattr(m.pos_embed, "in_channels", 0)
    return _match.first(
        _match.depthwise_conv(m, "pos_embed", dim),
        *(_match.layernorm(m, n, dim) for n in norms),
        *(_match.attention(m, a, dim, score_update) for a in attentions),
        _match.mlp(m.mlp, dim), _match.gammas(m, dim, "gamma_1", "gamma_2", "gamma_3"))


class SABlock(Accelerated, reference.SABlock):
    """Drop-in SABlock (global attention over all H*W or T*H*W tokens)."""

    uk_reference_class = reference.SABlock

    @classmethod
    def claims(cls, m: nn.Module) -> bool:
        return hasattr(m, "pos_embed") and hasattr(m, "attn")

    @classmethod
    def mismatch(cls, m: nn.Module) -> str | None:
        return attention_block_mismatch(m)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._dropout_active():
            return self._reference_forward(x)
        y, z = pos_embed_norm_tokens(self, x, self.norm1)
        proj = self.attn.proj
        x1 = add_linear(self, y, attend(self.attn, z), proj.weight, proj.bias, gamma(self, "gamma_1"))
        x2 = add_mlp(self, x1, self.norm2(x1), gamma(self, "gamma_2"))
        return to_map(x2, x.shape)
