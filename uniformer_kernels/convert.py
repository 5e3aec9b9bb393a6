"""``accelerate(model)``: UniFormer's blocks, stems and MLPs switched, in place, to the drop-in
modules of ``uniformer_kernels.nn``.

Conversion swaps each matching module's class and touches nothing else: no parameter or buffer
is added, removed or changed, so the state_dict keeps its keys and values and checkpoints load
before or after (strict). Modules are matched by structure and attribute names, not by class, so
trees built from the official UniFormer code convert too.
"""
from __future__ import annotations

import torch.nn as nn

from . import backends
from .nn import MODULES
from .nn._base import Accelerated


def accelerate(model: nn.Module, backend: str | None = None) -> nn.Module:
    """Convert ``model``'s UniFormer modules in place and return ``model``.

    Every block (CBlock, SABlock, SABlock_Windows, SplitSABlock, EvoSABlock), stem (PatchEmbed,
    head_embedding, middle_embedding) and MLP (Mlp, CMlp) gets the forward of its ``uk.nn``
    counterpart. Inference folds the BatchNorms at call time from the live statistics; training
    keeps batch statistics and supports backward and autocast. Modules with active dropout (p > 0)
    in training run their original forward (the fused path has no dropout; stochastic depth is
    supported).

    backend: force a backend (``"cpu"``, ``"triton"``, ``"cuda"``, ``"eager"``) for the uk.ops the
        converted modules call, as ``with uk.backend(backend)`` around each forward; None lets each
        op choose. Converting again only updates it (conversion is idempotent). That context
        manager is a graph break for torch.compile: compile with ``fullgraph=True`` only without
        a forced backend (or force it around the compiled call instead).

    The official light models (XXS, XS; classifier or dense backbone) convert as a whole: their
    root becomes ``uk.nn.UniFormerLight``, whose forward_features carries the token-pruning state
    (running scores, token order) that the official code keeps in module globals explicitly
    through the converted EvoSABlocks, with the same arithmetic.

    Raises ValueError, before changing anything, naming the first module that looks like a
    UniFormer module (claimed by a drop-in class's attribute names, or having ``pos_embed`` and
    ``mlp``) but whose structure the drop-in forward does not compute, and why. Example: an
    official light EvoSABlock converted without its light root (a bare block or another parent),
    whose state in module globals nothing would set: accelerate the whole model.
    """
    if backend is not None:
        backends._check_name(backend, "accelerate(backend=...)")
    plan = []
    carried = set()  # ids of the modules whose state a converted ancestor passes explicitly
    for name, module in model.named_modules():  # parents before children
        if isinstance(module, Accelerated):
            plan.append((module, type(module)))
            continue
        cls = next((c for c in MODULES if c.claims(module)), None)
        if cls is None:
            if hasattr(module, "pos_embed") and hasattr(module, "mlp"):
                _fail(name, module, "it has pos_embed and mlp like a UniFormer block, but no "
                                    "conv1 (CBlock) or attn (attention blocks)")
            continue
        reason = cls.mismatch(module)
        if reason:
            _fail(name, module, f"uk.nn.{cls.__name__} does not apply: {reason}")
        reason = None if id(module) in carried else cls.orphan(module)
        if reason:
            _fail(name, module, reason)
        carried.update(id(m) for m in cls.carries(module))
        plan.append((module, cls))
    for module, cls in plan:
        if not isinstance(module, Accelerated):
            module.uk_reference_class = type(module)
            module.__class__ = cls
        module.uk_backend = backend
    return model


def _fail(name: str, module: nn.Module, reason: str):
    raise ValueError(f"accelerate: cannot convert module {name or '<root>'!r} "
                     f"({type(module).__module__}.{type(module).__qualname__}): {reason}")
