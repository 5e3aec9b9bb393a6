"""Shared layers of the UniFormer family: MLPs, attention, stochastic depth, stems.

Plain eager PyTorch, the numerical truth the fused kernels are checked against. Attribute names
match the official code so that official checkpoints load with ``strict=True``; the arithmetic is
done in the same order as the official code so that outputs agree to rounding.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.utils.checkpoint

__all__ = ["DropPath", "Mlp", "CMlp", "Attention", "PatchEmbed", "head_embedding",
           "middle_embedding", "conv_nd", "batch_norm_nd", "init_weights"]


def conv_nd(ndim: int):
    """nn.Conv2d for images, nn.Conv3d for video."""
    return {2: nn.Conv2d, 3: nn.Conv3d}[ndim]


def batch_norm_nd(ndim: int):
    return {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[ndim]


class DropPath(nn.Module):
    """Stochastic depth: zero a whole sample's residual branch with probability ``drop_prob``
    during training and rescale the kept ones by ``1 / (1 - drop_prob)``."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        mask_shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = x.new_empty(mask_shape).bernoulli_(keep_prob)
        return x * mask / keep_prob

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


def check_checkpoint_num(use_checkpoint: bool, checkpoint_num) -> tuple[int, int, int, int]:
    """The official video and dense backbones' activation checkpointing arguments, validated."""
    num = tuple(checkpoint_num)
    if len(num) != 4 or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                for n in num):
        raise ValueError(f"checkpoint_num: expected 4 non-negative ints (blocks per stage), got "
                         f"{checkpoint_num!r}")
    if not isinstance(use_checkpoint, bool):
        raise TypeError(f"use_checkpoint: expected a bool, got {type(use_checkpoint).__name__}")
    return num


def run_block(model: nn.Module, stage: int, index: int, block: nn.Module, x):
    """``block(x)``; with ``model.use_checkpoint``, the first ``model.checkpoint_num[stage]``
    blocks of each stage (0-based) are recomputed in backward instead of keeping their
    activations (torch.utils.checkpoint), as in the official video and dense code. Parameters and
    state_dict are unchanged."""
    if model.use_checkpoint and index < model.checkpoint_num[stage] and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
    return block(x)


def drop_path_or_identity(drop_prob: float) -> nn.Module:
    return DropPath(drop_prob) if drop_prob > 0.0 else nn.Identity()


class Mlp(nn.Module):
    """Token MLP of the attention blocks: fc1 -> exact GELU -> fc2 on (..., C)."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class CMlp(nn.Module):
    """Convolutional MLP of the CBlocks: the same MLP as 1x1 convs on NC(D)HW maps."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0, ndim: int = 2):
        super().__init__()
        conv = conv_nd(ndim)
        self.fc1 = conv(in_features, hidden_features, 1)
        self.act = nn.GELU()
        self.fc2 = conv(hidden_features, in_features, 1)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Attention(nn.Module):
    """Multi-head self-attention over tokens (B, N, C) with a packed qkv projection.

    ``forward(x, return_cls_attn=True)`` also returns the class token's attention row to the
    other tokens averaged over heads, shape (B, N - 1): the light models rank tokens by it.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, qk_scale: float | None = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        # `qk_scale or ...` as in the official code: an explicit 0 falls back to the default.
        self.scale = qk_scale or head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, return_cls_attn: bool = False):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        cls_attn = attn[:, :, 0, 1:].mean(dim=1) if return_cls_attn else None
        attn = self.attn_drop(attn)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        x = self.proj_drop(self.proj(x))
        return (x, cls_attn) if return_cls_attn else x


class PatchEmbed(nn.Module):
    """Non-overlapping patch stem: strided conv ``proj`` then LayerNorm ``norm`` over channels.

    ``proj`` is built by the caller (2D kernel 4 or 2; video 3x4x4 or 1x2x2 / 3x2x2). The norm keeps
    PyTorch's default eps (1e-5), as the official stems do.
    """

    def __init__(self, proj: nn.Module, embed_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(embed_dim)
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        shape = x.shape
        x = self.norm(x.flatten(2).transpose(1, 2))
        return x.transpose(1, 2).reshape(shape).contiguous()


class head_embedding(nn.Module):  # noqa: N801 - official class and attribute names
    """Overlapping conv stem of stage 1 (small_plus, light): two 3x3 stride-2 convs with BN."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(in_channels, out_channels // 2, kernel_size=3, stride=2, padding=1),
            nn.BatchNorm2d(out_channels // 2),
            nn.GELU(),
            nn.Conv2d(out_channels // 2, out_channels, kernel_size=3, stride=2, padding=1),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class middle_embedding(nn.Module):  # noqa: N801
    """Overlapping conv stem of stages 2-4 (image small_plus): 3x3 stride-2 conv with BN."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def init_weights(module: nn.Module) -> None:
    """The official initialisation: truncated-normal Linear weights, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
