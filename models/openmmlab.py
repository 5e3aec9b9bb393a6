"""The dense backbone as ``UniFormer`` in OpenMMLab's model registries (mmengine's root ``MODELS``,
and mmseg's and mmdet's when they are installed), taking the official segmentation/detection
configs' backbone keys. Import it (``custom_imports = dict(imports=["uniformer_models.openmmlab"])``
in a config) to register; nothing else imports it.

    backbone=dict(type="UniFormer", layers=[3, 4, 8, 3], embed_dim=[64, 128, 320, 512],
                  head_dim=64, drop_path_rate=0.2, windows=False, hybrid=True, window_size=14,
                  pretrained="uniformer_small_in1k.pth")

returns the official four NCHW maps (strides 4, 8, 16, 32). ``pretrained`` (or
``init_cfg=dict(type="Pretrained", checkpoint=PATH)``) is loaded with ``load_checkpoint``: an
ImageNet checkpoint leaves out the classifier's head/norm and keeps norm1..norm4 initialised, as
the official code does; a whole detector/segmentor file gives its ``backbone.`` tensors.
"""
from __future__ import annotations

import importlib
import inspect

from .checkpoint import LoadReport, load_checkpoint
from .uniformer import UniFormer as _DenseUniFormer

__all__ = ["UniFormer", "register", "REGISTRIES"]

# (module, attribute) of each registry that gets the backbone, when importable
REGISTRIES = (("mmengine.registry", "MODELS"), ("mmseg.registry", "MODELS"),
              ("mmdet.registry", "MODELS"))


def _supports(name: str) -> bool:
    return name in inspect.signature(_DenseUniFormer.__init__).parameters


class UniFormer(_DenseUniFormer):
    """The official segmentation/detection backbone's arguments on the reference dense backbone
    (same module names and state_dict keys: the official seg/det checkpoints load strictly)."""

    def __init__(self, layers=(3, 4, 8, 3), embed_dim=(64, 128, 320, 512), head_dim: int = 64,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, qk_scale: float | None = None,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 windows: bool = False, hybrid: bool = False, window_size: int = 14,
                 use_checkpoint: bool = False, checkpoint_num=(0, 0, 0, 0),
                 pretrained: str | None = None, in_chans: int = 3, init_cfg: dict | None = None):
        kwargs = {}
        if _supports("use_checkpoint"):
            kwargs.update(use_checkpoint=use_checkpoint, checkpoint_num=checkpoint_num)
        elif use_checkpoint:
            raise NotImplementedError(
                "use_checkpoint: activation checkpointing is not implemented by this version of "
                "the reference backbone; set use_checkpoint=False")
        if init_cfg is not None:
            if pretrained is not None or init_cfg.get("type") != "Pretrained":
                raise ValueError("init_cfg: only dict(type='Pretrained', checkpoint=PATH), and "
                                 "not together with pretrained")
            pretrained = init_cfg["checkpoint"]
        if pretrained is not None and not isinstance(pretrained, str):
            raise TypeError(f"pretrained: expected a file path or None, got {type(pretrained).__name__}")
        super().__init__(depth=tuple(layers), in_chans=in_chans, embed_dim=tuple(embed_dim),
                         head_dim=head_dim, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                         qk_scale=qk_scale, drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
                         drop_path_rate=drop_path_rate, features_only=True, windows=windows,
                         hybrid=hybrid, window_size=window_size, **kwargs)
        self.pretrained = pretrained
        self.load_report: LoadReport | None = None
        self.init_weights()

    def init_weights(self, pretrained: str | None = None):
        """Load ``pretrained`` (else the constructor's); OpenMMLab's runners call this after
        building. Without a file the constructor's initialisation stays."""
        pretrained = pretrained or self.pretrained
        if pretrained is not None:
            self.load_report = load_checkpoint(self, pretrained)
        self.is_init = True  # mmengine's BaseModule.init_weights skips children marked so


def register() -> list[str]:
    """Register ``UniFormer`` in every importable registry of REGISTRIES; returns their names."""
    done = []
    for module_name, attr in REGISTRIES:
        try:
            registry = getattr(importlib.import_module(module_name), attr)
        except ImportError:
            continue
        if registry.module_dict.get("UniFormer") is not UniFormer:
            registry.register_module(name="UniFormer", module=UniFormer, force=True)
        done.append(f"{module_name}.{attr}")
    return done


REGISTERED = register()
