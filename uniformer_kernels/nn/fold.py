"""Eval-mode BatchNorm folded into the neighbouring conv / GEMM, computed at call time from the
live parameters and running statistics (a few tiny ops per block): weights are never modified, and
a later ``load_state_dict``, optimizer step or ``train()`` takes effect on the next call."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..ops.pos_embed_norm import fold_batchnorm
from ._base import channels_last_weight


def batchnorm_affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(scale, shift) with ``bn(y) == y * scale + shift`` per channel, or None when the BatchNorm
    normalises with batch statistics (training, or no running statistics kept)."""
    if bn.training or bn.running_mean is None:
        return None
    return fold_batchnorm(bn)


def conv_bn(x: torch.Tensor, conv: nn.Module, bn: nn.Module) -> torch.Tensor:
    """``bn(conv(x))`` as one conv on channels-last ``x``: at eval the BatchNorm is folded into
    the conv's weight and bias (one pass over the output instead of two); the folded weight is
    channels-last, as _base.channels_last_weight says why and when it is cached."""
    affine = batchnorm_affine(bn)
    if affine is None:
        return bn(conv(x))
    scale, shift = affine
    weight = channels_last_weight(
        conv, lambda: conv.weight * scale.view(-1, *(1,) * (conv.weight.dim() - 1)),
        (conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var))
    bias = shift if conv.bias is None else conv.bias * scale + shift
    return conv._conv_forward(x, weight, bias)
