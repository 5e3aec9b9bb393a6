"""uk.accelerate on light models built from the official code (issue 17), whose Evo-ViT token
pruning keeps the running token scores and token order in module-level globals.

The tree below imitates the official light code's structure from its spec (globals set by the
root's forward_features and updated by the Attention, ``trade_off`` on the Attention, ``ls`` flags,
(1, C, 1, 1) CBlock gammas, no ``features_only`` on the root); it is our own code, not a copy. Its
state_dict loads strictly into ``uniformer_models.UniFormerLight`` and computes the same in float64,
which shows it is faithful; then the accelerated imitation is held to the float64 reference.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import uniformer_models as um
from test_accelerate import TOL, gradients, outputs
from uniformer_kernels import nn as uknn
from uniformer_kernels.convert import accelerate
from uniformer_kernels.testing import assert_rel_close, randomize_state_
from uniformer_models.layers import DropPath, head_embedding

# the official light code's module globals: 0 / None until the root's forward_features sets them
global_attn = 0
token_indices = None


class LightAttention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias, drop, trade_off):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(drop)
        self.trade_off = trade_off

    def forward(self, x):
        global global_attn
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * self.scale).softmax(-1)
        t = self.trade_off
        if isinstance(global_attn, int):  # first attention block: the scores start here
            global_attn = attn[:, :, 0, 1:].mean(1)
        elif global_attn.shape[1] == N - 1:  # every token attended
            global_attn = (1 - t) * global_attn + t * attn[:, :, 0, 1:].mean(1)
        else:  # pruned: the informative tokens' scores (the last token is the representative)
            update = (1 - t) * global_attn[:, :N - 2] + t * attn[:, :, 0, 1:-1].mean(1)
            if self.training:
                global_attn = torch.cat((update, global_attn[:, N - 2:]), 1)
            else:  # the official eval path writes in place
                global_attn[:, :N - 2] = update
        x = (self.attn_drop(attn) @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class LightCBlock(nn.Module):
    def __init__(self, dim, mlp_ratio, drop, drop_path, ls):
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.BatchNorm2d(dim)
        self.conv1 = nn.Conv2d(dim, dim, 1)
        self.conv2 = nn.Conv2d(dim, dim, 1)
        self.attn = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.BatchNorm2d(dim)
        self.mlp = um.CMlp(dim, int(dim * mlp_ratio), drop=drop)
        self.ls = ls
        if ls:
            self.gamma_1 = nn.Parameter(torch.ones(1, dim, 1, 1))
            self.gamma_2 = nn.Parameter(torch.ones(1, dim, 1, 1))

    def forward(self, x):
        x = x + self.pos_embed(x)
        local = self.conv2(self.attn(self.conv1(self.norm1(x))))
        x = x + self.drop_path(self.gamma_1 * local if self.ls else local)
        mlp = self.mlp(self.norm2(x))
        return x + self.drop_path(self.gamma_2 * mlp if self.ls else mlp)


def gather(x, order):
    return torch.gather(x, 1, order if x.dim() == 2 else order[..., None].expand_as(x))


class LightEvoBlock(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, qkv_bias, drop, drop_path, ls, prune_ratio,
                 trade_off, downsample):
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = LightAttention(dim, num_heads, qkv_bias, drop, trade_off)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = um.Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.prune_ratio, self.downsample = prune_ratio, downsample
        if downsample:
            self.avgpool = nn.AvgPool2d(2, 2)
        self.ls = ls
        if ls:
            self.gamma_1 = nn.Parameter(torch.ones(dim))
            self.gamma_2 = nn.Parameter(torch.ones(dim))
            if prune_ratio != 1:
                self.gamma_3 = nn.Parameter(torch.ones(dim))

    def scaled(self, name, branch):
        return getattr(self, name) * branch if self.ls else branch

    def forward(self, cls_token, x):
        global global_attn, token_indices
        x = x + self.pos_embed(x)
        B, C, H, W = x.shape
        x = x.flatten(2).transpose(1, 2)
        if self.prune_ratio == 1:
            x = torch.cat((cls_token, x), 1)
            x = x + self.drop_path(self.scaled("gamma_1", self.attn(self.norm1(x))))
            x = x + self.drop_path(self.scaled("gamma_2", self.mlp(self.norm2(x))))
            return x[:, :1], x[:, 1:].transpose(1, 2).reshape(B, C, H, W)
        N = x.shape[1]
        keep = int(N * self.prune_ratio)
        order = global_attn.argsort(1, descending=True)
        x, global_attn, token_indices = (gather(t, order) for t in (x, global_attn, token_indices))
        x_drop, score = x[:, keep:], global_attn[:, keep:]
        rep = ((score / score.sum(1, keepdim=True))[..., None] * x_drop).sum(1, keepdim=True)
        x = torch.cat((cls_token, x[:, :keep], rep), 1)
        branch = self.attn(self.norm1(x))
        fast = branch[:, -1:]
        x = x + self.drop_path(self.scaled("gamma_1", branch))
        branch = self.mlp(self.norm2(x))
        fast = fast + branch[:, -1:]
        x = x + self.drop_path(self.scaled("gamma_2", branch))
        x_drop = x_drop + self.scaled("gamma_3", fast.expand(-1, N - keep, -1))
        cls_token, x = x[:, :1], torch.cat((x[:, 1:-1], x_drop), 1)
        scale = global_attn.sum(1, keepdim=True)
        order = token_indices.argsort(1)
        x, global_attn, token_indices = (gather(t, order) for t in (x, global_attn, token_indices))
        if self.downsample:
            global_attn = self.avgpool(global_attn.reshape(B, 1, H, W)).view(B, -1)
            global_attn = global_attn * (scale / global_attn.sum(1, keepdim=True))
        return cls_token, x.transpose(1, 2).reshape(B, C, H, W)


class LightPatchEmbed(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm = nn.LayerNorm(cout)
        self.proj = nn.Conv2d(cin, cout, 2, stride=2)

    def forward(self, x):
        x = self.proj(x)
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous()


class LightRoot(nn.Module):
    """The official UniFormer_Light (``dense``: its segmentation/detection backbone)."""

    def __init__(self, depth, embed_dim, head_dim, num_classes=10, ls=False, dense=False, drop=0.0,
                 drop_path_rate=0.0):
        super().__init__()
        self.dense = dense
        self.patch_embed1 = head_embedding(3, embed_dim[0])
        for i in (2, 3, 4):
            setattr(self, f"patch_embed{i}", LightPatchEmbed(embed_dim[i - 2], embed_dim[i - 1]))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim[2]))
        self.cls_upsample = nn.Linear(embed_dim[2], embed_dim[3])
        self.pos_drop = nn.Dropout(drop)
        dpr = iter(torch.linspace(0, drop_path_rate, sum(depth)).tolist())
        ratios = um.uniformer_light.default_prune_schedule(depth)
        self.blocks1 = nn.ModuleList(LightCBlock(embed_dim[0], 3, drop, next(dpr), ls)
                                     for _ in range(depth[0]))
        self.blocks2 = nn.ModuleList(LightCBlock(embed_dim[1], 3, drop, next(dpr), ls)
                                     for _ in range(depth[1]))
        heads = [dim // head_dim for dim in embed_dim]
        self.blocks3 = nn.ModuleList(
            LightEvoBlock(embed_dim[2], heads[2], 3, True, drop, next(dpr), ls, r, r,
                          i == depth[2] - 1) for i, r in enumerate(ratios[2]))
        self.blocks4 = nn.ModuleList(
            LightEvoBlock(embed_dim[3], heads[3], 3, True, drop, next(dpr), ls, r, r, False)
            for r in ratios[3])
        if dense:
            for i in range(4):
                setattr(self, f"norm{i + 1}", nn.LayerNorm(embed_dim[i], eps=1e-6))
        else:
            self.norm = nn.BatchNorm2d(embed_dim[3])
            self.norm_cls = nn.LayerNorm(embed_dim[3])
            self.pre_logits = nn.Identity()
            self.head = nn.Linear(embed_dim[3], num_classes)
            self.head_cls = nn.Linear(embed_dim[3], num_classes)

    def no_weight_decay(self):
        return {"cls_token"}

    def stage_out(self, i, x):
        return getattr(self, f"norm{i}")(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous()

    def forward(self, x):
        global global_attn, token_indices
        outs = []
        x = self.pos_drop(self.patch_embed1(x))
        for stage in (1, 2):
            for blk in getattr(self, f"blocks{stage}"):
                x = blk(x)
            if self.dense:
                outs.append(self.stage_out(stage, x))
            x = getattr(self, f"patch_embed{stage + 1}")(x)
        cls_token = self.cls_token.expand(x.shape[0], -1, -1)
        global_attn = 0
        token_indices = torch.arange(x.shape[2] * x.shape[3]).expand(x.shape[0], -1)
        for blk in self.blocks3:
            cls_token, x = blk(cls_token, x)
        cls_token = self.cls_upsample(cls_token)
        if self.dense:
            outs.append(self.stage_out(3, x))
        x = self.patch_embed4(x)
        token_indices = torch.arange(x.shape[2] * x.shape[3]).expand(x.shape[0], -1)
        for blk in self.blocks4:
            cls_token, x = blk(cls_token, x)
        if self.dense:
            return tuple(outs + [self.stage_out(4, x)])
        x = self.head(self.pre_logits(self.norm(x)).flatten(2).mean(-1))
        return (x, self.head_cls(self.norm_cls(cls_token).squeeze(1))) if self.training else x


# tiny XXS-like (head_dim 14, heads 1..8) and XS-like (head_dim 16) configurations
CONFIGS = {"xxs": dict(depth=(1, 1, 3, 2), embed_dim=(14, 28, 56, 112), head_dim=14),
           "xs": dict(depth=(1, 1, 3, 2), embed_dim=(16, 32, 64, 128), head_dim=16)}
INPUT = (2, 3, 64, 80)  # stage 3 grid 4x5 (20 tokens, 10 kept), stage 4 2x2


def official(config, seed=0, **kwargs) -> LightRoot:
    return randomize_state_(LightRoot(**CONFIGS[config], **kwargs), seed)


def ours(config, ls=False, dense=False, drop=0.0) -> um.UniFormerLight:
    c = CONFIGS[config]
    return um.UniFormerLight(depth=c["depth"], embed_dim=c["embed_dim"], head_dim=c["head_dim"],
                             num_classes=10, mlp_ratio=(3,) * 4, layer_scale=1.0 if ls else None,
                             features_only=dense, drop_rate=drop, attn_drop_rate=drop)


def image(seed=1):
    return torch.randn(INPUT, generator=torch.Generator().manual_seed(seed))


VARIANTS = [("xxs", {}), ("xs", {}), ("xs", {"ls": True}), ("xxs", {"dense": True})]
IDS = ["xxs", "xs", "xs-layer-scale", "xxs-dense"]


@pytest.mark.parametrize("config,kwargs", VARIANTS, ids=IDS)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_imitation_is_the_reference_model(config, kwargs, mode):
    """The imitation's checkpoint loads strictly into uniformer_models' UniFormerLight, which then
    computes the same, in float64, in both modes (train: logits and cls logits)."""
    tree = official(config, **kwargs).double().train(mode == "train")
    reference = ours(config, **kwargs).double().train(mode == "train")
    reference.load_state_dict(tree.state_dict(), strict=True)
    x = image().double()
    for got, ref in zip(outputs(tree(x)), outputs(reference(x)), strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("config,kwargs", VARIANTS, ids=IDS)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_accelerated_official_tree_matches_float64_reference(config, kwargs, mode):
    """The whole official tree converts (root included); eval outputs, and train-mode input and
    parameter gradients and BatchNorm statistics, against the float64 imitation."""
    tree = official(config, **kwargs).train(mode == "train")
    fast = accelerate(copy.deepcopy(tree))
    assert type(fast) is uknn.UniFormerLight and fast.uk_reference_class is LightRoot
    assert all(type(b) is uknn.EvoSABlock for b in [*fast.blocks3, *fast.blocks4])
    assert all(type(b) is uknn.CBlock for b in [*fast.blocks1, *fast.blocks2])
    x, reference = image(), tree.double()
    if mode == "train":
        for got, ref, what in zip(gradients(fast, x), gradients(reference, x.double()),
                                  ("d input", "d params", "buffers")):
            assert_rel_close(got, ref, TOL, name=f"{config} {what}")
        return
    with torch.no_grad():
        got, expected = fast(x), reference(x.double())
    assert type(got) is type(expected)  # dense: the official tuple of maps
    for i, (out, ref) in enumerate(zip(outputs(got), outputs(expected), strict=True)):
        assert out.dtype == torch.float32
        assert_rel_close(out, ref, TOL, name=f"{config} output {i}")


def test_conversion_keeps_the_state_dict_and_is_idempotent():
    tree = official("xxs")
    before = {k: v.clone() for k, v in tree.state_dict().items()}
    fast = accelerate(copy.deepcopy(tree)).eval()
    assert list(fast.state_dict()) == list(before)
    assert all(torch.equal(fast.state_dict()[k], v) for k, v in before.items())
    other = official("xxs", seed=7)
    fast.load_state_dict(other.state_dict(), strict=True)
    tree.load_state_dict(fast.state_dict(), strict=True)
    assert fast.no_weight_decay() == {"cls_token"}  # the official root's methods stay callable
    with pytest.raises(AttributeError, match="no_such"):
        fast.no_such_method()
    classes = [type(m) for m in fast.modules()]
    with torch.no_grad():
        first = fast(image())
        assert accelerate(fast) is fast and [type(m) for m in fast.modules()] == classes
        torch.testing.assert_close(fast(image()), first, rtol=0, atol=0)
        assert_rel_close(first, other.double().eval()(image().double()), TOL)


def test_stochastic_depth_draws_the_official_masks():
    """From the same seed the fused blocks drop the samples the official tree drops."""
    tree = official("xs", drop_path_rate=0.5).train()
    fast = accelerate(copy.deepcopy(tree))
    torch.manual_seed(3)
    got = gradients(fast, image())
    torch.manual_seed(3)
    expected = gradients(tree.double(), image().double())
    for g, r, what in zip(got, expected, ("d input", "d params", "buffers")):
        assert_rel_close(g, r, TOL, name=what)


def test_active_dropout_runs_the_explicit_state_reference_forward():
    """Converted official EvoSABlocks with dropout (training) run uniformer_models' eager
    explicit-state forward on the official Attention: from the same seed, the same masks and
    results as that reference's blocks. (Block level, on contiguous inputs: Dropout draws its mask
    in memory order, so the accelerated model's channels-last maps get other masks.)"""
    tree = official("xs", drop=0.1)
    fast = accelerate(copy.deepcopy(tree)).train()
    reference = ours("xs", drop=0.1).train()
    reference.load_state_dict(tree.state_dict(), strict=True)
    gen = torch.Generator().manual_seed(2)
    cls_token, x = torch.randn(2, 1, 64, generator=gen), torch.randn(2, 64, 4, 5, generator=gen)
    scores, order = torch.rand(2, 20, generator=gen), torch.arange(20).expand(2, -1)
    for i, global_attn in ((0, None), (1, scores)):  # every token, then pruned
        torch.manual_seed(5)
        got = fast.blocks3[i](cls_token, x, global_attn, order)
        torch.manual_seed(5)
        expected = reference.blocks3[i](cls_token, x, global_attn, order)
        for g, r in zip(got, expected, strict=True):
            torch.testing.assert_close(g, r)


