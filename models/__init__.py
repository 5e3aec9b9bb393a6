"""Reference UniFormer family in plain eager PyTorch (import name ``uniformer_models``).

The numerical truth that the fused kernels of ``uniformer_kernels`` are checked against. Module
names and state_dict keys are those of the official code (Sense-X/UniFormer), so official
checkpoints load with ``strict=True``. Imports nothing of ``uniformer_kernels``.
"""
from .blocks import CBlock, SABlock, SABlock_Windows, SplitSABlock
from .checkpoint import LoadReport, adapt_state_dict, inflate_weight, load_checkpoint
from .layers import Attention, CMlp, Mlp, PatchEmbed
from .registry import VARIANTS, create_model, list_models
from .uniformer import UniFormer
from .uniformer_light import EvoSABlock, UniFormerLight
from .uniformer_video import UniFormerVideo

# timm's registry gets every variant when timm imports (timm needs a torchvision that matches
# torch). A failure is kept in TIMM_MISSING_REASON instead of breaking this package.
try:
    import timm as _timm  # noqa: F401

    from .timm_models import register as _register_timm

    _register_timm()
    TIMM_MISSING_REASON = ""
except Exception as err:  # ImportError, or torchvision's RuntimeError beside another torch
    TIMM_MISSING_REASON = f"{type(err).__name__}: {err}"

__all__ = [
    "list_models", "create_model", "load_checkpoint", "adapt_state_dict", "inflate_weight",
    "LoadReport", "VARIANTS",
    "UniFormer", "UniFormerLight", "UniFormerVideo",
    "CBlock", "SABlock", "SABlock_Windows", "SplitSABlock", "EvoSABlock",
    "Attention", "Mlp", "CMlp", "PatchEmbed",
]
