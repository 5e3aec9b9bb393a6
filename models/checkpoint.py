"""Loading official checkpoints: unwrap containers and prefixes, inflate 2D kernels to 3D for video,
drop a mismatched head, start a dense backbone from a classification checkpoint."""
from __future__ import annotations

import os
import warnings
from typing import Mapping, NamedTuple

import torch
import torch.nn as nn

__all__ = ["load_checkpoint", "adapt_state_dict", "inflate_weight", "LoadReport"]

_WRAPPER_KEYS = ("model", "state_dict", "model_state")
_HEAD_PREFIXES = ("head.", "head_cls.", "aux_head.")
# DistributedDataParallel's "module." and the OpenMMLab detectors' / segmentors' "backbone."
_PREFIXES = ("module.", "backbone.")
# modules of the classifiers that the dense backbones lack, and the backbones' own output norms
_CLASSIFIER_PREFIXES = ("head.", "head_cls.", "aux_head.", "norm.", "norm_cls.")
_DENSE_NORM_PREFIXES = ("norm1.", "norm2.", "norm3.", "norm4.")


class LoadReport(NamedTuple):
    missing: list[str]      # model keys the checkpoint did not provide (empty if strict)
    unexpected: list[str]   # checkpoint keys the model does not have (empty if strict)
    inflated: list[str]     # 2D kernels inflated to 3D
    dropped: list[str]      # checkpoint tensors left out on purpose: a head of another class count
                            # (drop_head), a classifier's head and norm loaded into a dense
                            # backbone, a detector's or segmentor's tensors outside "backbone."
    initialised: list[str]  # model tensors that keep their initial values on purpose: the dropped
                            # head's, a dense backbone's norm1..norm4 when loading a classifier


