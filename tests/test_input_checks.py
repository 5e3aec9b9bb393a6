"""The models' input check at the door (uniformer_models.input_checks): every model kind, reference
and accelerated, raises a TypeError/ValueError that names ``x`` and gives the fix for each common
mistake, before any stem runs; accelerated models raise the same messages; the size rule is
exactly the sizes the unchecked models fail on; correct inputs, at sizes that are not multiples of
32 too, pass."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn as nn

import uniformer_kernels as uk
import uniformer_models as um
from uniformer_models import input_checks

# kind -> (create_model name, kwargs); one block per stage keeps the models small, the stems are
# the variants' own
KINDS = {
    "image": ("uniformer_small", {}),
    "image_conv_stem": ("uniformer_small_plus", {}),
    "image_token_labeling": ("uniformer_large_ls", {"embed_dim": (64, 64, 128, 128)}),
    "light_xxs": ("uniformer_xxs", {}),
    "light_xs": ("uniformer_xs", {}),
    "video": ("uniformer_small_video", {}),
    "video_split": ("uniformer_small_video", {"split": True}),
    "dense_hybrid": ("uniformer_small", {"features_only": True, "hybrid": True, "window_size": 4}),
    "dense_windows": ("uniformer_small", {"features_only": True, "windows": True,
                                          "window_size": 4}),
    "dense_light": ("uniformer_xxs", {"features_only": True}),
}
VIDEO = {"video", "video_split"}
# a correct input of each kind: sizes not multiples of 32, odd T
GOOD = {kind: (2, 3, 3, 40, 36) if kind in VIDEO else (2, 3, 67, 45) for kind in KINDS}

_models: dict[str, nn.Module] = {}


def model_of(kind: str, accelerated: bool) -> nn.Module:
    key = f"{kind}/{accelerated}"
    if key not in _models:
        name, kwargs = KINDS[kind]
        model = um.create_model(name, num_classes=10, depth=(1, 1, 2, 1), **kwargs).eval()
        _models[key] = uk.accelerate(model) if accelerated else model
    return _models[key]


@contextlib.contextmanager
def stem_calls(model: nn.Module):
    """Yields a list that records each call of the first stem (the model's first work)."""
    calls = []
    handle = model.patch_embed1.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


# mistake -> (input shape for an image model, for a video model, message regex for each); None:
# the mistake does not apply to that kind
MISTAKES = {
    "missing_batch": ((3, 64, 64), (3, 4, 64, 64),
                      r"a single image \[C, H, W\] needs a batch dimension: x\.unsqueeze\(0\)",
                      r"a single clip \[C, T, H, W\] needs a batch dimension: x\.unsqueeze\(0\)"),
    "channels_last": ((2, 64, 64, 3), (2, 4, 64, 64, 3),
                      r"channels-last \[B, H, W, C\]: x\.permute\(0, 3, 1, 2\)",
                      r"channels-last \[B, T, H, W, C\]: x\.permute\(0, 4, 1, 2, 3\)"),
    "single_channels_last_image": ((64, 64, 3), None,
                                   r"channels-last image \[H, W, C\] .*x\.permute\(2, 0, 1\)"
                                   r"\.unsqueeze\(0\)", None),
    "clip_into_image_model": ((2, 3, 4, 64, 64), None,
                              r"looks like a video clip \[B, C, T, H, W\]: use a video model "
                              r".*x\.transpose\(1, 2\)\.flatten\(0, 1\)", None),
    "image_into_video_model": (None, (2, 3, 64, 64), None,
                               r"an image batch \[B, C, H, W\] is not a clip: use an image model"
                               r".*x\.unsqueeze\(2\)"),
    "frames_first_clip": (None, (2, 4, 3, 64, 64), None,
                          r"frames-first \[B, T, C, H, W\]: x\.transpose\(1, 2\)"),
    "grayscale": ((2, 1, 64, 64), (2, 1, 4, 64, 64), r"grayscale .*x\.expand",
                  r"grayscale .*x\.expand"),
    "wrong_channels": ((2, 5, 64, 64), (2, 5, 4, 64, 64),
                       r"expected 3 channels in dim 1 of \[B, 3, H, W\], got 5 "
                       r"in shape \[2, 5, 64, 64\]$",
                       r"expected 3 channels in dim 1 of \[B, 3, T, H, W\], got 5 in shape"),
    "wrong_rank": ((64,), (2, 3, 4, 64, 64, 1), r"expected an image batch \[B, 3, H, W\] \(4-D\), "
                   r"got a 1-D tensor", r"expected a video clip batch \[B, 3, T, H, W\] \(5-D\), "
                   r"got a 6-D tensor"),
    "empty_batch": ((0, 3, 64, 64), (0, 3, 4, 64, 64), r"at least one image, got batch size 0",
                    r"at least one clip, got batch size 0"),
    "too_small": ((2, 3, 20, 64), (2, 3, 4, 64, 20), r"too small .*needs H >= \d+ \(got 20\)",
                  r"too small .*needs W >= \d+ \(got 20\)"),
}


def applies(kind: str, mistake: str) -> bool:
    if mistake == "too_small" and kind == "image_conv_stem":
        return False  # conv stems with padding fit any size
    return MISTAKES[mistake][1 if kind in VIDEO else 0] is not None


CASES = [pytest.param(kind, mistake, accelerated,
                      id=f"{kind}-{mistake}-{'uk' if accelerated else 'ref'}")
         for kind in KINDS for mistake in MISTAKES if applies(kind, mistake)
         for accelerated in (False, True)]


@pytest.mark.parametrize("kind,mistake,accelerated", CASES)
def test_each_mistake_raises_a_value_error_naming_x_with_its_fix_before_any_work(
        kind, mistake, accelerated):
    video = kind in VIDEO
    shape, pattern = MISTAKES[mistake][1 if video else 0], MISTAKES[mistake][3 if video else 2]
    model = model_of(kind, accelerated)
    with stem_calls(model) as calls, pytest.raises(ValueError, match=r"^x: ") as error:
        model(torch.randn(shape))
    assert error.match(pattern)
    assert calls == []
    with stem_calls(model) as calls, torch.no_grad():  # the hook does see a correct input
        model(torch.randn(GOOD[kind]))
    assert calls == [1]


@pytest.mark.parametrize("kind", KINDS)
def test_accelerated_models_raise_the_same_messages(kind):
    video = kind in VIDEO
    for mistake, spec in MISTAKES.items():
        if not applies(kind, mistake):
            continue
        messages = []
        for accelerated in (False, True):
            with pytest.raises((ValueError, TypeError)) as error:
                model_of(kind, accelerated)(torch.randn(spec[1 if video else 0]))
            messages.append(str(error.value))
        assert messages[0] == messages[1], mistake


@pytest.mark.parametrize("accelerated", [False, True], ids=["ref", "uk"])
@pytest.mark.parametrize("kind", KINDS)
def test_wrong_types_raise_a_type_error_naming_x(kind, accelerated):
    model = model_of(kind, accelerated)
    good = torch.randn(GOOD[kind])
    with pytest.raises(TypeError, match=r"^x: expected a floating-point tensor, got torch\.uint8; "
                                        r"convert images with x\.float\(\)"):
        model((good * 50).clamp(0, 255).to(torch.uint8))
    with pytest.raises(TypeError, match=r"^x: expected .* tensor \[B, 3, .*got ndarray"):
        model(good.numpy())
    if kind in VIDEO:  # the official video code takes [clip]; an empty list is no clip
        with pytest.raises(TypeError, match=r"or a list holding one.*got list"):
            model([])


@pytest.mark.parametrize("accelerated", [False, True], ids=["ref", "uk"])
@pytest.mark.parametrize("kind", KINDS)
def test_correct_inputs_pass_at_sizes_not_divisible_by_32(kind, accelerated):
    model = model_of(kind, accelerated)
    x = torch.randn(GOOD[kind])
    with torch.no_grad():
        out = model([x] if kind in VIDEO else x)
        channels_last = model(x.contiguous(memory_format=torch.channels_last_3d
                                           if x.ndim == 5 else torch.channels_last))
    for o, c in zip(out if isinstance(out, list) else [out],
                    channels_last if isinstance(channels_last, list) else [channels_last]):
        assert torch.isfinite(o).all() and o.shape[0] == x.shape[0]
        torch.testing.assert_close(c, o, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_size_rule_is_exactly_where_the_unchecked_model_fails(kind, monkeypatch):
    """At each axis's minimum the model runs without the check; one below, PyTorch fails inside
    the model (so the check raises only where the model would fail anyway)."""
    model = model_of(kind, False)
    convs = input_checks.stem_convs(model)
    video = kind in VIDEO
    good = list(GOOD[kind])
    for dim in range(3 if video else 2):
        least = input_checks.minimum_size(convs, dim)
        shape = list(good)
        shape[2 + dim] = least
        with torch.no_grad():
            model(torch.randn(shape))  # checked: passes
            if least == 1:
                continue
            shape[2 + dim] = least - 1
            with pytest.raises(ValueError, match=r"too small"):
                model(torch.randn(shape))
            for module in ("uniformer", "uniformer_light", "uniformer_video"):
                monkeypatch.setattr(f"uniformer_models.{module}.check_input", lambda x, m: None)
            with pytest.raises(RuntimeError):
                model(torch.randn(shape))
            monkeypatch.undo()


def test_minimum_sizes_of_the_stems():
    """The rule's numbers as documented: 32 for patch stems, 29 for the light models' conv stem
    (two 3x3 stride-2 convs with padding, then three 2x2 stride-2 stems), 1 for small_plus's conv
    stems; any number of frames."""
    def least(kind):
        convs = input_checks.stem_convs(model_of(kind, False))
        return [input_checks.minimum_size(convs, d) for d in range(convs[0].weight.ndim - 2)]
    assert least("image") == [32, 32]
    assert least("light_xxs") == [29, 29]
    assert least("image_conv_stem") == [1, 1]
    assert least("video") == [1, 32, 32]


def test_check_compiles_without_graph_break_and_raises_under_compile():
    """The check traces into a full graph; compiled (not fullgraph: with fullgraph=True dynamo
    turns any exception raised in the compiled region into its own Unsupported error), a bad
    input raises the same ValueError as eager, on a first call and after a recompile."""
    torch._dynamo.reset()
    model = uk.accelerate(um.UniFormer(depth=(1, 1, 1, 1), embed_dim=(16, 32, 64, 64), head_dim=16,
                                       features_only=True, hybrid=True, window_size=2).eval())
    x = torch.randn(GOOD["dense_hybrid"])
    fullgraph = torch.compile(model, fullgraph=True, backend="eager")  # graph breaks are dynamo's
    compiled = torch.compile(model, backend="eager")
    channels_last = x.permute(0, 2, 3, 1).contiguous()
    with torch.no_grad():
        for got, ref in zip(fullgraph(x), model(x)):
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
        with pytest.raises(ValueError) as eager_error:
            model(channels_last)
        for bad in (channels_last, channels_last[:1]):
            with pytest.raises(ValueError) as compiled_error:
                compiled(bad)
            assert str(compiled_error.value) == str(eager_error.value).replace(
                "[2,", f"[{bad.shape[0]},")
