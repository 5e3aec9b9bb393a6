"""CBlock, the local relation aggregator (op 3) and its MLP (op 5), on channels-last activations.

Reference: ``x = x + pos_embed(x); x = x + conv2(attn(conv1(norm1(x)))); x = x + mlp(norm2(x))``
with BatchNorms, 1x1 convs conv1/conv2/fc1/fc2 and depthwise convs pos_embed (3) and attn (5).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from uniformer_models import blocks as reference

from ..ops.depthwise import depthwise_conv
from . import _match
from ._base import Accelerated, add_linear, channels_last, drop_path_active, gamma, like, to_map, tokens
from .fold import batchnorm_affine
from .gemm import linear, linear_add, matrix
from .mlp import add_mlp, hidden


class CBlock(Accelerated, reference.CBlock):
    """Drop-in CBlock: the reference's parameters and names, forward on uk.ops and GEMMs.

    Inference (both BatchNorms with running statistics): 2 depthwise convs and 4 GEMMs, nothing
    else. norm1 is folded into conv1 and norm2 into fc1; conv2's and fc2's biases (and the layer
    scales) are folded so that every bias and residual add happens inside those calls (see
    ``_folded``). Training: BatchNorm with batch statistics between the same calls.
    Returns a channels-last map.
    """

    uk_reference_class = reference.CBlock

    @classmethod
    def claims(cls, m: nn.Module) -> bool:
        return hasattr(m, "pos_embed") and hasattr(m, "conv1")

    @classmethod
    def mismatch(cls, m: nn.Module) -> str | None:
        problem = _match.missing(m, "pos_embed", "norm1", "conv1", "attn", "conv2", "norm2", "mlp",
                                 "drop_path")
        if problem:
            return problem
        dim = getattr(m.pos_embed, "in_channels", 0)
        return _match.first(
            _match.depthwise_conv(m, "pos_embed", dim), _match.batchnorm(m, "norm1", dim),
            _match.pointwise(m, "conv1", dim, dim), _match.depthwise_conv(m, "attn", dim),
            _match.pointwise(m, "conv2", dim, dim), _match.batchnorm(m, "norm2", dim),
            _match.mlp(m.mlp, dim), _match.gammas(m, dim, "gamma_1", "gamma_2"),
            # the inference path folds every bias into the next call
            _match.biases(m, "pos_embed", "conv1", "attn", "conv2", "mlp.fc1", "mlp.fc2"))

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._dropout_active():
            return self._reference_forward(x)
        x = channels_last(x)
        bn1, bn2 = batchnorm_affine(self.norm1), batchnorm_affine(self.norm2)
        if bn1 is not None and bn2 is not None and not drop_path_active(self):
            return self._folded(x, bn1, bn2)
        y = depthwise_conv(x, like(self.pos_embed.weight, x), like(self.pos_embed.bias, x),
                           residual=True)
        a = linear(tokens(self.norm1(y)), matrix(self.conv1.weight), self.conv1.bias)
        d = depthwise_conv(to_map(a, x.shape), like(self.attn.weight, a), like(self.attn.bias, a))
        x1 = add_linear(self, tokens(y), tokens(d), matrix(self.conv2.weight), self.conv2.bias,
                        gamma(self, "gamma_1"))
        x2 = add_mlp(self, x1, tokens(self.norm2(to_map(x1, x.shape))), gamma(self, "gamma_2"))
        return to_map(x2, x.shape)

    def _folded(self, x: torch.Tensor, bn1, bn2) -> torch.Tensor:
        """Inference. With s, t the BatchNorms' affines and g the layer scales (1 without):

            x1 = y + g1 (W2 d + b2),   d = dw5(W1 (s1 y + t1) + b1),   y = x + dw3(x)
            x2 = x1 + g2 (Wf2 gelu(Wf1 (s2 x1 + t2) + bf1) + bf2)

        The constant c = g1 b2 + g2 bf2 rides along the residual stream from the start, added by
        pos_embed's bias: z = y + c, then x1 + g2 bf2 = z + (g1 W2) d and x2 = that + (g2 Wf2) h,
        with no bias left to add; conv1 and fc1 subtract the part of c their input carries.
        """
        (s1, t1), (s2, t2) = bn1, bn2
        g1, g2 = gamma(self, "gamma_1"), gamma(self, "gamma_2")
        w1, b1 = matrix(self.conv1.weight), self.conv1.bias
        w2, b2 = matrix(self.conv2.weight), self.conv2.bias
        fc1, fc2 = self.mlp.fc1, self.mlp.fc2
        wf1, bf1 = matrix(fc1.weight), fc1.bias
        wf2, bf2 = matrix(fc2.weight), fc2.bias
        if g1 is not None:
            w2, b2 = w2 * g1[:, None], b2 * g1
        if g2 is not None:
            wf2, bf2 = wf2 * g2[:, None], bf2 * g2
        carried = b2 + bf2
        conv1_w = w1 * s1
        conv1_b = b1 + torch.mv(w1, t1 - s1 * carried)  # mv: autocast would round a matmul
        fc1_w = wf1 * s2
        fc1_b = bf1 + torch.mv(wf1, t2 - s2 * bf2)

        z = depthwise_conv(x, like(self.pos_embed.weight, x),
                           like(self.pos_embed.bias + carried, x), residual=True)
        a = linear(tokens(z), conv1_w, conv1_b)
        d = depthwise_conv(to_map(a, x.shape), like(self.attn.weight, a), like(self.attn.bias, a))
        x1 = linear_add(tokens(d), w2, None, tokens(z), inplace=True)
        x2 = linear_add(hidden(self.mlp, x1, fc1_w, fc1_b), wf2, None, x1, inplace=True)
        return to_map(x2, x.shape)
