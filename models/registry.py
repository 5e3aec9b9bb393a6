"""Named UniFormer variants and ``create_model``.

head_dim is not visible in a state dict (a wrong one loads and gives garbage), so each variant
name fixes it here, as the official factory functions do.
"""
from __future__ import annotations

import torch.nn as nn

from .uniformer import UniFormer
from .uniformer_light import UniFormerLight
from .uniformer_video import UniFormerVideo

__all__ = ["list_models", "create_model", "VARIANTS"]

_S = dict(depth=(3, 4, 8, 3), embed_dim=(64, 128, 320, 512), head_dim=64, mlp_ratio=4.0)
_B = dict(depth=(5, 8, 20, 7), embed_dim=(64, 128, 320, 512), head_dim=64, mlp_ratio=4.0)


# name -> (class, default constructor arguments)
VARIANTS: dict[str, tuple[type[nn.Module], dict]] = {
    "uniformer_small": (UniFormer, _S),
    "uniformer_small_plus": (UniFormer, dict(_S, depth=(3, 5, 9, 3), head_dim=32, conv_stem=True)),
    "uniformer_small_plus_dim64": (UniFormer, dict(_S, depth=(3, 5, 9, 3), conv_stem=True)),
    "uniformer_base": (UniFormer, _B),
    "uniformer_base_ls": (UniFormer, dict(_B, layer_scale_attn=1e-6)),
    # token-labeling model: layer scale in every block and the dense auxiliary head
    "uniformer_large_ls": (UniFormer, dict(depth=(5, 10, 24, 7), embed_dim=(128, 192, 448, 640),
                                           head_dim=64, mlp_ratio=4.0, layer_scale_conv=1e-6,
                                           layer_scale_attn=1e-6, return_dense=True)),
    "uniformer_xxs": (UniFormerLight, dict(depth=(2, 5, 8, 2), embed_dim=(56, 112, 224, 448),
                                           head_dim=28, mlp_ratio=(3.0,) * 4, conv_stem=True)),
    "uniformer_xs": (UniFormerLight, dict(depth=(3, 5, 9, 3), embed_dim=(64, 128, 256, 512),
                                          head_dim=32, mlp_ratio=(3.0,) * 4, conv_stem=True)),
    "uniformer_small_video": (UniFormerVideo, _S),
    "uniformer_base_video": (UniFormerVideo, _B),
}


def list_models() -> list[str]:
    return list(VARIANTS)


def create_model(name: str, num_classes: int | None = None, **kwargs) -> nn.Module:
    """Build a variant by name, e.g. ``create_model("uniformer_small", num_classes=1000)``.

    Keyword arguments override the variant's defaults: ``features_only=True`` (with ``windows``,
    ``hybrid``, ``window_size`` for image S/B) gives the dense backbone; video variants take
    ``split`` and ``std``. ``num_classes`` defaults to 1000 (400 for video).
    """
    if name not in VARIANTS:
        raise ValueError(f"name: unknown model {name!r}; known models: {', '.join(VARIANTS)}")
    cls, defaults = VARIANTS[name]
    config = dict(defaults, **kwargs)
    if num_classes is not None:
        config["num_classes"] = num_classes
    # window options exist only for the image dense backbone; elsewhere only their "off" values
    window_options = {k: config.pop(k) for k in ("windows", "hybrid", "window_size") if k in config}
    if cls is UniFormer:
        config.update(window_options)
    elif window_options.get("windows") or window_options.get("hybrid"):
        raise ValueError(f"windows/hybrid: {name} has no window-attention form")
    if cls is UniFormerVideo and config.pop("features_only", False):
        raise ValueError(f"features_only: {name} has no dense-backbone form")
    if config.get("features_only"):
        config.pop("return_dense", None)  # the dense backbone has no classification heads at all
    head_dim = config["head_dim"]
    if not isinstance(head_dim, int) or head_dim <= 0:
        raise ValueError(f"head_dim: expected a positive int, got {head_dim!r}")
    bad = [d for d in config["embed_dim"][2:] if d % head_dim]
    if bad:
        raise ValueError(f"head_dim: {head_dim} does not divide the attention stages' channels "
                         f"{list(config['embed_dim'][2:])} (not divisible: {bad})")
    return cls(**config)
