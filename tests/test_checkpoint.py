"""Checkpoint loading: round trips, unwrapping, 2D->3D inflation, head dropping, clear errors."""
import pytest
import torch
import torch.nn.functional as F

import uniformer_models as um


def randomised(model):
    """Every parameter and buffer random, so a load that misses one is caught."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5 if "running_var" in name
                        else torch.randn(t.shape, generator=gen) * 0.1)
    return model


@pytest.mark.parametrize("name,kwargs", [
    ("uniformer_small", {}), ("uniformer_xxs", {}), ("uniformer_small_video", {"split": True}),
    ("uniformer_small", {"features_only": True, "hybrid": True}),
])
def test_save_load_round_trip_strict(tmp_path, name, kwargs):
    src = randomised(um.create_model(name, **kwargs)).eval()
    path = tmp_path / "ckpt.pth"
    torch.save({"model": src.state_dict(), "epoch": 3}, path)
    dst = um.create_model(name, **kwargs).eval()
    report = um.load_checkpoint(dst, path, strict=True)
    assert report.missing == report.unexpected == report.inflated == report.dropped == []
    for key, value in src.state_dict().items():
        assert torch.equal(dst.state_dict()[key], value), key
    x = torch.randn(1, 3, 4, 64, 64) if "video" in name else torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out_src, out_dst = src(x), dst(x)
    for a, b in zip(out_src if isinstance(out_src, list) else [out_src],
                    out_dst if isinstance(out_dst, list) else [out_dst]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("wrapper", [None, "model", "state_dict", "model_state"])
def test_unwraps_official_containers_and_ddp_prefix(wrapper):
    src = randomised(um.create_model("uniformer_xxs"))
    state = {f"module.{k}": v for k, v in src.state_dict().items()}
    checkpoint = state if wrapper is None else {wrapper: state, "optimizer": {"lr": 1.0}}
    dst = um.create_model("uniformer_xxs")
    um.load_checkpoint(dst, checkpoint)
    assert torch.equal(dst.cls_token, src.cls_token)


def test_inflation_repeat_reproduces_2d_response_on_static_clip():
    torch.manual_seed(0)
    w2 = torch.randn(6, 1, 3, 3, dtype=torch.float64)
    w3 = um.inflate_weight(w2, 3, "repeat")
    assert w3.shape == (6, 1, 3, 3, 3)
    torch.testing.assert_close(w3.sum(2), w2)
    frame = torch.randn(1, 6, 9, 11, dtype=torch.float64)
    clip = frame.unsqueeze(2).expand(-1, -1, 5, -1, -1)
    out3 = F.conv3d(clip, w3, padding=(0, 1, 1), groups=6)  # valid in time: no temporal border
    out2 = F.conv2d(frame, w2, padding=1, groups=6)
    torch.testing.assert_close(out3, out2.unsqueeze(2).expand_as(out3))


def test_inflation_center_matches_2d_conv_on_every_frame():
    torch.manual_seed(0)
    w2 = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    w3 = um.inflate_weight(w2, 3, "center")
    assert torch.count_nonzero(w3[:, :, 0]) == 0 and torch.count_nonzero(w3[:, :, 2]) == 0
    clip = torch.randn(1, 2, 4, 7, 7, dtype=torch.float64)  # frames differ: only the centre tap acts
    out3 = F.conv3d(clip, w3, padding=1)
    for t in range(4):
        torch.testing.assert_close(out3[:, :, t], F.conv2d(clip[:, :, t], w2, padding=1))


@pytest.mark.parametrize("mode", ["repeat", "center"])
def test_image_checkpoint_inflates_into_video_model(mode):
    image = randomised(um.create_model("uniformer_small", num_classes=1000))
    video = um.create_model("uniformer_small_video", num_classes=400)
    with pytest.warns(UserWarning, match="class count differs"):  # inflation drops the head
        report = um.load_checkpoint(video, image.state_dict(), inflate=mode)
    assert "patch_embed1.proj.weight" in report.inflated
    assert "blocks1.0.attn.weight" in report.inflated and "blocks3.0.pos_embed.weight" in report.inflated
    assert set(report.dropped) == {"head.weight", "head.bias"}  # 1000 vs 400 classes
    assert report.missing == []  # the dropped head keeps its initial values
    w2 = image.state_dict()["blocks1.0.attn.weight"]
    w3 = video.state_dict()["blocks1.0.attn.weight"]
    torch.testing.assert_close(w3, um.inflate_weight(w2, 5, mode))
    assert torch.equal(video.blocks3[0].attn.qkv.weight, image.blocks3[0].attn.qkv.weight)


def test_head_of_another_class_count_raises_unless_dropped():
    src = randomised(um.create_model("uniformer_small", num_classes=400))
    dst = um.create_model("uniformer_small", num_classes=1000)
    before = dst.head.weight.clone()
    with pytest.raises(ValueError, match=r"(?s)head.weight: checkpoint 400 classes vs model 1000"
                                         r".*drop_head=True"):
        um.load_checkpoint(dst, src.state_dict())
    assert torch.equal(dst.head.weight, before)  # refused: nothing loaded
    with pytest.warns(UserWarning, match="head.weight"):
        report = um.load_checkpoint(dst, src.state_dict(), drop_head=True)
    assert set(report.dropped) == {"head.weight", "head.bias"}
    assert torch.equal(dst.head.weight, before)
    assert torch.equal(dst.blocks4[0].attn.qkv.weight, src.blocks4[0].attn.qkv.weight)


def test_inflation_keeps_a_head_check_when_asked():
    image = randomised(um.create_model("uniformer_small", num_classes=1000))
    video = um.create_model("uniformer_small_video", num_classes=400)
    with pytest.raises(ValueError, match="drop_head=True"):
        um.load_checkpoint(video, image.state_dict(), drop_head=False)


def test_drop_head_must_be_a_bool_or_none():
    model = um.create_model("uniformer_xxs", num_classes=10)
    with pytest.raises(TypeError, match="drop_head"):
        um.load_checkpoint(model, model.state_dict(), drop_head="yes")


def test_head_of_same_class_count_is_kept():
    src = randomised(um.create_model("uniformer_small", num_classes=10))
    dst = um.create_model("uniformer_small", num_classes=10)
    report = um.load_checkpoint(dst, src.state_dict())
    assert report.dropped == [] and torch.equal(dst.head.weight, src.head.weight)


# --- errors ----------------------------------------------------------------------------------

def test_missing_and_unexpected_keys_are_listed_and_model_untouched():
    src = um.create_model("uniformer_small").state_dict()
    del src["blocks1.0.conv1.weight"]
    src["blocks9.0.extra"] = torch.zeros(1)
    dst = um.create_model("uniformer_small")
    before = dst.blocks1[0].conv2.weight.clone()
    with pytest.raises(ValueError) as err:
        um.load_checkpoint(dst, src)
    assert "blocks1.0.conv1.weight" in str(err.value) and "blocks9.0.extra" in str(err.value)
    assert torch.equal(dst.blocks1[0].conv2.weight, before)
    report = um.load_checkpoint(dst, src, strict=False)
    assert report.missing == ["blocks1.0.conv1.weight"] and report.unexpected == ["blocks9.0.extra"]


def test_checkpoint_of_another_size_is_refused():
    small = um.create_model("uniformer_small").state_dict()
    with pytest.raises(ValueError, match="cannot be inflated"):
        um.load_checkpoint(um.create_model("uniformer_large_ls"), small)


def test_bad_arguments():
    model = um.create_model("uniformer_xxs")
    with pytest.raises(ValueError, match="inflate"):
        um.load_checkpoint(model, model.state_dict(), inflate="middle")
    with pytest.raises(TypeError, match="path_or_state_dict"):
        um.load_checkpoint(model, 42)
    with pytest.raises(ValueError, match="no tensors"):
        um.load_checkpoint(model, {"epoch": 1})


def test_unsafe_pickle_is_refused_with_advice(tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save({"model": um.create_model("uniformer_xxs").state_dict(), "cfg": object()}, path)
    with pytest.raises(ValueError, match="weights_only=False"):
        um.load_checkpoint(um.create_model("uniformer_xxs"), path)


# --- official layouts: wrappers, prefixes, dense backbones, layer scale --------------------------

def _mm_checkpoint(backbone_state, kind):
    """A checkpoint as OpenMMLab saves a whole segmentor or detector: meta plus every module's
    tensors under their module names, the backbone's under "backbone."."""
    others = {"seg": ("decode_head.conv_seg.weight", "auxiliary_head.conv_seg.bias"),
              "det": ("neck.lateral_convs.0.conv.weight", "rpn_head.rpn_conv.weight")}[kind]
    state = {f"backbone.{k}": v for k, v in backbone_state.items()}
    state.update({k: torch.randn(3) for k in others})
    return {"meta": {"mmseg_version": "0.x", "CLASSES": ("a", "b")}, "state_dict": state}, list(others)


