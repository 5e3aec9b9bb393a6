"""UniFormer blocks: CBlock (local relation), SABlock (global), SABlock_Windows, SplitSABlock.

Each block works on NC(D)HW maps; ``ndim`` picks 2D (images) or 3D (video). Layer scale is an
explicit constructor argument (``layer_scale``: the gammas' initial value, or None for none)
instead of the official module-level global.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import Attention, CMlp, Mlp, batch_norm_nd, conv_nd, drop_path_or_identity

__all__ = ["CBlock", "SABlock", "SABlock_Windows", "SplitSABlock", "window_partition", "window_reverse"]


class CBlock(nn.Module):
    """Local relation aggregator: x + pos_embed(x); x + conv2(attn(conv1(norm1(x)))); x + mlp(norm2(x)).

    ``attn`` is a depthwise 5x5(x5) conv, ``pos_embed`` a depthwise 3x3(x3) conv, norms are BatchNorm.
    With layer scale the two branches are multiplied by gammas of shape (1, C, 1, 1[, 1]).
    """

    def __init__(self, dim: int, mlp_ratio: float = 4.0, drop: float = 0.0, drop_path: float = 0.0,
                 layer_scale: float | None = None, ndim: int = 2):
        super().__init__()
        conv, bn = conv_nd(ndim), batch_norm_nd(ndim)
        self.pos_embed = conv(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = bn(dim)
        self.conv1 = conv(dim, dim, 1)
        self.conv2 = conv(dim, dim, 1)
        self.attn = conv(dim, dim, 5, padding=2, groups=dim)
        self.drop_path = drop_path_or_identity(drop_path)
        self.norm2 = bn(dim)
        self.mlp = CMlp(dim, int(dim * mlp_ratio), drop=drop, ndim=ndim)
        self.ls = layer_scale is not None
        if self.ls:
            gamma_shape = (1, dim) + (1,) * ndim
            self.gamma_1 = nn.Parameter(torch.full(gamma_shape, float(layer_scale)))
            self.gamma_2 = nn.Parameter(torch.full(gamma_shape, float(layer_scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed(x)
        local = self.conv2(self.attn(self.conv1(self.norm1(x))))
        x = x + self.drop_path(self.gamma_1 * local if self.ls else local)
        mlp = self.mlp(self.norm2(x))
        return x + self.drop_path(self.gamma_2 * mlp if self.ls else mlp)


class SABlock(nn.Module):
    """Global relation aggregator: x + pos_embed(x), then a pre-norm transformer block on the
    flattened tokens (row-major spatial order), reshaped back to the input's shape.

    With layer scale the branches are multiplied by gammas of shape (C,).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 qk_scale: float | None = None, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, layer_scale: float | None = None, ndim: int = 2):
        super().__init__()
        self.pos_embed = conv_nd(ndim)(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale,
                              attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = drop_path_or_identity(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.ls = layer_scale is not None
        if self.ls:
            self.gamma_1 = nn.Parameter(torch.full((dim,), float(layer_scale)))
            self.gamma_2 = nn.Parameter(torch.full((dim,), float(layer_scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed(x)
        shape = x.shape
        x = x.flatten(2).transpose(1, 2)
        attn = self.attn(self.norm1(x))
        x = x + self.drop_path(self.gamma_1 * attn if self.ls else attn)
        mlp = self.mlp(self.norm2(x))
        x = x + self.drop_path(self.gamma_2 * mlp if self.ls else mlp)
        # A view, as in the official code: the result is channels-last strided, not copied.
        return x.transpose(1, 2).reshape(shape)


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """(B, H, W, C) with H, W multiples of window_size -> (B * nW, window_size, window_size, C)."""
    B, H, W, C = x.shape
    x = x.view(B, H // window_size, window_size, W // window_size, window_size, C)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window_size, window_size, C)


def window_reverse(windows: torch.Tensor, window_size: int, H: int, W: int) -> torch.Tensor:
    """Inverse of window_partition: (B * nW, ws, ws, C) -> (B, H, W, C)."""
    B = windows.shape[0] // ((H // window_size) * (W // window_size))
    x = windows.view(B, H // window_size, W // window_size, window_size, window_size, -1)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(B, H, W, -1)


class SABlock_Windows(nn.Module):  # noqa: N801 - official name
    """SABlock with attention inside non-overlapping windows (dense backbones).

    The map is padded right/bottom to a multiple of ``window_size`` *after* norm1, with zeros and
    without an attention mask: padded tokens enter the qkv Linear as zeros, so their keys and values
    equal the qkv bias and take part in every window's softmax. Padded queries are cropped.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int = 14, mlp_ratio: float = 4.0,
                 qkv_bias: bool = False, qk_scale: float | None = None, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, layer_scale: float | None = None):
        super().__init__()
        if layer_scale is not None:
            raise ValueError("layer_scale: window blocks have no layer scale in the official code")
        self.window_size = window_size
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale,
                              attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = drop_path_or_identity(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed(x)
        x = x.permute(0, 2, 3, 1)
        B, H, W, C = x.shape
        ws = self.window_size
        shortcut = x
        x = self.norm1(x)
        pad_r = (ws - W % ws) % ws
        pad_b = (ws - H % ws) % ws
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        Hp, Wp = H + pad_b, W + pad_r
        windows = window_partition(x, ws).view(-1, ws * ws, C)
        windows = self.attn(windows).view(-1, ws, ws, C)
        x = window_reverse(windows, ws, Hp, Wp)
        if pad_r > 0 or pad_b > 0:
            x = x[:, :H, :W, :].contiguous()
        x = shortcut + self.drop_path(x)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x.permute(0, 3, 1, 2).reshape(B, C, H, W)


class SplitSABlock(nn.Module):
    """Video block with divided attention: temporal attention ``t_attn`` over T at each spatial
    position (with its residual), then spatial attention ``attn`` over H*W in each frame, whose
    output is added to the post-pos_embed input (not to the temporal result), then the MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 qk_scale: float | None = None, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, layer_scale: float | None = None):
        super().__init__()
        if layer_scale is not None:
            raise ValueError("layer_scale: split video blocks have no layer scale in the official code")
        self.pos_embed = nn.Conv3d(dim, dim, 3, padding=1, groups=dim)
        self.t_norm = nn.LayerNorm(dim, eps=1e-6)
        self.t_attn = Attention(dim, num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale,
                                attn_drop=attn_drop, proj_drop=drop)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale,
                              attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = drop_path_or_identity(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed(x)
        B, C, T, H, W = x.shape
        # temporal: sequences of length T, one per (b, spatial position)
        t = x.view(B, C, T, H * W).permute(0, 3, 2, 1).contiguous().view(B * H * W, T, C)
        t = t + self.drop_path(self.t_attn(self.t_norm(t)))
        # spatial: sequences of length H*W, one per (b, frame)
        s = t.view(B, H * W, T, C).permute(0, 2, 1, 3).contiguous().view(B * T, H * W, C)
        residual = x.view(B, C, T, H * W).permute(0, 2, 3, 1).contiguous().view(B * T, H * W, C)
        s = residual + self.drop_path(self.attn(self.norm1(s)))
        s = s.view(B, T * H * W, C)
        out = s + self.drop_path(self.mlp(self.norm2(s)))
        return out.transpose(1, 2).reshape(B, C, T, H, W)
