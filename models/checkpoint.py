"""Loading official checkpoints: unwrap, inflate 2D kernels to 3D for video, drop a mismatched head."""
from __future__ import annotations

import os
import warnings
from typing import Mapping, NamedTuple

import torch
import torch.nn as nn

__all__ = ["load_checkpoint", "inflate_weight", "LoadReport"]

_WRAPPER_KEYS = ("model", "state_dict", "model_state")
_HEAD_PREFIXES = ("head.", "head_cls.", "aux_head.")


class LoadReport(NamedTuple):
    missing: list[str]      # model keys the checkpoint did not provide (only heads it dropped, if strict)
    unexpected: list[str]   # checkpoint keys the model does not have (empty if strict)
    inflated: list[str]     # 2D kernels inflated to 3D
    dropped: list[str]      # head tensors dropped (drop_head) because the class count differs


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
    state = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if state and all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_checkpoint(model: nn.Module, path_or_state_dict, strict: bool = True,
                    inflate: str = "repeat", drop_head: bool | None = None) -> LoadReport:
    """Load official (or our) weights into ``model``.

    Unwraps ``model`` / ``state_dict`` / ``model_state``; for a 3D model inflates 2D conv kernels
    along time (``inflate="repeat"`` or ``"center"``). A ``head``/``head_cls``/``aux_head`` whose
    class count differs from the model's raises a ValueError unless ``drop_head=True``: then those
    tensors are dropped (they keep their initial values) with a warning, and the report lists them.
    ``drop_head=None`` (the default) means True when the checkpoint is inflated from 2D into a
    video model (an ImageNet checkpoint starting a Kinetics model), False otherwise. With
    ``strict=True`` any other missing or unexpected key, or a shape that cannot be reconciled,
    raises a ValueError listing them. Nothing is loaded when it raises.
    """
    if inflate not in ("repeat", "center"):
        raise ValueError(f"inflate: expected 'repeat' or 'center', got {inflate!r}")
    if drop_head not in (None, True, False):
        raise TypeError(f"drop_head: expected None, True or False, got {drop_head!r}")
    state = dict(_read(path_or_state_dict))
    target = model.state_dict()
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
    missing = [k for k in target if k not in state and k not in dropped]
    unexpected = [k for k in state if k not in target]
    if strict and (missing or unexpected):
        raise ValueError(
            f"path_or_state_dict: keys do not match the model ({type(model).__name__}).\n"
            f"  missing from the checkpoint ({len(missing)}): {missing[:20]}\n"
            f"  unexpected in the checkpoint ({len(unexpected)}): {unexpected[:20]}")
    if dropped:
        warnings.warn(f"load_checkpoint: dropped {dropped} (class count differs); the model's "
                      "head keeps its initial values", stacklevel=2)
    model.load_state_dict(state, strict=False)
    return LoadReport(missing, unexpected, inflated, dropped)
