"""Every variant in timm's model registry, when timm is importable (``import uniformer_models``
calls ``register()``).

``timm.create_model("uniformer_small", pretrained=True, pretrained_cfg_overlay=dict(file=PATH))``
loads an official file through ``load_checkpoint``'s rules (wrappers, prefixes, inflation into
video, a classifier checkpoint into the dense backbone); ``features_only=True`` builds the dense
backbone (``norm1``..``norm4``, official segmentation/detection keys) behind timm's feature API.
The ``pretrained_cfg`` tags name the official files (Hugging Face hub repositories of the
UniFormer authors); nothing here downloads them unless a user asks timm for pretrained weights
without a ``file``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from .checkpoint import adapt_state_dict
from .registry import VARIANTS, create_model
from .uniformer import UniFormer
from .uniformer_light import UniFormerLight
from .uniformer_video import UniFormerVideo

__all__ = ["register", "TIMM_VARIANTS", "PRETRAINED_FILES"]

_IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
_KINETICS = dict(mean=(0.45, 0.45, 0.45), std=(0.225, 0.225, 0.225))
_IMAGE_HUB, _LIGHT_HUB, _VIDEO_HUB = "Sense-X/uniformer_image", "Andy1621/uniformer_light", \
    "Sense-X/uniformer_video"

# timm name -> (registry variant, constructor overrides). The token-labeling S/S+/B files were
# trained with head_dim 32 and the dense auxiliary head; head_dim is invisible in a state dict, so
# they get names of their own.
TIMM_VARIANTS: dict[str, tuple[str, dict]] = {
    **{name: (name, {}) for name in VARIANTS},
    "uniformer_small_tl": ("uniformer_small", dict(head_dim=32, return_dense=True)),
    "uniformer_small_plus_tl": ("uniformer_small_plus", dict(return_dense=True)),
    "uniformer_base_tl": ("uniformer_base", dict(head_dim=32, return_dense=True)),
}

# timm name -> {tag: (hub repository, official file name, input size, classes)}
PRETRAINED_FILES: dict[str, dict[str, tuple]] = {
    "uniformer_small": {"in1k": (_IMAGE_HUB, "uniformer_small_in1k.pth", 224, 1000)},
    "uniformer_small_plus": {"in1k": (_IMAGE_HUB, "uniformer_small_plus_in1k.pth", 224, 1000)},
    "uniformer_small_plus_dim64": {"in1k": (None, None, 224, 1000)},  # Google Drive only
    "uniformer_base": {"in1k": (_IMAGE_HUB, "uniformer_base_in1k.pth", 224, 1000)},
    "uniformer_base_ls": {"in1k": (_IMAGE_HUB, "uniformer_base_ls_in1k.pth", 224, 1000)},
    "uniformer_large_ls": {
        "tl_in1k": (_IMAGE_HUB, "uniformer_large_ls_tl_224.pth", 224, 1000),
        "tl_in1k_384": (_IMAGE_HUB, "uniformer_large_ls_tl_384.pth", 384, 1000)},
    "uniformer_small_tl": {
        "in1k": (_IMAGE_HUB, "uniformer_small_tl_224.pth", 224, 1000),
        "in1k_384": (_IMAGE_HUB, "uniformer_small_tl_384.pth", 384, 1000)},
    "uniformer_small_plus_tl": {
        "in1k": (_IMAGE_HUB, "uniformer_small_plus_tl_224.pth", 224, 1000),
        "in1k_384": (_IMAGE_HUB, "uniformer_small_plus_tl_384.pth", 384, 1000)},
    "uniformer_base_tl": {
        "in1k": (_IMAGE_HUB, "uniformer_base_tl_224.pth", 224, 1000),
        "in1k_384": (_IMAGE_HUB, "uniformer_base_tl_384.pth", 384, 1000)},
    "uniformer_xxs": {f"in1k_{size}": (_LIGHT_HUB, f"uniformer_xxs_{size}_in1k.pth", size, 1000)
                      for size in (224, 192, 160, 128)},
    "uniformer_xs": {f"in1k_{size}": (_LIGHT_HUB, f"uniformer_xs_{size}_in1k.pth", size, 1000)
                     for size in (224, 192)},
    **{f"uniformer_{size}_video": {
        "k400_8x8": (_VIDEO_HUB, f"uniformer_{size}_k400_8x8.pth", (8, 224), 400),
        "k400_16x4": (_VIDEO_HUB, f"uniformer_{size}_k400_16x4.pth", (16, 224), 400),
        "k600_16x4": (_VIDEO_HUB, f"uniformer_{size}_k600_16x4.pth", (16, 224), 600)}
       for size in ("small", "base")},
}


def _pretrained_cfg(name: str, hub: str | None, filename: str | None, size, num_classes: int) -> dict:
    cls = VARIANTS[TIMM_VARIANTS[name][0]][0]
    video = cls is UniFormerVideo
    frames, side = size if video else (None, size)
    classifier = ("head", "head_cls") if cls is UniFormerLight else "head"
    if TIMM_VARIANTS[name][1].get("return_dense") or name == "uniformer_large_ls":
        classifier = ("head", "aux_head")
    conv_stem = cls is UniFormerLight or name.startswith("uniformer_small_plus")
    # timm's input_size is (C, H, W): a video clip's frame count goes in the notes
    cfg = dict(num_classes=num_classes, classifier=classifier, input_size=(3, side, side),
               pool_size=None, crop_pct=1.0 if video else 0.9, interpolation="bicubic",
               first_conv="patch_embed1.proj.0" if conv_stem else "patch_embed1.proj",
               license="mit", paper_ids="arXiv:2201.09450", **(_KINETICS if video else _IMAGENET))
    if video:
        cfg["notes"] = (f"clips of {frames} frames: input (B, 3, {frames}, {side}, {side})",)
    if hub is not None:
        cfg.update(hf_hub_id=hub, hf_hub_filename=filename)
    return cfg


def _take(indices, count: int = 4) -> list[int]:
    """timm's out_indices (ints, negatives from the end) -> stage indices 0..3."""
    if indices is None:
        return list(range(count))
    if isinstance(indices, int):
        indices = range(count - indices, count)  # the last n, as timm reads an int
    taken = []
    for i in indices:
        if not isinstance(i, int) or not -count <= i < count:
            raise ValueError(f"out_indices: expected stage indices in [-{count}, {count}), got "
                             f"{list(indices)}")
        taken.append(i % count)
    return taken