class CustomParent(nn.Module):
    """Holds official light blocks but is not their root: nothing would set the globals."""

    def __init__(self, tree):
        super().__init__()
        self.stem = tree.blocks1[0]
        self.blocks3 = tree.blocks3


@pytest.mark.parametrize("make,name", [
    (lambda tree: tree.blocks3[1], "<root>"),
    (lambda tree: CustomParent(tree), "blocks3.0"),
    (lambda tree: nn.Sequential(tree.blocks2[0], tree.blocks4[0]), "1"),
], ids=["bare-block", "custom-parent", "sequential"])
def test_official_evo_block_without_its_light_root_is_refused(make, name):
    module = make(official("xxs"))
    classes = [type(m) for m in module.modules()]
    with pytest.raises(ValueError, match=rf"'{name}' \(.*LightEvoBlock\).*module globals.*"
                                         rf"accelerate the whole model"):
        accelerate(module)
    assert [type(m) for m in module.modules()] == classes  # checked before anything changed


def test_official_light_video_tree_is_refused():
    """The official light video model's EvoSABlocks work on (T, H, W) maps: no drop-in."""
    tree = official("xxs")
    tree.blocks3[0].pos_embed = nn.Conv3d(56, 56, 3, padding=1, groups=56)
    with pytest.raises(ValueError, match=r"'blocks3\.0' .*pos_embed is not a Conv2d"):
        accelerate(tree)
    assert type(tree) is LightRoot
