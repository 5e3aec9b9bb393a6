"""Op 5, the MLP: fc1 GEMM with the exact GELU in its epilogue, fc2 GEMM with the residual added
in the call (Linears and 1x1 convs alike: both are GEMMs on channels-last tokens)."""
from __future__ import annotations

import torch
import torch.nn as nn

from uniformer_models import layers as reference

from . import _match
from ._base import Accelerated, add_linear, to_map, tokens
from .gemm import linear, matrix


def hidden(mlp: nn.Module, z: torch.Tensor, fc1_weight=None, fc1_bias=None) -> torch.Tensor:
    """``gelu(fc1(z))`` on tokens; fc1's weight and bias may be given already folded."""
    weight = matrix(mlp.fc1.weight) if fc1_weight is None else fc1_weight
    bias = mlp.fc1.bias if fc1_weight is None else fc1_bias
    return linear(z, weight, bias, gelu=True)


def add_mlp(block: nn.Module, x: torch.Tensor, z: torch.Tensor, gamma=None) -> torch.Tensor:
    """``x + drop_path(gamma * block.mlp(z))`` on tokens; x may be overwritten (see add_linear)."""
    fc2 = block.mlp.fc2
    return add_linear(block, x, hidden(block.mlp, z), matrix(fc2.weight), fc2.bias, gamma)


class _FusedMlp(Accelerated):
    def _tokens_forward(self, z: torch.Tensor) -> torch.Tensor:
        return linear(hidden(self, z), matrix(self.fc2.weight), self.fc2.bias)

    @classmethod
    def claims(cls, m: nn.Module) -> bool:
        return (all(hasattr(m, n) for n in ("fc1", "act", "fc2", "drop"))
                and isinstance(m.fc1, cls.layer))

    @classmethod
    def mismatch(cls, m: nn.Module) -> str | None:
        fc1 = m.fc1
        return _match.mlp(m, fc1.in_features if isinstance(fc1, nn.Linear) else fc1.in_channels,
                          name="module")


class Mlp(_FusedMlp, reference.Mlp):
    """Token MLP (..., C) of the attention blocks: fc1 + GELU in one call, then fc2."""

    uk_reference_class = reference.Mlp
    layer = nn.Linear

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._dropout_active():
            return self._reference_forward(x)
        return self._tokens_forward(x)


class CMlp(_FusedMlp, reference.CMlp):
    """Convolutional MLP of the CBlocks on NC(D)HW maps, run on the channels-last token view;
    returns a channels-last map."""

    uk_reference_class = reference.CMlp
    layer = (nn.Conv2d, nn.Conv3d)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._dropout_active():
            return self._reference_forward(x)
        return to_map(self._tokens_forward(tokens(x)), x.shape)
