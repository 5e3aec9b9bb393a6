"""What every drop-in module shares: the backend it was converted with, the fallback to the
reference forward, the channels-last/token-major layout helpers and the checks of when the fused
path applies.

Layout: activations are NC(D)HW tensors stored channels-last, so the same memory is also the
token-major (B, N, C) matrix the GEMMs and the attention op read; :func:`tokens` and
:func:`to_map` switch between the two views without copying.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .. import backends
from . import gemm


class Accelerated(nn.Module):
    """Base of the drop-in modules. ``forward`` runs ``_forward`` under the backend ``accelerate``
    stored (``uk_backend``; None: each op chooses), and falls back to the reference class's own
    forward (``uk_reference_class``) where the fused path does not apply (see subclasses)."""

    uk_backend: str | None = None
    # the reference class a subclass derives from; accelerate() sets it per instance to the class
    # the module had (ours or the official code's)
    uk_reference_class: type

    @classmethod
    def orphan(cls, m: nn.Module) -> str | None:
        """Why ``m`` cannot convert unless a converted ancestor ``carries`` it; None if it can."""
        return None

    @classmethod
    def carries(cls, m: nn.Module) -> list[nn.Module]:
        """The descendants whose state this module's drop-in forward passes them explicitly."""
        return []

    def forward(self, *args, **kwargs):
        if self.uk_backend is None:
            return self._forward(*args, **kwargs)
        with backends.backend(self.uk_backend):
            return self._forward(*args, **kwargs)

    def _forward(self, *args, **kwargs):
        raise NotImplementedError

    def _reference_forward(self, *args, **kwargs):
        return self.uk_reference_class.forward(self, *args, **kwargs)

    def _dropout_active(self) -> bool:
        """An nn.Dropout with p > 0 in training: the fused path has no dropout, the reference
        forward runs instead (the official recipes train with dropout 0 and drop path > 0)."""
        return self.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in self.modules())


def channels_last_format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.dim() == 4 else torch.channels_last_3d


def channels_last_weight(conv: nn.Module, compute, sources: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``compute()`` (``conv``'s weight, or one derived from it) stored channels-last, for a conv
    on channels-last maps: given an NCHW-contiguous weight, oneDNN reorders it on every call
    (measured, 1 thread: a 320 -> 512 2x2 stride-2 conv on 1x320x14x14, 2.0 against 1.3 ms).
    Without autograd (and outside torch.compile and tracing) the copy is cached on ``conv``, keyed
    by the storage and version counter of each of ``sources``, so any change to them (an
    optimizer step, load_state_dict, ``.to()``) makes it again; otherwise ``compute()`` as is.
    The parameters themselves keep their layout: FSDP2 takes contiguous parameters only."""
    sources = tuple(t for t in sources if t is not None)  # a BatchNorm without affine
    if (torch.is_grad_enabled() or torch.compiler.is_compiling() or torch.jit.is_tracing()
            or any(t.is_inference() for t in sources)):
        return compute()
    key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in sources)
    cached = conv.__dict__.get("_uk_channels_last_weight")
    if cached is None or cached[0] != key:
        weight = compute()
        cached = (key, weight.contiguous(memory_format=channels_last_format(weight)))
        conv.__dict__["_uk_channels_last_weight"] = cached
    return cached[1]


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """x as channels-last: itself when it already is (between blocks), else one copy."""
    return x.contiguous(memory_format=channels_last_format(x))


def tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, *spatial) channels-last -> its (B, N, C) token view (copies only other layouts)."""
    return channels_last(x).flatten(2).transpose(1, 2)


def to_map(t: torch.Tensor, shape) -> torch.Tensor:
    """(B, N, C) contiguous tokens -> the (B, C, *spatial) channels-last view of the same memory."""
    return t.transpose(1, 2).reshape(shape)


def drop_path_active(block: nn.Module) -> bool:
    """Stochastic depth changes the branch (training, DropPath with a rate): the residual cannot
    be added inside the GEMM then."""
    return block.training and not isinstance(block.drop_path, nn.Identity)


def gamma(block: nn.Module, name: str) -> torch.Tensor | None:
    """A layer-scale gamma flattened to (C,), or None: presence decides, as in both the official
    code (``ls`` flag plus gammas) and ours."""
    g = getattr(block, name, None)
    return None if g is None else g.reshape(-1)


def like(t: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """A parameter in x's dtype for the uk.ops, which take one dtype (autocast leaves parameters
    in float32 while activations may be 16-bit)."""
    return None if t is None else t.to(x.dtype)


def add_linear(block: nn.Module, residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor | None, gamma: torch.Tensor | None = None,
               inplace: bool = True) -> torch.Tensor:
    """``residual + drop_path(gamma * (x W^T + b))`` on tokens, the residual accumulated by the
    GEMM call unless stochastic depth is active; the layer scale is folded into W and b
    (differentiably). ``inplace``: residual is the caller's intermediate and may be overwritten
    (pass False when it is still needed)."""
    if gamma is not None:
        weight = weight * gamma[:, None]
        bias = None if bias is None else bias * gamma
    if drop_path_active(block):
        return residual + block.drop_path(gemm.linear(x, weight, bias))
    return gemm.linear_add(x, weight, bias, residual, inplace=inplace)
