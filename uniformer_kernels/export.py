"""torch.export support: the table that lowers our custom ops to standard aten ops.

``torch.export.export`` of an accelerated model keeps our ops (``uniformer_kernels::*``): the
ExportedProgram runs, and saves and loads with ``torch.export.save/load`` where uniformer_kernels
is imported. For a runtime that knows only aten ops:

    ep = torch.export.export(uk.accelerate(model.eval()), (x,))
    ep = ep.run_decompositions(uk.export.decompositions())   # aten ops only

Why a table and not ``run_decompositions()`` alone: that lowers only ops with a
CompositeImplicitAutograd kernel, and an op with one is decomposed by torch.compile too (AOT
autograd applies it whenever no kernel is registered for the tensor's device key), which would
replace our kernels with the eager composition in every compiled model. Checked on torch 2.13:
with such a kernel and the op's implementation registered per device (cpu, cuda), compile keeps
the op but ``run_decompositions()`` keeps it as well.

The table covers the forward ops, what an inference export holds: depthwise_conv and
pos_embed_norm run their implementation on the eager backend (PyTorch's conv, add and norm, all
functional); attention's eager composition writes into views (window padding, the output layout),
which a decomposition may not, so it has a functional twin here (same core: scores, logsumexp,
softmax-weighted sum). Tested against the op on every variant (tests/test_export.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import backends
from .ops import attention as _attention_module  # noqa: F401  (registers the ops)
from .ops.attention import _cls_probs, _eager_core_forward, _from_windows, _split_heads, _window
from .ops.depthwise import _depthwise_conv_impl
from .ops.pos_embed_norm import _pos_embed_norm_impl

__all__ = ["decompositions"]


def _eager(impl):
    def decomposition(*args):
        with backends.backend("eager"):
            return impl(*args)
    return decomposition


def _windows(qkv, qkv_bias, window):
    """(B, H*W, 3C) -> (B * windows, size^2, 3C), padding tokens = qkv_bias (or 0), functionally."""
    size, grid_h, grid_w = window
    pad_h, pad_w = window.rows * size - grid_h, window.cols * size - grid_w
    grid = qkv.unflatten(1, (grid_h, grid_w))
    padded = F.pad(grid, (0, 0, 0, pad_w, 0, pad_h))
    if qkv_bias is not None and (pad_h or pad_w):
        inside = F.pad(grid.new_ones(grid_h, grid_w, 1), (0, 0, 0, pad_w, 0, pad_h)) > 0
        padded = torch.where(inside, padded, qkv_bias)
    windows = padded.view(qkv.shape[0], window.rows, size, window.cols, size, -1).transpose(2, 3)
    return windows.reshape(-1, size * size, qkv.shape[-1])


def _attention(qkv, qkv_bias, num_heads, scale, window_size, grid_h, grid_w, return_cls_attn):
    window = _window(window_size, grid_h, grid_w)
    seqs = qkv.reshape(-1, *qkv.shape[-2:]) if window is None else _windows(qkv, qkv_bias, window)
    q, k, v = _split_heads(seqs, num_heads)
    o, lse = _eager_core_forward(q, k, v, scale)
    o = o.transpose(1, 2).reshape(*seqs.shape[:2], -1).to(qkv.dtype)  # (S, L, C)
    if window is None:
        out = o.reshape(*qkv.shape[:-1], -1)
    else:
        out = _from_windows(o, window)[:, :grid_h, :grid_w].reshape(qkv.shape[0], -1, o.shape[-1])
    cls_probs = _cls_probs(q, k, lse, scale) if return_cls_attn else lse.new_empty(0)
    return out, lse.contiguous(), cls_probs


def decompositions() -> dict:
    """``torch.export.default_decompositions()`` plus an aten lowering of our forward ops."""
    table = torch.export.default_decompositions()
    ops = torch.ops.uniformer_kernels
    table[ops.depthwise_conv.default] = _eager(_depthwise_conv_impl)
    table[ops.pos_embed_norm.default] = _eager(_pos_embed_norm_impl)
    table[ops.attention.default] = _attention
    return table
