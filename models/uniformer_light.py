"""Light UniFormer (XXS, XS): attention stages with a class token and Evo-ViT token pruning.

The official code keeps the running token scores and token order in module-level globals; here
they travel explicitly through the blocks as ``(global_attn, token_indices)``, with the same
arithmetic in the same order.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .blocks import CBlock
from .input_checks import check_input
from .layers import (Attention, Mlp, PatchEmbed, drop_path_or_identity, head_embedding,
                     init_weights)

__all__ = ["EvoSABlock", "UniFormerLight", "default_prune_schedule"]


def default_prune_schedule(depth) -> list[list[float]]:
    """Per-block keep ratios of the official light models (also their trade-offs): stage 3's first
    block keeps every token and seeds the scores, every later attention block keeps half."""
    return [[], [], [1] + [0.5] * (depth[2] - 1), [0.5] * depth[3]]


def _gather_tokens(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """x[b, indices[b]] for (B, N, ...) x and (B, N') long indices."""
    if x.ndim == 2:
        return torch.gather(x, 1, indices)
    return torch.gather(x, 1, indices.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def update_scores(global_attn: torch.Tensor | None, cls_attn: torch.Tensor,
                  trade_off: float) -> torch.Tensor:
    """The running token scores after an attention whose class-token row (B, N - 1) is cls_attn,
    as the official Attention updates them inline."""
    t, N = trade_off, cls_attn.shape[1] + 1
    if global_attn is None:
        return cls_attn
    if global_attn.shape[1] == N - 1:  # every patch token attended: update every score
        return (1 - t) * global_attn + t * cls_attn
    # pruned: update the N - 2 informative tokens' scores (last token is representative)
    informative = (1 - t) * global_attn[:, :N - 2] + t * cls_attn[:, :-1]
    return torch.cat((informative, global_attn[:, N - 2:]), dim=1)


def prune_tokens(x: torch.Tensor, global_attn: torch.Tensor, token_indices: torch.Tensor,
                 n_keep: int):
    """Sorts tokens (B, N, C), their scores and original positions by descending score and merges
    the dropped tokens into one, weighted by their normalised scores.
    Returns (x_info, x_drop, rep_token, global_attn, token_indices), the last two sorted."""
    order = torch.argsort(global_attn, dim=1, descending=True)
    x_sorted = _gather_tokens(x, order)
    global_attn = _gather_tokens(global_attn, order)
    token_indices = _gather_tokens(token_indices, order)
    x_info, x_drop = x_sorted[:, :n_keep], x_sorted[:, n_keep:]
    score = global_attn[:, n_keep:]
    weight = score / torch.sum(score, dim=1, keepdim=True)
    rep_token = torch.sum(weight.unsqueeze(-1) * x_drop, dim=1, keepdim=True)
    return x_info, x_drop, rep_token, global_attn, token_indices


def restore_tokens(block: nn.Module, x_sorted: torch.Tensor, global_attn: torch.Tensor,
                   token_indices: torch.Tensor, grid: tuple[int, int]):
    """The sorted tokens, scores and positions back in the original order; with
    ``block.downsample`` the score map pooled 2x2 for the next stage, keeping its sum."""
    old_global_scale = torch.sum(global_attn, dim=1, keepdim=True)
    restore = torch.argsort(token_indices, dim=1)
    x = _gather_tokens(x_sorted, restore)
    global_attn = _gather_tokens(global_attn, restore)
    token_indices = _gather_tokens(token_indices, restore)
    if block.downsample:
        B = global_attn.shape[0]
        global_attn = block.avgpool(global_attn.reshape(B, 1, *grid)).view(B, -1)
        new_global_scale = torch.sum(global_attn, dim=1, keepdim=True)
        global_attn = global_attn * (old_global_scale / new_global_scale)
    return x, global_attn, token_indices


class EvoSABlock(nn.Module):
    """SABlock over [cls token, patch tokens] that, when ``prune_ratio < 1``, attends only over the
    top ``prune_ratio`` tokens by running score plus one representative token that merges the rest.

    forward(cls_token, x, global_attn, token_indices) -> (cls_token, x, global_attn, token_indices)
      cls_token (B, 1, C); x (B, C, H, W); global_attn (B, H*W) running class-attention score of
      each patch token, or None before the first block; token_indices (B, H*W) long: the original
      position of each score entry (kept in the order the scores are in).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 qk_scale: float | None = None, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, layer_scale: float | None = None, prune_ratio: float = 1.0,
                 trade_off: float = 0.0, downsample: bool = False):
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale,
                              attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = drop_path_or_identity(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.prune_ratio = prune_ratio
        self.trade_off = trade_off
        self.downsample = downsample
        if downsample:
            self.avgpool = nn.AvgPool2d(kernel_size=2, stride=2)
        self.ls = layer_scale is not None
        if self.ls:
            self.gamma_1 = nn.Parameter(torch.full((dim,), float(layer_scale)))
            self.gamma_2 = nn.Parameter(torch.full((dim,), float(layer_scale)))
            if prune_ratio != 1:
                self.gamma_3 = nn.Parameter(torch.full((dim,), float(layer_scale)))

    def _attend(self, x: torch.Tensor, global_attn: torch.Tensor | None):
        """Attention branch plus the running-score update the official Attention does inline."""
        out, cls_attn = self.attn(self.norm1(x), return_cls_attn=True)
        global_attn = update_scores(global_attn, cls_attn, self.trade_off)
        return out, global_attn

    def _scaled(self, gamma_name: str, branch: torch.Tensor) -> torch.Tensor:
        return getattr(self, gamma_name) * branch if self.ls else branch

    def forward(self, cls_token: torch.Tensor, x: torch.Tensor, global_attn: torch.Tensor | None,
                token_indices: torch.Tensor):
        x = x + self.pos_embed(x)
        B, C, H, W = x.shape
        x = x.flatten(2).transpose(1, 2)

        if self.prune_ratio == 1:
            x = torch.cat([cls_token, x], dim=1)
            attn, global_attn = self._attend(x, global_attn)
            x = x + self.drop_path(self._scaled("gamma_1", attn))
            x = x + self.drop_path(self._scaled("gamma_2", self.mlp(self.norm2(x))))
            cls_token, x = x[:, :1], x[:, 1:]
            return cls_token, x.transpose(1, 2).reshape(B, C, H, W), global_attn, token_indices

        N = x.shape[1]
        n_keep = int(N * self.prune_ratio)
        x_info, x_drop, rep_token, global_attn, token_indices = prune_tokens(
            x, global_attn, token_indices, n_keep)
        x = torch.cat((cls_token, x_info, rep_token), dim=1)

        # slow update of the attended tokens; the representative's updates ("fast update") are
        # added to every dropped token
        attn, global_attn = self._attend(x, global_attn)
        fast_update = attn[:, -1:]
        x = x + self.drop_path(self._scaled("gamma_1", attn))
        mlp = self.mlp(self.norm2(x))
        fast_update = fast_update + mlp[:, -1:]
        x = x + self.drop_path(self._scaled("gamma_2", mlp))
        x_drop = x_drop + self._scaled("gamma_3", fast_update.expand(-1, N - n_keep, -1))

        cls_token = x[:, :1]
        x_sorted = torch.cat((x[:, 1:-1], x_drop), dim=1)
        x, global_attn, token_indices = restore_tokens(self, x_sorted, global_attn, token_indices,
                                                       (H, W))
        x = x.transpose(1, 2).reshape(B, C, H, W)
        return cls_token, x, global_attn, token_indices


class UniFormerLight(nn.Module):
    """UniFormer-XXS / XS: conv stem, CBlock stages 1-2, EvoSABlock stages 3-4 with a class token.

    Classification (``features_only=False``): eval returns ``head(mean(norm(x)))``; train returns
    ``(head(...), head_cls(norm_cls(cls_token)))`` as the official code does.
    Dense backbone (``features_only=True``): returns the four stage maps through LayerNorms
    ``norm1``..``norm4`` and has no classification head (official segmentation/detection keys).
    """

    def __init__(self, depth=(3, 5, 9, 3), in_chans: int = 3, num_classes: int = 1000,
                 embed_dim=(64, 128, 256, 512), head_dim: int = 32, mlp_ratio=(3.0, 3.0, 3.0, 3.0),
                 qkv_bias: bool = True, qk_scale: float | None = None, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, conv_stem: bool = True,
                 prune_ratio=None, trade_off=None, layer_scale: float | None = None,
                 features_only: bool = False):
        super().__init__()
        self.num_classes = num_classes
        self.features_only = features_only
        self.num_features = self.embed_dim = list(embed_dim)
        prune_ratio = prune_ratio or default_prune_schedule(depth)
        trade_off = trade_off or prune_ratio
        if conv_stem:
            self.patch_embed1 = head_embedding(in_chans, embed_dim[0])
        else:
            self.patch_embed1 = PatchEmbed(nn.Conv2d(in_chans, embed_dim[0], 4, stride=4), embed_dim[0])
        self.patch_embed2 = PatchEmbed(nn.Conv2d(embed_dim[0], embed_dim[1], 2, stride=2), embed_dim[1])
        self.patch_embed3 = PatchEmbed(nn.Conv2d(embed_dim[1], embed_dim[2], 2, stride=2), embed_dim[2])
        self.patch_embed4 = PatchEmbed(nn.Conv2d(embed_dim[2], embed_dim[3], 2, stride=2), embed_dim[3])

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim[2]))
        self.cls_upsample = nn.Linear(embed_dim[2], embed_dim[3])
        self.pos_drop = nn.Dropout(p=drop_rate)
        dpr = torch.linspace(0, drop_path_rate, sum(depth)).tolist()
        num_heads = [dim // head_dim for dim in embed_dim]
        start = [sum(depth[:i]) for i in range(4)]
        self.blocks1 = nn.ModuleList([
            CBlock(embed_dim[0], mlp_ratio[0], drop_rate, dpr[start[0] + i], layer_scale)
            for i in range(depth[0])])
        if features_only:
            self.norm1 = nn.LayerNorm(embed_dim[0], eps=1e-6)
        self.blocks2 = nn.ModuleList([
            CBlock(embed_dim[1], mlp_ratio[1], drop_rate, dpr[start[1] + i], layer_scale)
            for i in range(depth[1])])
        if features_only:
            self.norm2 = nn.LayerNorm(embed_dim[1], eps=1e-6)
        self.blocks3 = nn.ModuleList([
            EvoSABlock(embed_dim[2], num_heads[2], mlp_ratio[2], qkv_bias, qk_scale, drop_rate,
                       attn_drop_rate, dpr[start[2] + i], layer_scale, prune_ratio[2][i],
                       trade_off[2][i], downsample=(i == depth[2] - 1))
            for i in range(depth[2])])
        if features_only:
            self.norm3 = nn.LayerNorm(embed_dim[2], eps=1e-6)
        self.blocks4 = nn.ModuleList([
            EvoSABlock(embed_dim[3], num_heads[3], mlp_ratio[3], qkv_bias, qk_scale, drop_rate,
                       attn_drop_rate, dpr[start[3] + i], layer_scale, prune_ratio[3][i],
                       trade_off[3][i])
            for i in range(depth[3])])
        if features_only:
            self.norm4 = nn.LayerNorm(embed_dim[3], eps=1e-6)
        else:
            self.norm = nn.BatchNorm2d(embed_dim[-1])
            self.norm_cls = nn.LayerNorm(embed_dim[-1])
            self.pre_logits = nn.Identity()
            self.head = nn.Linear(embed_dim[-1], num_classes) if num_classes > 0 else nn.Identity()
            self.head_cls = nn.Linear(embed_dim[-1], num_classes) if num_classes > 0 else nn.Identity()
        init_weights(self)

    @staticmethod
    def _stage_output(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
        return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous()

    @staticmethod
    def _token_indices(x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        return torch.arange(H * W, dtype=torch.long, device=x.device).unsqueeze(0).expand(B, -1)

    def forward_features(self, x: torch.Tensor):
        check_input(x, self)
        outs = []
        x = self.pos_drop(self.patch_embed1(x))
        for blk in self.blocks1:
            x = blk(x)
        if self.features_only:
            outs.append(self._stage_output(self.norm1, x))
        x = self.patch_embed2(x)
        for blk in self.blocks2:
            x = blk(x)
        if self.features_only:
            outs.append(self._stage_output(self.norm2, x))
        x = self.patch_embed3(x)
        cls_token = self.cls_token.expand(x.shape[0], -1, -1)
        global_attn, token_indices = None, self._token_indices(x)
        for blk in self.blocks3:
            cls_token, x, global_attn, token_indices = blk(cls_token, x, global_attn, token_indices)
        if self.features_only:
            outs.append(self._stage_output(self.norm3, x))
        cls_token = self.cls_upsample(cls_token)
        x = self.patch_embed4(x)
        # the pooled scores carry over to stage 4; the token order restarts
        token_indices = self._token_indices(x)
        for blk in self.blocks4:
            cls_token, x, global_attn, token_indices = blk(cls_token, x, global_attn, token_indices)
        if self.features_only:
            outs.append(self._stage_output(self.norm4, x))
            return outs
        if self.training:
            cls_token = self.norm_cls(cls_token)
        return cls_token, self.pre_logits(self.norm(x))

    def forward(self, x: torch.Tensor):
        if self.features_only:
            return self.forward_features(x)
        cls_token, x = self.forward_features(x)
        x = self.head(x.flatten(2).mean(-1))
        if self.training:
            return x, self.head_cls(cls_token.squeeze(1))
        return x
