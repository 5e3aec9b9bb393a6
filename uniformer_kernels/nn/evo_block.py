"""EvoSABlock (light models, stages 3-4): SABlock over [class token, patch tokens] with Evo-ViT
token pruning, the running scores carried explicitly as in the reference:

    forward(cls_token, x, global_attn, token_indices) -> (cls_token, x, global_attn, token_indices)

The class token's attention row comes out of the fused attention (op 4, ``return_cls_attn``)
instead of a materialised attention matrix; the GEMMs add their residuals in the call. The token
sort, merge, restore and score update are the reference's own functions.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn as nn

from uniformer_models import uniformer_light as reference
from uniformer_models.uniformer_light import prune_tokens, restore_tokens, update_scores

from ..ops.depthwise import depthwise_conv
from ._base import Accelerated, add_linear, channels_last, gamma, like, to_map, tokens
from .attention import attend
from .gemm import linear
from .mlp import hidden
from .sablock import attention_block_mismatch


class EvoSABlock(Accelerated, reference.EvoSABlock):
    """Drop-in EvoSABlock (the explicit-state form of uniformer_models)."""

    uk_reference_class = reference.EvoSABlock

    @classmethod
    def claims(cls, m: nn.Module) -> bool:
        return hasattr(m, "pos_embed") and hasattr(m, "prune_ratio")

    @classmethod
    def mismatch(cls, m: nn.Module) -> str | None:
        params = list(inspect.signature(type(m).forward).parameters)
        if len(params) != 5:
            return (f"forward({', '.join(params[1:])}) keeps the token-pruning state in module "
                    f"globals (official code); build the model with uniformer_models, whose "
                    f"EvoSABlock carries it explicitly and loads the same checkpoints")
        problem = attention_block_mismatch(m, "trade_off", "downsample")
        if problem is None and m.downsample and not hasattr(m, "avgpool"):
            problem = "downsample is set but there is no avgpool"
        return problem

    def _forward(self, cls_token, x, global_attn, token_indices):
        if self._dropout_active():
            return self._reference_forward(cls_token, x, global_attn, token_indices)
        x = channels_last(x)
        H, W = x.shape[2:]
        pe = self.pos_embed
        x_tokens = tokens(depthwise_conv(x, like(pe.weight, x), like(pe.bias, x), residual=True))

        if self.prune_ratio == 1:
            seq = torch.cat([cls_token, x_tokens], dim=1)
            seq, global_attn, _ = self._attention_mlp(seq, global_attn)
            return seq[:, :1], to_map(seq[:, 1:], x.shape), global_attn, token_indices

        N = x_tokens.shape[1]
        n_keep = int(N * self.prune_ratio)
        x_info, x_drop, rep_token, global_attn, token_indices = prune_tokens(
            x_tokens, global_attn, token_indices, n_keep)
        seq = torch.cat((cls_token, x_info, rep_token), dim=1)

        # slow update of the attended tokens; the representative's updates (fast update) are
        # added to every dropped token
        seq, global_attn, fast_update = self._attention_mlp(seq, global_attn)
        g3 = gamma(self, "gamma_3")
        fast_update = fast_update if g3 is None else g3 * fast_update
        x_drop = x_drop + fast_update.expand(-1, N - n_keep, -1)

        x_sorted = torch.cat((seq[:, 1:-1], x_drop), dim=1)
        x_tokens, global_attn, token_indices = restore_tokens(self, x_sorted, global_attn,
                                                              token_indices, (H, W))
        return seq[:, :1], to_map(x_tokens, x.shape), global_attn, token_indices

    def _attention_mlp(self, seq: torch.Tensor, global_attn: torch.Tensor | None):
        """The transformer block on ``seq`` (B, N, C), the running-score update, and the
        unscaled attention + MLP branches of the last token (the representative, when pruned)."""
        o, cls_attn = attend(self.attn, self.norm1(seq), return_cls_attn=True)
        global_attn = update_scores(global_attn, cls_attn.to(_softmax_dtype(o)), self.trade_off)

        proj, fc2 = self.attn.proj, self.mlp.fc2
        seq1 = add_linear(self, seq, o, proj.weight, proj.bias, gamma(self, "gamma_1"))
        h = hidden(self.mlp, self.norm2(seq1))
        seq2 = add_linear(self, seq1, h, fc2.weight, fc2.bias, gamma(self, "gamma_2"))
        fast_update = None
        if self.prune_ratio != 1:  # one token's branches again: cheaper than keeping whole ones
            fast_update = (linear(o[:, -1:], proj.weight, proj.bias)
                           + linear(h[:, -1:], fc2.weight, fc2.bias))
        return seq2, global_attn, fast_update


def _softmax_dtype(o: torch.Tensor) -> torch.dtype:
    """The dtype of the reference's class row, which comes out of its softmax: float32 under CUDA
    autocast (softmax is on autocast's float32 list there, not on the CPU's), else the dtype the
    attention ran in (o's)."""
    if o.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        return torch.float32
    return o.dtype