@pytest.fixture(scope="module")
def dense_small():
    return randomised(um.create_model("uniformer_small", features_only=True, hybrid=True))


@pytest.mark.parametrize("layout", ["plain", "model", "state_dict", "module", "model+module",
                                    "seg", "det", "module+backbone"])
def test_dense_checkpoint_in_every_layout(tmp_path, dense_small, layout):
    src = dense_small
    state, others = src.state_dict(), []
    if layout in ("seg", "det"):
        checkpoint, others = _mm_checkpoint(state, layout)
    elif layout == "module+backbone":
        inner, others = _mm_checkpoint(state, "seg")
        checkpoint = {"state_dict": {f"module.{k}": v for k, v in inner["state_dict"].items()}}
    else:
        if "module" in layout:
            state = {f"module.{k}": v for k, v in state.items()}
        checkpoint = state if layout in ("plain", "module") else {layout.split("+")[0]: state}
    path = tmp_path / "ckpt.pth"
    torch.save(checkpoint, path)
    dst = um.create_model("uniformer_small", features_only=True, hybrid=True)
    report = um.load_checkpoint(dst, path)
    assert sorted(report.dropped) == sorted(others)
    assert report.missing == report.unexpected == report.initialised == []
    for key, value in src.state_dict().items():
        assert torch.equal(dst.state_dict()[key], value), key