def inflate_weight(weight_2d: torch.Tensor, time_dim: int, mode: str = "repeat") -> torch.Tensor:
    """(O, I, kH, kW) -> (O, I, T, kH, kW). "repeat": copy along time and divide by T, so a static
    clip gives the 2D response; "center": the 2D kernel in the middle frame, zeros elsewhere."""
    if mode == "repeat":
        return weight_2d.unsqueeze(2).repeat(1, 1, time_dim, 1, 1) / time_dim
    if mode == "center":
        weight_3d = weight_2d.new_zeros(weight_2d.shape[:2] + (time_dim,) + weight_2d.shape[2:])
        weight_3d[:, :, time_dim // 2] = weight_2d
        return weight_3d
    raise ValueError(f"inflate: expected 'repeat' or 'center', got {mode!r}")


def _read(path_or_state_dict) -> Mapping[str, torch.Tensor]:
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        try:
            checkpoint = torch.load(path_or_state_dict, map_location="cpu", weights_only=True)
        except Exception as err:  # pickled non-tensor objects are refused by weights_only
            raise ValueError(
                f"path_or_state_dict: could not load {os.fspath(path_or_state_dict)!r} with "
                f"weights_only=True ({type(err).__name__}: {err}). If you trust the file, load it "
                f"yourself with torch.load(path, weights_only=False) and pass the dict.") from err
    elif isinstance(path_or_state_dict, Mapping):
        checkpoint = path_or_state_dict
    else:
        raise TypeError("path_or_state_dict: expected a file path or a state dict, got "
                        f"{type(path_or_state_dict).__name__}")
    # official files hold the weights at the top level or under one of these keys
    while not any(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        wrapper = next((k for k in _WRAPPER_KEYS if isinstance(checkpoint.get(k), Mapping)), None)
        if wrapper is None:
            raise ValueError("path_or_state_dict: found no tensors at the top level nor under "
                             f"{_WRAPPER_KEYS}; top-level keys: {sorted(checkpoint)[:20]}")
        checkpoint = checkpoint[wrapper]
    return {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}


def _strip_prefixes(state: dict, target: Mapping) -> tuple[dict, list[str]]:
    """While no checkpoint key names a model tensor, keep the keys under "module." or "backbone."
    without the prefix (a DDP save, a whole detector or segmentor). Returns the state and the
    keys left out (e.g. ``decode_head.*``, ``neck.*``)."""
    left_out = []
    while state and not any(k in target for k in state):
        prefix = next((p for p in _PREFIXES if any(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        left_out += [k for k in state if not k.startswith(prefix)]
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state, left_out


def _classifier_into_dense(state: dict, target: Mapping) -> tuple[list[str], list[str]]:
    """A classification checkpoint loaded into a dense backbone, as the official segmentation and
    detection code starts from ImageNet weights: the classifier's head and final BatchNorm are
    left out and the backbone's output LayerNorms norm1..norm4 keep their initial values.
    Returns (checkpoint keys left out, model keys initialised); both empty for other pairs."""
    dense_norms = [k for k in target if k.startswith(_DENSE_NORM_PREFIXES)]
    classifier = [k for k in state if k.startswith(_CLASSIFIER_PREFIXES) and k not in target]
    if not dense_norms or not classifier or any(k in state for k in dense_norms):
        return [], []
    return classifier, dense_norms


def _key_hints(missing: list[str], unexpected: list[str]) -> str:
    """Why keys differ, for the cases a user meets: layer scale, a dense checkpoint in a classifier."""
    hints = []
    if any(".gamma_" in k for k in unexpected):
        hints.append("the checkpoint has layer-scale gammas (gamma_1/gamma_2): it is a *_ls model "
                     "(uniformer_base_ls, uniformer_large_ls); build that variant")
    if any(".gamma_" in k for k in missing):
        hints.append("the model has layer-scale gammas and the checkpoint has none: build the "
                     "variant without _ls (e.g. uniformer_base)")
    if any(k.startswith(_DENSE_NORM_PREFIXES) for k in unexpected):
        hints.append("the checkpoint is a dense (segmentation/detection) backbone: build the model "
                     "with features_only=True")
    return "".join(f"\n  hint: {h}" for h in hints)


def load_checkpoint(model: nn.Module, path_or_state_dict, strict: bool = True,
                    inflate: str = "repeat", drop_head: bool | None = None) -> LoadReport:
    """Load official (or our) weights into ``model``.

    Layouts: the tensors at the top level or under ``model`` / ``state_dict`` / ``model_state``,
    with or without the prefixes ``module.`` (DistributedDataParallel) and ``backbone.`` (a whole
    OpenMMLab detector or segmentor, whose other tensors, ``decode_head.*``, ``neck.*``, ..., are
    left out and listed in ``dropped``).

    A classification checkpoint loaded into a dense backbone (``features_only=True``) leaves out
    the classifier's ``head``/``norm`` (``dropped``) and keeps ``norm1``..``norm4`` at their
    initial values (``initialised``), as the official segmentation and detection code does.

    For a 3D model, 2D conv kernels are inflated along time (``inflate="repeat"`` or
    ``"center"``). A ``head``/``head_cls``/``aux_head`` whose class count differs from the
    model's raises a ValueError unless ``drop_head=True``: then those tensors are dropped (they
    keep their initial values) with a warning. ``drop_head=None`` (the default) means True when
    the checkpoint is inflated from 2D into a video model (an ImageNet checkpoint starting a
    Kinetics model), False otherwise.

    With ``strict=True`` any other missing or unexpected key, or a shape that cannot be
    reconciled, raises a ValueError listing them (with a hint for a layer-scale ``*_ls``
    checkpoint in a model without layer scale, and the reverse). Nothing is loaded when it raises.
    head_dim is not visible in a state dict: a checkpoint of another head_dim loads and computes
    garbage, so the variant name (or ``head_dim=``) must match the file.
    """
    state, report = _prepare(model, path_or_state_dict, strict, inflate, drop_head)
    model.load_state_dict(state, strict=False)
    return report


def adapt_state_dict(model: nn.Module, path_or_state_dict, inflate: str = "repeat",
                     drop_head: bool | None = None) -> tuple[dict, LoadReport]:
    """What ``load_checkpoint(model, ..., strict=True)`` would load, as a state dict holding every
    key of ``model`` (the ``initialised`` ones with the model's current values), for loaders that
    call ``model.load_state_dict(strict=True)`` themselves (timm's ``pretrained_filter_fn``)."""
    state, report = _prepare(model, path_or_state_dict, True, inflate, drop_head)
    target = model.state_dict()
    return {**{k: target[k] for k in report.initialised}, **state}, report


def _prepare(model: nn.Module, path_or_state_dict, strict: bool, inflate: str,
             drop_head: bool | None) -> tuple[dict, LoadReport]:
    if inflate not in ("repeat", "center"):
        raise ValueError(f"inflate: expected 'repeat' or 'center', got {inflate!r}")
    if drop_head not in (None, True, False):
        raise TypeError(f"drop_head: expected None, True or False, got {drop_head!r}")
    target = model.state_dict()
    state, outside_backbone = _strip_prefixes(dict(_read(path_or_state_dict)), target)
    classifier_only, dense_norms = _classifier_into_dense(state, target)
    for key in classifier_only:
        del state[key]
    inflated, heads, mismatched = [], [], []
    for key, value in list(state.items()):
        if key not in target or target[key].shape == value.shape:
            continue
        want = target[key].shape
        if key.startswith(_HEAD_PREFIXES) and value.shape[1:] == want[1:]:
            heads.append(f"{key}: checkpoint {value.shape[0]} classes vs model {want[0]}")
        elif value.ndim == 4 and len(want) == 5 and (want[:2] + want[3:]) == value.shape:
            state[key] = inflate_weight(value, want[2], inflate)
            inflated.append(key)
        else:
            mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(want)}")
    if mismatched:
        raise ValueError("path_or_state_dict: shapes differ from the model's and cannot be "
                         "inflated:\n  " + "\n  ".join(mismatched))
    if drop_head is None:
        drop_head = bool(inflated)
    if heads and not drop_head:
        raise ValueError(
            "path_or_state_dict: the classification head's class count differs from the "
            "model's:\n  " + "\n  ".join(heads) + "\npass drop_head=True to keep the model's "
            "freshly initialised head (fine-tuning on a new label set), or build the model with "
            "the checkpoint's num_classes")
    dropped = [entry.split(":")[0] for entry in heads]
    for key in dropped:
        del state[key]
    # check before loading, so a refused checkpoint leaves the model untouched
    initialised = dropped + dense_norms
    missing = [k for k in target if k not in state and k not in initialised]
    unexpected = [k for k in state if k not in target]
    if strict and (missing or unexpected):
        raise ValueError(
            f"path_or_state_dict: keys do not match the model ({type(model).__name__}).\n"
            f"  missing from the checkpoint ({len(missing)}): {missing[:20]}\n"
            f"  unexpected in the checkpoint ({len(unexpected)}): {unexpected[:20]}"
            + _key_hints(missing, unexpected))
    if dropped:
        warnings.warn(f"load_checkpoint: dropped {dropped} (class count differs); the model's "
                      "head keeps its initial values", stacklevel=3)
    return state, LoadReport(missing, unexpected, inflated,
                             dropped + classifier_only + outside_backbone, initialised)
