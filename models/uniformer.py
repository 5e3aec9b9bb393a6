"""UniFormer for images: classification (S, S+, B, B-ls, L-ls) and the dense backbone used for
segmentation, detection and pose (``features_only=True``, global / window / hybrid stage 3)."""
from __future__ import annotations

import torch
import torch.nn as nn

from .blocks import CBlock, SABlock, SABlock_Windows
from .input_checks import check_input
from .layers import (PatchEmbed, check_checkpoint_num, head_embedding, init_weights,
                     middle_embedding, run_block)

__all__ = ["UniFormer"]


class UniFormer(nn.Module):
    """Four stages: CBlocks in stages 1-2, SABlocks in stages 3-4.

    Args:
        depth, embed_dim: blocks and channels per stage.
        head_dim: channels per attention head (heads = dim // head_dim).
        conv_stem: overlapping conv stems (small_plus) instead of patch embeddings.
        layer_scale_conv / layer_scale_attn: initial value of the CBlock / SABlock layer-scale
            gammas, or None for no layer scale (base_ls: attn only; large_ls: both).
        return_dense: token-labeling head ``aux_head``; eval output is
            ``head(mean) + 0.5 * max_tokens(aux_head(tokens))`` (large_ls checkpoints have it).
        features_only: dense backbone; returns four NCHW maps through LayerNorms norm1..norm4.
        windows / hybrid / window_size: stage-3 attention of the dense backbone: every block in
            windows, or windows except every 4th block (i + 1 divisible by 4), which stays global.
        use_checkpoint / checkpoint_num: the first checkpoint_num[s] blocks of stage s are
            recomputed in backward (torch.utils.checkpoint), as the official dense backbone.
    """

    def __init__(self, depth=(3, 4, 8, 3), in_chans: int = 3, num_classes: int = 1000,
                 embed_dim=(64, 128, 320, 512), head_dim: int = 64, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, qk_scale: float | None = None, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, conv_stem: bool = False,
                 layer_scale_conv: float | None = None, layer_scale_attn: float | None = None,
                 return_dense: bool = False, features_only: bool = False, windows: bool = False,
                 hybrid: bool = False, window_size: int = 14, use_checkpoint: bool = False,
                 checkpoint_num=(0, 0, 0, 0)):
        super().__init__()
        self.use_checkpoint = use_checkpoint  # the dense backbone's option (official seg code)
        self.checkpoint_num = check_checkpoint_num(use_checkpoint, checkpoint_num)
        if (windows or hybrid) and not features_only:
            raise ValueError("windows/hybrid: window attention is for the dense backbone; "
                             "pass features_only=True")
        if return_dense and features_only:
            raise ValueError("return_dense: a classification option; not with features_only=True")
        self.num_classes = num_classes
        self.features_only = features_only
        self.return_dense = return_dense
        self.num_features = self.embed_dim = list(embed_dim)
        if conv_stem:
            self.patch_embed1 = head_embedding(in_chans, embed_dim[0])
            self.patch_embed2 = middle_embedding(embed_dim[0], embed_dim[1])
            self.patch_embed3 = middle_embedding(embed_dim[1], embed_dim[2])
            self.patch_embed4 = middle_embedding(embed_dim[2], embed_dim[3])
        else:
            self.patch_embed1 = PatchEmbed(nn.Conv2d(in_chans, embed_dim[0], 4, stride=4), embed_dim[0])
            self.patch_embed2 = PatchEmbed(nn.Conv2d(embed_dim[0], embed_dim[1], 2, stride=2), embed_dim[1])
            self.patch_embed3 = PatchEmbed(nn.Conv2d(embed_dim[1], embed_dim[2], 2, stride=2), embed_dim[2])
            self.patch_embed4 = PatchEmbed(nn.Conv2d(embed_dim[2], embed_dim[3], 2, stride=2), embed_dim[3])
        self.pos_drop = nn.Dropout(p=drop_rate)
        dpr = torch.linspace(0, drop_path_rate, sum(depth)).tolist()
        num_heads = [dim // head_dim for dim in embed_dim]
        start = [sum(depth[:i]) for i in range(4)]

        def cblock(stage: int, i: int) -> CBlock:
            return CBlock(embed_dim[stage], mlp_ratio, drop_rate, dpr[start[stage] + i], layer_scale_conv)

        def sablock(stage: int, i: int, window: bool = False) -> nn.Module:
            kwargs = dict(mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop_rate,
                          attn_drop=attn_drop_rate, drop_path=dpr[start[stage] + i],
                          layer_scale=layer_scale_attn)
            if window:
                return SABlock_Windows(embed_dim[stage], num_heads[stage], window_size, **kwargs)
            return SABlock(embed_dim[stage], num_heads[stage], **kwargs)

        self.blocks1 = nn.ModuleList([cblock(0, i) for i in range(depth[0])])
        if features_only:
            self.norm1 = nn.LayerNorm(embed_dim[0], eps=1e-6)
        self.blocks2 = nn.ModuleList([cblock(1, i) for i in range(depth[1])])
        if features_only:
            self.norm2 = nn.LayerNorm(embed_dim[1], eps=1e-6)
        self.blocks3 = nn.ModuleList([
            sablock(2, i, window=windows or (hybrid and (i + 1) % 4 != 0)) for i in range(depth[2])])
        if features_only:
            self.norm3 = nn.LayerNorm(embed_dim[2], eps=1e-6)
        self.blocks4 = nn.ModuleList([sablock(3, i) for i in range(depth[3])])
        if features_only:
            self.norm4 = nn.LayerNorm(embed_dim[3], eps=1e-6)
        else:
            self.norm = nn.BatchNorm2d(embed_dim[-1])
            self.pre_logits = nn.Identity()
            self.head = nn.Linear(embed_dim[-1], num_classes) if num_classes > 0 else nn.Identity()
            if return_dense:
                self.aux_head = nn.Linear(embed_dim[-1], num_classes) if num_classes > 0 else nn.Identity()
        init_weights(self)

    @staticmethod
    def _stage_output(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
        return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous()

    def forward_features(self, x: torch.Tensor):
        check_input(x, self)
        outs = []
        x = self.pos_drop(self.patch_embed1(x))
        stages = ((self.blocks1, self.patch_embed2), (self.blocks2, self.patch_embed3),
                  (self.blocks3, self.patch_embed4), (self.blocks4, None))
        for stage, (blocks, next_embed) in enumerate(stages, start=1):
            for i, blk in enumerate(blocks):
                x = run_block(self, stage - 1, i, blk, x)
            if self.features_only:
                outs.append(self._stage_output(getattr(self, f"norm{stage}"), x))
            if next_embed is not None:
                x = next_embed(x)
        if self.features_only:
            return outs
        return self.pre_logits(self.norm(x))

    def forward(self, x: torch.Tensor):
        x = self.forward_features(x)
        if self.features_only:
            return x
        if not self.return_dense:
            return self.head(x.flatten(2).mean(-1))
        tokens = x.flatten(2).transpose(-1, -2)
        x_cls = self.head(tokens.mean(dim=1))
        x_aux = self.aux_head(tokens)
        if not self.training:
            return x_cls + 0.5 * x_aux.max(1)[0]
        return x_cls, x_aux
