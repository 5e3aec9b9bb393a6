"""UniFormerLight, the root of a light model (XXS, XS) built from the official code.

The official root's ``forward_features`` resets the token-pruning state (running scores, token
order) in module globals that its EvoSABlocks' Attention reads and writes. The drop-in runs the
reference's ``forward_features`` instead, which carries that state explicitly through the
converted blocks' ``forward(cls_token, x, global_attn, token_indices)``: same arithmetic, no
globals. Only such roots are claimed: ``uniformer_models.UniFormerLight`` already carries the
state and keeps its class.

Classification roots (``head``, ``norm``...) return what the official one does (eval: logits;
train: ``(logits, cls logits)``); dense backbones (``norm1``..``norm4``, the official
segmentation/detection ``UniFormer_Light``) return the tuple of four stage maps. The official
class's other methods (``no_weight_decay``, ``init_weights``...) stay callable.
"""
from __future__ import annotations

import types

import torch.nn as nn

from uniformer_models import uniformer_light as reference

from . import _match
from ._base import Accelerated
from .evo_block import EvoSABlock, keeps_state_in_globals

_STAGES = ("patch_embed1", "patch_embed2", "patch_embed3", "patch_embed4", "pos_drop",
           "blocks1", "blocks2", "blocks3", "blocks4", "cls_token", "cls_upsample")
_HEAD = ("norm", "norm_cls", "pre_logits", "head", "head_cls")
_DENSE = ("norm1", "norm2", "norm3", "norm4")


class UniFormerLight(Accelerated, reference.UniFormerLight):
    """Drop-in root of an official light model (classification or dense backbone)."""

    uk_reference_class = reference.UniFormerLight

    @property
    def features_only(self) -> bool:
        # the official roots have no such flag: the dense one is the one with stage norms
        flag = self.__dict__.get("features_only")
        return (hasattr(self, "norm4") and not hasattr(self, "head")) if flag is None else flag

    @features_only.setter
    def features_only(self, value: bool):
        self.__dict__["features_only"] = value

    @classmethod
    def claims(cls, m: nn.Module) -> bool:
        blocks = getattr(m, "blocks3", None)
        return (hasattr(m, "cls_upsample") and isinstance(blocks, nn.ModuleList)
                and any(keeps_state_in_globals(b) for b in blocks))

    @classmethod
    def mismatch(cls, m: nn.Module) -> str | None:
        problem = _match.missing(m, *_STAGES)
        if problem:
            return problem
        if _match.missing(m, *_HEAD) and _match.missing(m, *_DENSE):
            return (f"neither a classifier ({_match.missing(m, *_HEAD)}) nor a dense backbone "
                    f"({_match.missing(m, *_DENSE)})")
        for stage in ("blocks3", "blocks4"):
            for i, block in enumerate(getattr(m, stage)):
                if not (EvoSABlock.claims(block) and keeps_state_in_globals(block)):
                    return (f"{stage}.{i} is not an official EvoSABlock (pos_embed, prune_ratio, "
                            f"forward(cls_token, x))")
        return None

    @classmethod
    def carries(cls, m: nn.Module) -> list[nn.Module]:
        return [*m.blocks3, *m.blocks4]

    def __getattr__(self, name: str):
        # reached only when neither a parameter, buffer, submodule nor drop-in attribute matched
        try:
            return super().__getattr__(name)
        except AttributeError:
            method = getattr(self.__dict__.get("uk_reference_class"), name, None)
            if not callable(method):
                raise
            return types.MethodType(method, self)

    def _forward(self, x):
        out = reference.UniFormerLight.forward(self, x)
        return tuple(out) if self.features_only else out
