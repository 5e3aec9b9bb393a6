"""UniFormer for video (S, B): the image architecture with 3D convs and BatchNorm3d, global or
split (temporal then spatial) attention in stages 3-4."""
from __future__ import annotations

import torch
import torch.nn as nn

from .blocks import CBlock, SABlock, SplitSABlock
from .input_checks import check_input
from .layers import PatchEmbed, check_checkpoint_num, init_weights, run_block

__all__ = ["UniFormerVideo"]


class UniFormerVideo(nn.Module):
    """Input (B, 3, T, H, W), or a list whose first element is that tensor (the official video
    code reads ``x[0]``).

    Stems: stage 1 a (3, 4, 4) conv with stride (2, 4, 4) and temporal padding 1; later stages a
    (1, 2, 2) conv, or (3, 2, 2) with temporal padding 1 when ``std=True``. ``split=True`` uses
    SplitSABlock (divided space-time attention) in stages 3-4. ``use_checkpoint`` with
    ``checkpoint_num=(n1, n2, n3, n4)``: the first n blocks of each stage are recomputed in
    backward (``layers.run_block``).
    """

    def __init__(self, depth=(3, 4, 8, 3), in_chans: int = 3, num_classes: int = 400,
                 embed_dim=(64, 128, 320, 512), head_dim: int = 64, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, qk_scale: float | None = None, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, split: bool = False,
                 std: bool = False, use_checkpoint: bool = False, checkpoint_num=(0, 0, 0, 0)):
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.checkpoint_num = check_checkpoint_num(use_checkpoint, checkpoint_num)
        self.num_classes = num_classes
        self.num_features = self.embed_dim = list(embed_dim)
        self.patch_embed1 = PatchEmbed(
            nn.Conv3d(in_chans, embed_dim[0], (3, 4, 4), (2, 4, 4), (1, 0, 0)), embed_dim[0])
        t_kernel, t_pad = (3, 1) if std else (1, 0)
        for i in range(1, 4):
            proj = nn.Conv3d(embed_dim[i - 1], embed_dim[i], (t_kernel, 2, 2), (1, 2, 2), (t_pad, 0, 0))
            setattr(self, f"patch_embed{i + 1}", PatchEmbed(proj, embed_dim[i]))
        self.pos_drop = nn.Dropout(p=drop_rate)
        dpr = torch.linspace(0, drop_path_rate, sum(depth)).tolist()
        num_heads = [dim // head_dim for dim in embed_dim]
        start = [sum(depth[:i]) for i in range(4)]
        self.blocks1 = nn.ModuleList([
            CBlock(embed_dim[0], mlp_ratio, drop_rate, dpr[start[0] + i], ndim=3) for i in range(depth[0])])
        self.blocks2 = nn.ModuleList([
            CBlock(embed_dim[1], mlp_ratio, drop_rate, dpr[start[1] + i], ndim=3) for i in range(depth[1])])

        def attention_block(stage: int, i: int) -> nn.Module:
            kwargs = dict(mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop_rate,
                          attn_drop=attn_drop_rate, drop_path=dpr[start[stage] + i])
            if split:
                return SplitSABlock(embed_dim[stage], num_heads[stage], **kwargs)
            return SABlock(embed_dim[stage], num_heads[stage], ndim=3, **kwargs)

        self.blocks3 = nn.ModuleList([attention_block(2, i) for i in range(depth[2])])
        self.blocks4 = nn.ModuleList([attention_block(3, i) for i in range(depth[3])])
        self.norm = nn.BatchNorm3d(embed_dim[-1])
        self.pre_logits = nn.Identity()
        self.head = nn.Linear(embed_dim[-1], num_classes) if num_classes > 0 else nn.Identity()
        init_weights(self)
        # The official initialisation starts each temporal attention as an identity-like branch.
        for name, p in self.named_parameters():
            if "t_attn.qkv." in name or "t_attn.proj.bias" in name:
                nn.init.zeros_(p)
            elif "t_attn.proj.weight" in name:
                nn.init.ones_(p)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self)
        x = self.pos_drop(self.patch_embed1(x))
        for stage, (blocks, next_embed) in enumerate((
                (self.blocks1, self.patch_embed2), (self.blocks2, self.patch_embed3),
                (self.blocks3, self.patch_embed4), (self.blocks4, None))):
            for i, blk in enumerate(blocks):
                x = run_block(self, stage, i, blk, x)
            if next_embed is not None:
                x = next_embed(x)
        return self.pre_logits(self.norm(x))

    def forward(self, x) -> torch.Tensor:
        if isinstance(x, (list, tuple)) and x:
            x = x[0]
        x = self.forward_features(x)
        return self.head(x.flatten(2).mean(-1))