@pytest.mark.parametrize("name", ["uniformer_small", "uniformer_small_plus", "uniformer_xxs"])
def test_classification_checkpoint_starts_dense_backbone(name):
    """The official segmentation/detection start: ImageNet weights into the dense backbone, the
    classifier's head and BatchNorm left out, norm1..norm4 kept at their initial values."""
    classifier = randomised(um.create_model(name)).eval()
    dense = um.create_model(name, features_only=True).eval()
    fresh = {k: v.clone() for k, v in dense.state_dict().items() if k.startswith("norm")}
    assert sorted(fresh) == [f"norm{i}.{p}" for i in range(1, 5) for p in ("bias", "weight")]
    report = um.load_checkpoint(dense, {"model": classifier.state_dict()})
    assert sorted(report.initialised) == sorted(fresh)
    assert report.missing == report.unexpected == [] and report.dropped
    assert all(k.startswith(("head.", "head_cls.", "aux_head.", "norm.", "norm_cls."))
               for k in report.dropped)
    assert set(report.dropped) == set(classifier.state_dict()) - set(dense.state_dict())
    for key, value in dense.state_dict().items():
        expected = fresh[key] if key in fresh else classifier.state_dict()[key]
        assert torch.equal(value, expected), key
    # the last map is the classifier's stage-4 tokens through the (identity-affine) LayerNorm
    stage4 = []
    classifier.blocks4[-1].register_forward_hook(lambda m, i, o: stage4.append(o))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        classifier(x)
        c4 = dense(x)[3]
    tokens = stage4[0][1] if isinstance(stage4[0], tuple) else stage4[0]  # light: (cls, x)
    want = F.layer_norm(tokens.permute(0, 2, 3, 1), tokens.shape[1:2], eps=1e-6).permute(0, 3, 1, 2)
    torch.testing.assert_close(c4, want)


def test_dense_checkpoint_into_classifier_is_refused_with_hint():
    dense = um.create_model("uniformer_small", features_only=True).state_dict()
    with pytest.raises(ValueError, match="features_only=True"):
        um.load_checkpoint(um.create_model("uniformer_small"), dense)


def test_layer_scale_checkpoint_loads_strict_and_mismatch_gives_hint():
    ls = randomised(um.create_model("uniformer_base_ls", num_classes=10)).state_dict()
    assert any(".gamma_1" in k for k in ls)
    dst = um.create_model("uniformer_base_ls", num_classes=10)
    um.load_checkpoint(dst, {"model": ls})
    assert torch.equal(dst.blocks3[0].gamma_1, ls["blocks3.0.gamma_1"])
    with pytest.raises(ValueError, match="layer-scale gammas .*: it is a \\*_ls model"):
        um.load_checkpoint(um.create_model("uniformer_base", num_classes=10), ls)
    plain = um.create_model("uniformer_base", num_classes=10).state_dict()
    with pytest.raises(ValueError, match="variant without _ls"):
        um.load_checkpoint(dst, plain)
    # the dense form of an _ls classifier: gammas load, head and norm are left out
    dense = um.create_model("uniformer_base_ls", features_only=True)
    report = um.load_checkpoint(dense, ls)
    assert torch.equal(dense.blocks4[1].gamma_2, ls["blocks4.1.gamma_2"])
    assert len(report.initialised) == 8
