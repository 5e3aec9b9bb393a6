"""Reference models: variants, parameter counts, output shapes, block semantics, bad input."""
import pytest
import torch

import uniformer_models as um

# UNIFORMER.md's table (millions, rounded to 0.1 M; large_ls: ~100 M from the paper).
TABLE_PARAMS_M = {
    "uniformer_small": 21.5, "uniformer_small_plus": 24.0, "uniformer_small_plus_dim64": 24.0,
    "uniformer_base": 49.8, "uniformer_base_ls": 49.8, "uniformer_large_ls": 100.0,
    "uniformer_xxs": 10.2, "uniformer_xs": 16.5,
}
# Exact counts of the official code's models with 1000 classes (counted side by side with it).
OFFICIAL_PARAMS = {
    "uniformer_small": 21_545_256, "uniformer_small_plus": 24_032_552,
    "uniformer_small_plus_dim64": 24_032_552, "uniformer_base": 49_776_552,
    "uniformer_base_ls": 49_796_520, "uniformer_large_ls": 100_103_888,
    "uniformer_xxs": 10_215_280, "uniformer_xs": 16_509_264,
}

IMAGE = ["uniformer_small", "uniformer_small_plus", "uniformer_small_plus_dim64", "uniformer_base",
         "uniformer_base_ls", "uniformer_large_ls", "uniformer_xxs", "uniformer_xs"]
VIDEO = ["uniformer_small_video", "uniformer_base_video"]


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_list_models_names_every_variant():
    assert um.list_models() == IMAGE + VIDEO


@pytest.mark.parametrize("name", IMAGE)
def test_param_count_matches_table(name):
    count = n_params(um.create_model(name, num_classes=1000))
    assert count == OFFICIAL_PARAMS[name]
    # the table is rounded to 0.1 M (large_ls only known as "~100 M"): 0.1 % on top of the rounding
    rounding = 0.5 if name == "uniformer_large_ls" else 0.05
    assert abs(count / 1e6 - TABLE_PARAMS_M[name]) <= rounding + 1e-3 * TABLE_PARAMS_M[name]


@pytest.mark.parametrize("name", IMAGE)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_image_forward_shapes(name, mode):
    torch.manual_seed(0)
    model = um.create_model(name, num_classes=11).train(mode == "train")
    out = model(torch.randn(2, 3, 96, 96))
    if mode == "train" and name in ("uniformer_xxs", "uniformer_xs"):
        head, head_cls = out  # official light models return both heads in training
        assert head.shape == head_cls.shape == (2, 11)
    elif mode == "train" and name == "uniformer_large_ls":
        x_cls, x_aux = out  # token-labeling head: one prediction per stage-4 token
        assert x_cls.shape == (2, 11) and x_aux.shape == (2, 9, 11)
    else:
        assert out.shape == (2, 11)
        assert torch.isfinite(out).all()


# every split/std combination on small; base has the same structure with more blocks
@pytest.mark.parametrize("name,split,std", [
    ("uniformer_small_video", False, False), ("uniformer_small_video", True, False),
    ("uniformer_small_video", False, True), ("uniformer_small_video", True, True),
    ("uniformer_base_video", False, False)])
def test_video_forward_shapes(name, split, std):
    model = um.create_model(name, num_classes=7, split=split, std=std).eval()
    x = torch.randn(1, 3, 4, 64, 64)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (1, 7)
        torch.testing.assert_close(model([x]), out, rtol=0, atol=0)  # list input, as the official


