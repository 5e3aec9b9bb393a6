"""timm integration (marker ``integration``): every variant in timm's registry, official-format
files through ``pretrained=True``, the dense maps through timm's feature API, ``uk.accelerate`` on
what timm built. Official-format files are made here from random weights; nothing is downloaded.

Skipped when timm does not import (the default ``make test`` venv has no timm);
``UK_REQUIRE_INTEGRATION=1`` (CI's integration step) turns that skip into a failure.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

import uniformer_models as um

pytestmark = pytest.mark.integration
if um.TIMM_MISSING_REASON:
    if os.environ.get("UK_REQUIRE_INTEGRATION") == "1":
        raise RuntimeError(f"UK_REQUIRE_INTEGRATION=1 but timm does not import: {um.TIMM_MISSING_REASON}")
    pytest.skip(f"timm does not import ({um.TIMM_MISSING_REASON}); the integration step of CI "
                "(scripts/ci_integration.sh) runs these", allow_module_level=True)

import timm  # noqa: E402

from uniformer_kernels.convert import accelerate  # noqa: E402
from uniformer_kernels.testing import assert_rel_close, randomize_state_, tolerance  # noqa: E402
from uniformer_models.timm_models import PRETRAINED_FILES, TIMM_VARIANTS  # noqa: E402

TOL = tolerance(torch.float32, "model")


def official_file(tmp_path, model, layout="model", name="ckpt.pth"):
    """The model's weights saved as the official files are: under "model" (classification),
    "state_dict" with "backbone." (a whole segmentor), or at the top level with "module."."""
    state = model.state_dict()
    if layout == "model":
        checkpoint = {"model": state, "epoch": 300}
    elif layout == "segmentor":
        checkpoint = {"meta": {"CLASSES": ("a", "b")},
                      "state_dict": {**{f"backbone.{k}": v for k, v in state.items()},
                                     "decode_head.conv_seg.weight": torch.randn(2, 8, 1, 1)}}
    else:
        checkpoint = {f"module.{k}": v for k, v in state.items()}
    path = tmp_path / name
    torch.save(checkpoint, path)
    return path


def assert_same_state(got, want):
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(got[key], value), key


def test_every_variant_is_registered_with_its_files():
    names = set(timm.list_models("uniformer_*"))
    assert set(um.list_models()) <= names and set(TIMM_VARIANTS) <= names
    pretrained = set(timm.list_pretrained("uniformer_*"))
    for name, tags in PRETRAINED_FILES.items():
        for tag, (hub, filename, _, num_classes) in tags.items():
            assert (f"{name}.{tag}" in pretrained) == (hub is not None)  # lists files it can fetch
            cfg = timm.models.get_pretrained_cfg(f"{name}.{tag}")
            assert cfg.num_classes == num_classes
            assert (cfg.hf_hub_id, cfg.hf_hub_filename) == (hub, filename)
    assert timm.models.get_pretrained_cfg("uniformer_small").hf_hub_filename == "uniformer_small_in1k.pth"
    assert timm.models.get_pretrained_cfg("uniformer_base_ls").hf_hub_filename == "uniformer_base_ls_in1k.pth"
    assert "8 frames" in timm.models.get_pretrained_cfg("uniformer_small_video").notes[0]


@pytest.mark.parametrize("name,layout", [("uniformer_small", "model"), ("uniformer_xxs", "module"),
                                         ("uniformer_small_plus", "model")])
def test_pretrained_official_file_loads(tmp_path, name, layout):
    src = randomize_state_(um.create_model(name)).eval()
    path = official_file(tmp_path, src, layout)
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert type(model) is type(src)
    assert_same_state(model.state_dict(), src.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), src(x), rtol=0, atol=0)


def test_token_labeling_names_fix_head_dim_and_aux_head():
    model = timm.create_model("uniformer_small_tl")
    assert model.blocks3[0].attn.num_heads == 320 // 32 and hasattr(model, "aux_head")
    assert timm.create_model("uniformer_small").blocks3[0].attn.num_heads == 320 // 64


def test_pretrained_with_other_class_count_keeps_fresh_head(tmp_path):
    src = randomize_state_(um.create_model("uniformer_small"))
    path = official_file(tmp_path, src)
    model = timm.create_model("uniformer_small", pretrained=True, num_classes=7,
                              pretrained_cfg_overlay=dict(file=str(path)))
    assert model.head.weight.shape == (7, 512)
    assert torch.equal(model.blocks4[2].mlp.fc2.weight, src.blocks4[2].mlp.fc2.weight)


def test_image_file_inflates_into_video_model(tmp_path):
    image = randomize_state_(um.create_model("uniformer_small"))
    path = official_file(tmp_path, image)
    video = timm.create_model("uniformer_small_video", pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path)))
    w2 = image.state_dict()["blocks1.0.attn.weight"]
    torch.testing.assert_close(video.state_dict()["blocks1.0.attn.weight"], um.inflate_weight(w2, 5))
    assert torch.equal(video.blocks3[0].attn.qkv.weight, image.blocks3[0].attn.qkv.weight)


@pytest.mark.parametrize("layout,out_indices", [("model", (0, 1, 2, 3)), ("segmentor", (1, 3)),
                                                ("model", (-1,))])
def test_features_only_gives_the_dense_maps(tmp_path, layout, out_indices):
    """A classification file (norm1..4 start fresh) or a segmentor's file (backbone. prefix) into
    the dense backbone, read through timm's feature API."""
    kwargs = dict(hybrid=True, window_size=5)
    if layout == "model":
        src = randomize_state_(um.create_model("uniformer_small"))
        ref = um.create_model("uniformer_small", features_only=True, **kwargs)
    else:
        src = randomize_state_(um.create_model("uniformer_small", features_only=True, **kwargs))
        ref = um.create_model("uniformer_small", features_only=True, **kwargs)
    path = official_file(tmp_path, src, layout)
    um.load_checkpoint(ref, path)
    feats = timm.create_model("uniformer_small", features_only=True, out_indices=out_indices,
                              pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    stages = [i % 4 for i in out_indices]
    assert feats.feature_info.channels() == [(64, 128, 320, 512)[i] for i in stages]
    assert feats.feature_info.reduction() == [(4, 8, 16, 32)[i] for i in stages]
    x = torch.randn(1, 3, 96, 112)
    with torch.no_grad():
        got, want = feats.eval()(x), ref.eval()(x)
    assert len(got) == len(stages)
    for out, i in zip(got, stages):
        torch.testing.assert_close(out, want[i], rtol=0, atol=0)
        assert out.shape[-2:] == (96 // (4 << i), 112 // (4 << i)) or i == 3


def test_features_only_light_and_refusals():
    feats = timm.create_model("uniformer_xxs", features_only=True)
    assert feats.feature_info.channels() == [56, 112, 224, 448]
    with torch.no_grad():
        assert [tuple(o.shape) for o in feats(torch.randn(1, 3, 64, 64))] == [
            (1, 56, 16, 16), (1, 112, 8, 8), (1, 224, 4, 4), (1, 448, 2, 2)]
    with pytest.raises(ValueError, match="features_only"):
        timm.create_model("uniformer_small_video", features_only=True)
    with pytest.raises(ValueError, match="out_indices"):
        timm.create_model("uniformer_small", features_only=True, out_indices=(4,))


@pytest.mark.parametrize("features_only", [False, True])
def test_accelerate_on_what_timm_built(features_only):
    model = timm.create_model("uniformer_small", features_only=features_only, hybrid=features_only,
                              window_size=5) if features_only else timm.create_model("uniformer_small")
    randomize_state_(model)
    fast = accelerate(copy.deepcopy(model).eval())
    assert any(type(m).__module__.startswith("uniformer_kernels") for m in fast.modules())
    x = torch.randn(2, 3, 80, 96)
    with torch.no_grad():
        got, want = fast(x), model.double().eval()(x.double())
    for out, ref in zip(got if features_only else [got], want if features_only else [want]):
        assert_rel_close(out, ref, TOL, name="timm model accelerated")
