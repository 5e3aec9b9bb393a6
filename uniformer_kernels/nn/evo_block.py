"""EvoSABlock (light models, stages 3-4): SABlock over [class token, patch tokens] with Evo-ViT
token pruning, the running scores carried explicitly as in the reference:

    forward(cls_token, x, global_attn, token_indices) -> (cls_token, x, global_attn, token_indices)

The class token's attention row comes out of the fused attention (op 4, ``return_cls_attn``)
instead of a materialised attention matrix; the GEMMs add their residuals in the call. The token
sort, merge and restore are the reference's gathers.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn as nn

from uniformer_models import uniformer_light as reference
from uniformer_models.uniformer_light import _gather_tokens

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
        B, C, H, W = x.shape
        pe = self.pos_embed
        x_tokens = tokens(depthwise_conv(x, like(pe.weight, x), like(pe.bias, x), residual=True))

        if self.prune_ratio == 1:
            seq = torch.cat([cls_token, x_tokens], dim=1)
            seq, global_attn, _ = self._attention_mlp(seq, global_attn)
            return seq[:, :1], to_map(seq[:, 1:], x.shape), global_attn, token_indices

        N = x_tokens.shape[1]
        n_keep = int(N * self.prune_ratio)
        # sort tokens, their scores and their original positions by descending score
        order = torch.argsort(global_attn, dim=1, descending=True)
        x_sorted = _gather_tokens(x_tokens, order)
        global_attn = _gather_tokens(global_attn, order)
        token_indices = _gather_tokens(token_indices, order)
        x_info, x_drop = x_sorted[:, :n_keep], x_sorted[:, n_keep:]
        # merge the dropped tokens into one, weighted by their normalised scores
        score = global_attn[:, n_keep:]
        weight = score / torch.sum(score, dim=1, keepdim=True)
        rep_token = torch.sum(weight.unsqueeze(-1) * x_drop, dim=1, keepdim=True)
        seq = torch.cat((cls_token, x_info, rep_token), dim=1)

        # slow update of the attended tokens; the representative's updates (fast update) are
        # added to every dropped token
        seq, global_attn, fast_update = self._attention_mlp(seq, global_attn)
        g3 = gamma(self, "gamma_3")
        fast_update = fast_update if g3 is None else g3 * fast_update
        x_drop = x_drop + fast_update.expand(-1, N - n_keep, -1)

        cls_token = seq[:, :1]
        x_sorted = torch.cat((seq[:, 1:-1], x_drop), dim=1)
        old_global_scale = torch.sum(global_attn, dim=1, keepdim=True)
        # restore the original token order
        restore = torch.argsort(token_indices, dim=1)
        x_tokens = _gather_tokens(x_sorted, restore)
        global_attn = _gather_tokens(global_attn, restore)
        token_indices = _gather_tokens(token_indices, restore)

        if self.downsample:  # pool the score map 2x2 for the next stage, keeping its sum
            global_attn = self.avgpool(global_attn.reshape(B, 1, H, W)).view(B, -1)
            new_global_scale = torch.sum(global_attn, dim=1, keepdim=True)
            global_attn = global_attn * (old_global_scale / new_global_scale)
        return cls_token, to_map(x_tokens, x.shape), global_attn, token_indices

    def _attention_mlp(self, seq: torch.Tensor, global_attn: torch.Tensor | None):
        """The transformer block on ``seq`` (B, N, C), the running-score update, and the
        unscaled attention + MLP branches of the last token (the representative, when pruned)."""
        o, cls_attn = attend(self.attn, self.norm1(seq), return_cls_attn=True)
        cls_attn = cls_attn.to(seq.dtype)
        t, N = self.trade_off, seq.shape[1]
        if global_attn is None:
            global_attn = cls_attn
        elif global_attn.shape[1] == N - 1:  # every patch token attended: update every score
            global_attn = (1 - t) * global_attn + t * cls_attn
        else:  # pruned: update the N - 2 informative tokens' scores (last token is representative)
            informative = (1 - t) * global_attn[:, :N - 2] + t * cls_attn[:, :-1]
            global_attn = torch.cat((informative, global_attn[:, N - 2:]), dim=1)

        proj, fc2 = self.attn.proj, self.mlp.fc2
        seq1 = add_linear(self, seq, o, proj.weight, proj.bias, gamma(self, "gamma_1"))
        h = hidden(self.mlp, self.norm2(seq1))
        seq2 = add_linear(self, seq1, h, fc2.weight, fc2.bias, gamma(self, "gamma_2"))
        fast_update = None
        if self.prune_ratio != 1:  # one token's branches again: cheaper than keeping whole ones
            fast_update = (linear(o[:, -1:], proj.weight, proj.bias)
                           + linear(h[:, -1:], fc2.weight, fc2.bias))
        return seq2, global_attn, fast_update