@pytest.mark.parametrize("kind", ["global", "windows", "hybrid"])
@pytest.mark.parametrize("size", [(512, 512), (500, 380)])
def test_dense_backbone_shapes(kind, size):
    kwargs = {"windows": kind == "windows", "hybrid": kind == "hybrid", "window_size": 14}
    model = um.create_model("uniformer_small", features_only=True, **kwargs).eval()
    assert not any(k.startswith(("head.", "norm.")) for k in model.state_dict())
    assert {f"norm{i}.weight" for i in range(1, 5)} <= set(model.state_dict())
    with torch.no_grad():
        outs = model(torch.randn(1, 3, *size))
    H, W = size
    expected = [(1, 64, H // 4, W // 4), (1, 128, H // 8, W // 8), (1, 320, H // 16, W // 16),
                (1, 512, H // 32, W // 32)]
    assert [tuple(o.shape) for o in outs] == expected
    assert all(o.is_contiguous() and torch.isfinite(o).all() for o in outs)


def test_hybrid_uses_global_attention_every_fourth_block():
    model = um.create_model("uniformer_base", features_only=True, hybrid=True)
    kinds = [type(b).__name__ for b in model.blocks3]
    assert kinds == ["SABlock" if (i + 1) % 4 == 0 else "SABlock_Windows" for i in range(20)]


@pytest.mark.parametrize("size", [(512, 512), (500, 380)])
def test_light_dense_backbone_shapes(size):
    model = um.create_model("uniformer_xxs", features_only=True).eval()
    keys = set(model.state_dict())
    assert "cls_token" in keys and "cls_upsample.weight" in keys and "norm4.weight" in keys
    assert not any(k.startswith(("head", "norm.", "norm_cls")) for k in keys)
    with torch.no_grad():
        outs = model(torch.randn(1, 3, *size))
    H, W = size
    assert [tuple(o.shape) for o in outs] == [
        (1, 56, H // 4, W // 4), (1, 112, H // 8, W // 8), (1, 224, H // 16, W // 16),
        (1, 448, H // 32, W // 32)]


def test_window_block_equals_global_block_when_one_window_covers_the_map():
    torch.manual_seed(0)
    windowed = um.SABlock_Windows(32, num_heads=2, window_size=7, qkv_bias=True).double().eval()
    glob = um.SABlock(32, num_heads=2, qkv_bias=True).double().eval()
    glob.load_state_dict(windowed.state_dict())
    x = torch.randn(2, 32, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(windowed(x), glob(x))


def test_window_padding_is_unmasked_and_enters_softmax():
    """Padded tokens are zeros after norm1: their keys/values are the qkv bias and are attended."""
    torch.manual_seed(0)
    block = um.SABlock_Windows(16, num_heads=2, window_size=4, qkv_bias=True).double().eval()
    torch.nn.init.normal_(block.attn.qkv.bias)
    x = torch.randn(1, 16, 3, 3, dtype=torch.float64)  # padded to 4x4: 7 of 16 tokens are padding
    y = x + block.pos_embed(x)
    tokens = block.norm1(y.permute(0, 2, 3, 1))
    padded = torch.nn.functional.pad(tokens, (0, 0, 0, 1, 0, 1)).reshape(1, 16, 16)
    attn = block.attn(padded).reshape(1, 4, 4, 16)[:, :3, :3]
    z = y.permute(0, 2, 3, 1) + attn
    expected = (z + block.mlp(block.norm2(z))).permute(0, 3, 1, 2)
    torch.testing.assert_close(block(x), expected)
    unpadded = block.attn(tokens.reshape(1, 9, 16)).reshape(1, 3, 3, 16)
    assert (attn - unpadded).abs().max() > 1e-3  # a masked implementation would differ


def test_light_model_carries_no_global_state():
    """Two models (or two calls) must not share pruning state, unlike the official globals."""
    torch.manual_seed(0)
    a = um.create_model("uniformer_xxs", num_classes=5).eval()
    x1, x2 = torch.randn(1, 3, 64, 64), torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        first = a(x1)
        a(x2)
        torch.testing.assert_close(a(x1), first, rtol=0, atol=0)


def test_evo_block_prunes_half_and_keeps_token_order():
    torch.manual_seed(0)
    block = um.EvoSABlock(32, num_heads=2, qkv_bias=True, prune_ratio=0.5, trade_off=0.5).eval()
    B, H, W = 2, 4, 6
    x = torch.randn(B, 32, H, W)
    scores = torch.rand(B, H * W)
    indices = torch.arange(H * W).expand(B, -1)
    cls, y, new_scores, new_indices = block(torch.randn(B, 1, 32), x, scores, indices)
    assert cls.shape == (B, 1, 32) and y.shape == x.shape
    assert torch.equal(new_indices, indices)  # original order restored
    # the half with the lowest scores is only shifted by one shared update per sample
    low = scores.argsort(dim=1)[:, : H * W // 2]
    after_pos = (x + block.pos_embed(x)).flatten(2).transpose(1, 2)
    delta = (y.flatten(2).transpose(1, 2) - after_pos).gather(1, low[..., None].expand(-1, -1, 32))
    torch.testing.assert_close(delta, delta[:, :1].expand_as(delta))
    # dropped tokens keep their scores; informative ones are blended with the new class attention
    kept_low = new_scores.gather(1, low)
    torch.testing.assert_close(kept_low, scores.gather(1, low))


def test_layer_scale_parameters_follow_the_variant():
    keys = set(um.create_model("uniformer_base_ls").state_dict())
    assert "blocks3.0.gamma_1" in keys and "blocks1.0.gamma_1" not in keys
    keys = set(um.create_model("uniformer_large_ls").state_dict())
    assert "blocks1.0.gamma_1" in keys and "blocks3.0.gamma_2" in keys and "aux_head.weight" in keys
    assert um.create_model("uniformer_large_ls").blocks1[0].gamma_1.shape == (1, 128, 1, 1)


def test_official_key_names():
    keys = set(um.create_model("uniformer_small").state_dict())
    for key in ["patch_embed1.proj.weight", "patch_embed1.norm.bias", "blocks1.0.pos_embed.weight",
                "blocks1.0.norm1.running_var", "blocks1.0.conv1.weight", "blocks1.0.attn.weight",
                "blocks1.0.mlp.fc1.weight", "blocks3.0.attn.qkv.weight", "blocks3.0.attn.proj.bias",
                "blocks4.2.mlp.fc2.weight", "norm.running_var", "norm.num_batches_tracked",
                "head.weight"]:
        assert key in keys, key
    keys = set(um.create_model("uniformer_small_video", split=True).state_dict())
    assert "blocks3.0.t_attn.qkv.weight" in keys and "blocks3.0.t_norm.weight" in keys
    keys = set(um.create_model("uniformer_small_plus").state_dict())
    assert "patch_embed1.proj.1.running_mean" in keys and "patch_embed2.proj.0.weight" in keys


# --- bad input -------------------------------------------------------------------------------

def test_unknown_model_lists_known_names():
    with pytest.raises(ValueError, match="uniformer_small_video") as err:
        um.create_model("uniformer_tiny")
    assert "uniformer_tiny" in str(err.value)


def test_head_dim_must_divide_attention_channels():
    with pytest.raises(ValueError, match="head_dim: 48 does not divide"):
        um.create_model("uniformer_small", head_dim=48)
    with pytest.raises(ValueError, match="head_dim"):
        um.create_model("uniformer_small", head_dim=0)


def test_window_options_rejected_where_they_do_not_exist():
    with pytest.raises(ValueError, match="features_only=True"):
        um.create_model("uniformer_small", windows=True)
    with pytest.raises(ValueError, match="windows/hybrid"):
        um.create_model("uniformer_xxs", features_only=True, hybrid=True)
    with pytest.raises(ValueError, match="features_only"):
        um.create_model("uniformer_small_video", features_only=True)


def test_unknown_keyword_is_a_type_error():
    with pytest.raises(TypeError):
        um.create_model("uniformer_small", colour="blue")
