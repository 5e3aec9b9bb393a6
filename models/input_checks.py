"""The models' input check at the door: type, dtype, rank, channels and size of ``x``, checked
before any work, with a ValueError/TypeError that says what was expected and, for the common
mistakes, how to fix them.

Every model of the family calls :func:`check_input` first in ``forward_features``; ``uk.accelerate``
keeps the models' own ``forward``/``forward_features`` (it converts blocks and stems; the one root
it converts, an official light model's, gets the reference light model's), so an accelerated model
runs this same check and raises the same messages.

The rule on spatial (and temporal) size: the input must be large enough that every stem
convolution fits, i.e. every stage has at least one row, column (and frame); below that
PyTorch's convolution would fail partway through the model (H, W >= 32 with patch stems, 29 for
the light models, 1 for small_plus's conv stems; any T). Sizes not a multiple of the total stride 32
are accepted, because the official models accept them: each strided stem rounds as its
convolution does (UniFormer-S at 500x380: stages 125x95, 62x47, 31x23, 15x11), so the last rows
or columns of such an input may go unseen; window attention pads its stage-3 map to whole
windows and crops the result; the video stem halves T rounding up. Pad H and W to a multiple of
32 to use every pixel. The batch must hold at least one sample (the light models
and window attention fail on an empty one).

Under ``torch.compile`` the check traces without a graph break; a bad input raises the same
error, except with ``fullgraph=True``, where dynamo reports any exception raised inside the
compiled region as its own ``Unsupported`` error.
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["check_input", "stem_convs", "stage_sizes", "minimum_size"]

_VIDEO_MODELS = "a video model (uniformer_small_video, uniformer_base_video)"


def _shape(x: torch.Tensor) -> str:
    return "[" + ", ".join(str(int(d)) for d in x.shape) + "]"


def stem_convs(model: nn.Module) -> list[nn.Module]:
    """The convolutions of the model's stems patch_embed1..4, in the order the input goes
    through them."""
    return [m for i in range(1, 5) for m in getattr(model, f"patch_embed{i}").modules()
            if isinstance(m, (nn.Conv2d, nn.Conv3d))]


def _conv_out(size: int, conv: nn.Module, dim: int) -> int:
    """Output length along spatial dim ``dim`` of ``conv`` for an input of length ``size``;
    below 1 where the (padded) input is shorter than the kernel."""
    k, s, p, d = conv.kernel_size[dim], conv.stride[dim], conv.padding[dim], conv.dilation[dim]
    span = size + 2 * p - d * (k - 1)
    return (span - 1) // s + 1 if span >= 1 else 0


def stage_sizes(convs, size: int, dim: int) -> list[int]:
    """The length along spatial dim ``dim`` (for video 0 is T; then H, W) after each of the stem
    convolutions ``convs``, for an input of length ``size``."""
    sizes = []
    for conv in convs:
        size = _conv_out(size, conv, dim)
        sizes.append(size)
    return sizes


def minimum_size(convs, dim: int) -> int:
    """The smallest input length along spatial dim ``dim`` that every conv in ``convs`` fits."""
    size = 1
    while min(stage_sizes(convs, size, dim)) < 1:
        size += 1
    return size


def _rank_hint(x: torch.Tensor, video: bool, c: int) -> str:
    """Why a tensor of the wrong rank was probably passed, and the fix; '' if no guess."""
    shape = x.shape
    if not video and x.ndim == 3:
        if shape[0] == c:
            return "a single image [C, H, W] needs a batch dimension: x.unsqueeze(0)"
        if shape[-1] == c:
            return ("a single channels-last image [H, W, C] needs channels first and a batch "
                    "dimension: x.permute(2, 0, 1).unsqueeze(0)")
    if not video and x.ndim == 5:
        return (f"this looks like a video clip [B, C, T, H, W]: use {_VIDEO_MODELS}, or run this "
                f"image model on the frames by folding them into the batch: "
                f"x.transpose(1, 2).flatten(0, 1)")
    if video and x.ndim == 4:
        hints = []
        if shape[0] == c:
            hints.append("a single clip [C, T, H, W] needs a batch dimension: x.unsqueeze(0)")
        if shape[1] == c:
            hints.append("an image batch [B, C, H, W] is not a clip: use an image model "
                         "(e.g. uniformer_small), or give each image a time axis of 1 frame: "
                         "x.unsqueeze(2)")
        return "; or ".join(hints)
    if video and x.ndim == 3 and shape[0] == c:
        return "a single image [C, H, W] is not a clip: use an image model (e.g. uniformer_small)"
    return ""


def _channel_hint(x: torch.Tensor, video: bool, c: int) -> str:
    shape = x.shape
    if shape[-1] == c:
        if video:
            return "the clip looks channels-last [B, T, H, W, C]: x.permute(0, 4, 1, 2, 3)"
        return "the image looks channels-last [B, H, W, C]: x.permute(0, 3, 1, 2)"
    if video and shape[2] == c:
        return "the clip looks frames-first [B, T, C, H, W]: x.transpose(1, 2)"
    if shape[1] == 1 and c == 3:
        return "a grayscale input repeated to 3 channels would fit: x.expand(-1, 3, *x.shape[2:])"
    return ""


def check_input(x, model: nn.Module, name: str = "x") -> None:
    """Raise TypeError/ValueError unless ``x`` fits ``model`` (a UniFormer of this family, read
    through its stems patch_embed1..4): a floating-point tensor [B, C, H, W] for an image model
    (2-D stem convs) or [B, C, T, H, W] for a video model (3-D), C the first conv's in_channels,
    batch size at least 1, each size at least :func:`minimum_size` (the rule: module docstring)."""
    convs = stem_convs(model)
    first = convs[0]
    video = isinstance(first, nn.Conv3d)
    c = first.in_channels
    layout = f"[B, {c}, T, H, W]" if video else f"[B, {c}, H, W]"
    what = "a video clip batch" if video else "an image batch"
    if not isinstance(x, torch.Tensor):
        held = " (or a list holding one, as the official video code takes)" if video else ""
        raise TypeError(f"{name}: expected {what} tensor {layout}{held}, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {x.dtype}; convert "
                        f"images with x.float() (and normalise them as the model was trained)")
    rank = 5 if video else 4
    if x.ndim != rank:
        hint = _rank_hint(x, video, c)
        raise ValueError(f"{name}: expected {what} {layout} ({rank}-D), got a {x.ndim}-D tensor "
                         f"of shape {_shape(x)}" + (f"; {hint}" if hint else ""))
    if x.shape[1] != c:
        hint = _channel_hint(x, video, c)
        raise ValueError(f"{name}: expected {c} channels in dim 1 of {layout}, got {x.shape[1]} "
                         f"in shape {_shape(x)}" + (f"; {hint}" if hint else ""))
    if x.shape[0] == 0:  # the light models and window attention cannot reshape an empty batch
        sample = "clip" if video else "image"
        raise ValueError(f"{name}: expected a batch of at least one {sample}, got batch size 0 "
                         f"(shape {_shape(x)})")
    axes = ("T", "H", "W") if video else ("H", "W")
    too_small = [(axis, x.shape[2 + dim], minimum_size(convs, dim))
                 for dim, axis in enumerate(axes)
                 if min(stage_sizes(convs, x.shape[2 + dim], dim)) < 1]
    if too_small:
        need = ", ".join(f"{axis} >= {least} (got {got})" for axis, got, least in too_small)
        raise ValueError(f"{name}: shape {_shape(x)} is too small for this model's stems: it "
                         f"needs {need}, so that every stage keeps at least one position")
