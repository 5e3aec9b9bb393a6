"""The OpenMMLab backbone (uniformer_models.openmmlab.UniFormer): the official configs' keys and
four maps (plain PyTorch, always run), and the build through mmengine's / mmseg's registries
(marker ``integration``: skipped without mmengine, a failure under UK_REQUIRE_INTEGRATION=1)."""
from __future__ import annotations

import copy
import importlib.util
import inspect
import os

import pytest
import torch

import uniformer_models as um
from uniformer_kernels.convert import accelerate
from uniformer_kernels.testing import assert_rel_close, randomize_state_, tolerance
from uniformer_models import openmmlab

TOL = tolerance(torch.float32, "model")
# the backbone dict of the official mask_rcnn_1x_hybrid_small / upernet hybrid small configs
OFFICIAL_BACKBONE = dict(embed_dim=[64, 128, 320, 512], layers=[3, 4, 8, 3], head_dim=64,
                         drop_path_rate=0.2, windows=False, hybrid=True, window_size=14)
CHECKPOINTING = "use_checkpoint" in inspect.signature(um.UniFormer.__init__).parameters


def require(module: str):
    if importlib.util.find_spec(module) is not None:
        return
    if os.environ.get("UK_REQUIRE_INTEGRATION") == "1":
        pytest.fail(f"UK_REQUIRE_INTEGRATION=1 but {module} is not installed")
    pytest.skip(f"{module} is not installed; CI's integration step (scripts/ci_integration.sh) "
                "installs it")


def classifier_file(tmp_path):
    src = randomize_state_(um.create_model("uniformer_small"))
    path = tmp_path / "uniformer_small_in1k.pth"
    torch.save({"model": src.state_dict()}, path)
    return src, path


def test_official_keys_build_the_dense_backbone_and_load_pretrained(tmp_path):
    src, path = classifier_file(tmp_path)
    backbone = openmmlab.UniFormer(**OFFICIAL_BACKBONE, pretrained=str(path))
    ref = um.create_model("uniformer_small", features_only=True, hybrid=True, window_size=14,
                          drop_path_rate=0.2)
    report = um.load_checkpoint(ref, path)
    assert sorted(backbone.load_report.initialised) == sorted(report.initialised) != []
    assert backbone.state_dict().keys() == ref.state_dict().keys()
    for key, value in ref.state_dict().items():
        assert torch.equal(backbone.state_dict()[key], value), key
    x = torch.randn(1, 3, 96, 80)
    with torch.no_grad():
        got, want = backbone.eval()(x), ref.eval()(x)
    assert [tuple(o.shape) for o in got] == [(1, 64, 24, 20), (1, 128, 12, 10), (1, 320, 6, 5),
                                             (1, 512, 3, 2)]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_use_checkpoint_is_passed_on_or_refused():
    kwargs = dict(OFFICIAL_BACKBONE, use_checkpoint=True, checkpoint_num=[0, 0, 8, 0])
    if CHECKPOINTING:  # the reference backbone takes the official arguments: passed on as they are
        maps = openmmlab.UniFormer(**kwargs)(torch.randn(1, 3, 64, 64))
        assert [m.shape[1] for m in maps] == [64, 128, 320, 512]
    else:
        with pytest.raises(NotImplementedError, match="use_checkpoint"):
            openmmlab.UniFormer(**kwargs)
    openmmlab.UniFormer(**dict(kwargs, use_checkpoint=False))  # accepted either way


def test_init_cfg_and_bad_arguments(tmp_path):
    src, path = classifier_file(tmp_path)
    backbone = openmmlab.UniFormer(init_cfg=dict(type="Pretrained", checkpoint=str(path)))
    assert torch.equal(backbone.blocks3[0].attn.qkv.weight, src.blocks3[0].attn.qkv.weight)
    with pytest.raises(ValueError, match="init_cfg"):
        openmmlab.UniFormer(init_cfg=dict(type="Kaiming"))
    with pytest.raises(TypeError, match="pretrained"):
        openmmlab.UniFormer(pretrained=3)


@pytest.mark.integration
def test_mmengine_registry_builds_official_config(tmp_path):
    require("mmengine")
    from mmengine.registry import MODELS

    assert "mmengine.registry.MODELS" in openmmlab.register()
    src, path = classifier_file(tmp_path)
    cfg = dict(type="UniFormer", **OFFICIAL_BACKBONE, use_checkpoint=False,
               checkpoint_num=[0, 0, 8, 0], pretrained=str(path))
    backbone = MODELS.build(cfg)
    assert type(backbone) is openmmlab.UniFormer
    assert torch.equal(backbone.blocks4[0].mlp.fc1.weight, src.blocks4[0].mlp.fc1.weight)
    randomize_state_(backbone)  # norm1..4 too, so the accelerated LayerNorms are checked
    fast = accelerate(copy.deepcopy(backbone).eval())
    x = torch.randn(1, 3, 128, 96)  # stage 3: 8x6 in windows of 14 (padded)
    with torch.no_grad():
        got, want = fast(x), backbone.double().eval()(x.double())
    assert len(got) == 4
    for i, (out, ref) in enumerate(zip(got, want)):
        assert_rel_close(out, ref, TOL, name=f"mmengine-built backbone output {i}")


def downstream_registry(package: str):
    """mmseg/mmdet install with mmcv-lite (pure Python) and their registries import."""
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (CI installs timm and mmengine only; see README)")
    openmmlab.register()
    return importlib.import_module(f"{package}.registry").MODELS


@pytest.mark.integration
@pytest.mark.parametrize("package", ["mmseg", "mmdet"])
def test_downstream_registry_has_backbone(package):
    assert downstream_registry(package).module_dict["UniFormer"] is openmmlab.UniFormer


@pytest.mark.integration
@pytest.mark.parametrize("package", ["mmseg", "mmdet"])
def test_downstream_registry_builds_backbone(package):
    registry = downstream_registry(package)
    if importlib.util.find_spec("mmcv._ext") is None:
        pytest.skip(f"mmcv without compiled ops (mmcv-lite): building through {package}'s registry "
                    f"imports {package}.models, which needs mmcv._ext (a source build of mmcv)")
    maps = registry.build(dict(type="UniFormer", **OFFICIAL_BACKBONE))(torch.randn(1, 3, 64, 64))
    assert [m.shape[1] for m in maps] == [64, 128, 320, 512]
