"""The attention half of the SABlock family on token-major activations: positional encoding +
norm (op 2) and the qkv GEMM + fused attention (op 4). The proj GEMM is left to the caller, which
adds the residual inside it."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..ops.attention import attention as fused_attention
from ..ops.pos_embed_norm import pos_embed_norm
from ._base import channels_last, like, tokens
from .gemm import linear


def pos_embed_norm_tokens(block: nn.Module, x: torch.Tensor, norm: nn.LayerNorm):
    """``y = x + pos_embed(x)`` and ``z = norm(y)`` in one pass, as (B, N, C) token views."""
    pe = block.pos_embed
    y, z = pos_embed_norm(channels_last(x), like(pe.weight, x), like(pe.bias, x),
                          like(norm.weight, x), like(norm.bias, x), norm="layernorm", eps=norm.eps)
    return tokens(y), tokens(z)


def attend(attn: nn.Module, z: torch.Tensor, *, grid: tuple[int, int] | None = None,
           window_size: int | None = None, frames: int | None = None, temporal: bool = False,
           return_cls_attn: bool = False):
    """``softmax(q k^T * scale) v`` of ``attn`` (qkv, num_heads, scale) on tokens z (B, N, C):
    proj's input (B, N, C), and with ``return_cls_attn`` the class token's attention row averaged
    over heads (B, N - 1).

    window_size + grid: attention inside windows of the (H, W) grid, padded as SABlock_Windows
    pads it (padding tokens' q, k, v are the qkv bias and join every softmax of their window).
    frames: video tokens in (T, H*W) order; attention over time at each position (``temporal``)
    or over space in each frame, on strided views of qkv.
    """
    qkv = linear(z, attn.qkv.weight, attn.qkv.bias)
    if frames is None:
        qkv_bias = like(attn.qkv.bias, qkv) if window_size else None
        return fused_attention(qkv, attn.num_heads, attn.scale, window_size=window_size,
                               grid_size=grid, qkv_bias=qkv_bias, return_cls_attn=return_cls_attn)
    B, N, C3 = qkv.shape
    seqs = qkv.view(B, frames, N // frames, C3)
    if temporal:
        seqs = seqs.transpose(1, 2)
    out = fused_attention(seqs, attn.num_heads, attn.scale)
    # out is dense in the dim order of its qkv view: back to (B, T * H*W, C) without a copy
    return (out.transpose(1, 2) if temporal else out).reshape(B, N, C3 // 3)