class _DenseFeatures:
    """timm's feature-getter interface on the dense backbone (same modules, same state_dict)."""

    def forward_intermediates(self, x: torch.Tensor, indices=None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = True):
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt: the UniFormer maps are NCHW, got {output_fmt!r}")
        if not intermediates_only:
            raise ValueError("intermediates_only: the dense backbone has no final features")
        maps = self.forward_features(x)
        return [maps[i] for i in _take(indices)]


class TimmUniFormer(_DenseFeatures, UniFormer):
    pass


class TimmUniFormerLight(_DenseFeatures, UniFormerLight):
    pass


_DENSE_CLASSES = {UniFormer: TimmUniFormer, UniFormerLight: TimmUniFormerLight}


def _build(name: str, dense: bool = False, **kwargs) -> nn.Module:
    variant, overrides = TIMM_VARIANTS[name]
    if dense:
        overrides = {k: v for k, v in overrides.items() if k != "return_dense"}
    model = create_model(variant, **{**overrides, **kwargs}, features_only=dense)
    if dense:
        if type(model) not in _DENSE_CLASSES:
            raise ValueError(f"features_only: {name} has no dense-backbone form")
        model.__class__ = _DENSE_CLASSES[type(model)]  # adds methods only: same modules and keys
        model.feature_info = [dict(num_chs=c, reduction=4 * 2 ** i, module=f"norm{i + 1}")
                              for i, c in enumerate(model.embed_dim)]
    return model


def _filter(state_dict, model: nn.Module):
    """timm's pretrained_filter_fn: the official file through load_checkpoint's rules (a head of
    another class count is left to timm, which drops it when num_classes differs)."""
    state, _ = adapt_state_dict(model, state_dict, drop_head=True)
    return state


def _entry(name: str):
    def create(pretrained: bool = False, **kwargs) -> nn.Module:
        from timm.models import build_model_with_cfg

        dense = bool(kwargs.get("features_only", False))
        if dense:
            kwargs.setdefault("feature_cls", "getter")
            kwargs.setdefault("out_indices", (0, 1, 2, 3))
            kwargs["out_indices"] = tuple(_take(kwargs["out_indices"]))
        return build_model_with_cfg(
            lambda **kw: _build(name, dense=dense, **kw), name, pretrained,
            pretrained_filter_fn=_filter, **kwargs)

    create.__name__ = name
    create.__doc__ = f"UniFormer {name} (uniformer_models; official keys)."
    create.__module__ = __name__
    return create


def register() -> list[str]:
    """Register every TIMM_VARIANTS name with timm (once). Returns the names."""
    from timm.models import generate_default_cfgs, is_model, register_model

    global default_cfgs
    default_cfgs = generate_default_cfgs({
        f"{name}.{tag}": _pretrained_cfg(name, *files)
        for name, tags in PRETRAINED_FILES.items() for tag, files in tags.items()})
    for name in TIMM_VARIANTS:
        if is_model(name):  # registered already (a second import, or a timm of the future)
            continue
        entry = _entry(name)
        globals()[name] = entry  # timm reads the default cfgs from the entry's module
        register_model(entry)
    return list(TIMM_VARIANTS)


default_cfgs = None  # filled by register(): timm looks up ``default_cfgs`` in the entry's module
