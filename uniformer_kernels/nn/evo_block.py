"""EvoSABlock (light models, stages 3-4): SABlock over [class token, patch tokens] with Evo-ViT
token pruning, the running scores carried explicitly as in the reference:

    forward(cls_token, x, global_attn, token_indices) -> (cls_token, x, global_attn, token_indices)

The class token's attention row comes out of the fused attention (op 4, ``return_cls_attn``)
instead of a materialised attention matrix; the GEMMs add their residuals in the call. The token
sort, merge, restore and score update are the reference's own functions.

The official light code's EvoSABlock (``forward(cls_token, x)``, its Attention updating module
globals, ``trade_off`` kept on ``attn``) converts only with its light root, whose drop-in
(``uk.nn.UniFormerLight``) carries the state explicitly into this forward instead.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn as nn

from uniformer_models import layers
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
        params = list(inspect.signature(type(m).forward).parameters)[1:]
        official = keeps_state_in_globals(m)
        if not official and len(params) != 4:
            return (f"forward({', '.join(params)}) is neither (cls_token, x, global_attn, "
                    f"token_indices) nor the official (cls_token, x)")
        if not isinstance(getattr(m, "pos_embed", None), nn.Conv2d):
            return "pos_embed is not a Conv2d (the official light video models' 3D EvoSABlock " \
                   "has no drop-in)"
        # the official block keeps trade_off on its Attention, whose own score update is skipped
        problem = attention_block_mismatch(m, "downsample", *(() if official else ("trade_off",)),
                                           score_update=official)
        if problem is None and official and not hasattr(m.attn, "trade_off"):
            problem = "attn has no trade_off"
        if problem is None and m.downsample and not hasattr(m, "avgpool"):
            problem = "downsample is set but there is no avgpool"
        return problem

    @classmethod
    def orphan(cls, m: nn.Module) -> str | None:
        if keeps_state_in_globals(m):
            return ("forward(cls_token, x) keeps the token-pruning state in module globals "
                    "(official light code), which its root's forward_features sets: accelerate "
                    "the whole model (its UniFormer_Light root), whose drop-in carries that state "
                    "explicitly")
        return None

    def _reference_forward(self, cls_token, x, global_attn, token_indices):
        # the explicit-state eager forward, also for official blocks (whose own reads globals)
        return reference.EvoSABlock.forward(self, cls_token, x, global_attn, token_indices)

    def _attend(self, x: torch.Tensor, global_attn: torch.Tensor | None):
        """The reference's eager attention + score update (the dropout fallback), also on the
        official Attention: same qkv/proj/scale, but no return_cls_attn of its own."""
        out, cls_attn = layers.Attention.forward(self.attn, self.norm1(x), return_cls_attn=True)
        return out, update_scores(global_attn, cls_attn, trade_off(self))

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
        global_attn = update_scores(global_attn, cls_attn.to(_softmax_dtype(o)), trade_off(self))

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


def keeps_state_in_globals(m: nn.Module) -> bool:
    """The official light EvoSABlock: forward(cls_token, x), the pruning state in module globals."""
    return list(inspect.signature(type(m).forward).parameters)[1:] == ["cls_token", "x"]


def trade_off(block: nn.Module) -> float:
    """The score update's weight: on the block in the reference, on its Attention officially."""
    t = getattr(block, "trade_off", None)
    return block.attn.trade_off if t is None else t
