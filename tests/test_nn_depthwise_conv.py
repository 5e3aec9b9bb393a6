"""uk.nn.DepthwiseConv2d/3d: drop-in for nn.Conv2d/3d(groups=C) on op 1. Same constructor,
parameter names and state_dict; forward and gradients against the float64 nn.Conv; what it cannot
compute is refused at construction, naming the argument."""
import pytest
import torch
import torch.nn as nn

import uniformer_kernels as uk
from uniformer_kernels import backends
from uniformer_kernels.testing import assert_rel_close, tolerance

TOL = tolerance(torch.float32, "conv")


@pytest.fixture(autouse=True)
def no_forced_backend(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)


@pytest.mark.parametrize("cls,torch_cls,kernel,shape,fmt", [
    (uk.nn.DepthwiseConv2d, nn.Conv2d, 3, (2, 13, 9, 11), torch.contiguous_format),
    (uk.nn.DepthwiseConv2d, nn.Conv2d, (5, 7), (1, 6, 15, 17), torch.channels_last),
    (uk.nn.DepthwiseConv3d, nn.Conv3d, 5, (1, 5, 5, 6, 7), torch.channels_last_3d),
    (uk.nn.DepthwiseConv3d, nn.Conv3d, (3, 1, 1), (2, 3, 4, 7, 9), torch.contiguous_format),
], ids=["3x3", "5x7-cl", "5x5x5-cl", "3x1x1"])
def test_matches_the_float64_torch_conv(cls, torch_cls, kernel, shape, fmt):
    channels = shape[1]
    k = (kernel,) * (len(shape) - 2) if isinstance(kernel, int) else kernel
    ours = cls(channels, channels, k, padding=tuple(s // 2 for s in k), groups=channels)
    reference = torch_cls(channels, channels, k, padding=tuple(s // 2 for s in k),
                          groups=channels).double()
    reference.load_state_dict(ours.state_dict(), strict=True)
    assert list(ours.state_dict()) == ["weight", "bias"]
    x = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    y, y64 = ours(x), reference(x64)
    assert y.is_contiguous(memory_format=fmt)
    assert_rel_close(y, y64, TOL, name="output")
    g = torch.randn(shape, dtype=torch.float64)
    y.backward(g.float())
    y64.backward(g)
    assert_rel_close(x.grad, x64.grad, TOL, name="d x")
    assert_rel_close(ours.weight.grad, reference.weight.grad, TOL, name="d weight")
    assert_rel_close(ours.bias.grad, reference.bias.grad, TOL, name="d bias")


def test_padding_same_and_no_bias():
    ours = uk.nn.DepthwiseConv2d(4, 4, 3, padding="same", groups=4, bias=False)
    reference = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False).double()
    reference.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 4, 5, 6)
    with torch.no_grad():
        assert_rel_close(ours(x), reference(x.double()), TOL)


def test_from_conv_shares_the_parameters():
    conv = nn.Conv3d(8, 8, (1, 5, 5), padding=(0, 2, 2), groups=8)
    ours = uk.nn.DepthwiseConv3d.from_conv(conv)
    assert ours.weight is conv.weight and ours.bias is conv.bias
    assert type(conv) is nn.Conv3d, "the source module is left as it was"
    x = torch.randn(1, 8, 3, 6, 5)
    with torch.no_grad():
        assert_rel_close(ours(x), conv.double()(x.double()), TOL)


@pytest.mark.parametrize("kwargs,match", [
    (dict(in_channels=4, out_channels=8, kernel_size=3, padding=1, groups=4), "groups must be equal"),
    (dict(in_channels=4, out_channels=4, kernel_size=3, padding=1, groups=1), "groups must be equal"),
    (dict(in_channels=4, out_channels=4, kernel_size=4, padding=2, groups=4), "kernel_size must be odd"),
    (dict(in_channels=4, out_channels=4, kernel_size=9, padding=4, groups=4), "kernel_size must be odd"),
    (dict(in_channels=4, out_channels=4, kernel_size=3, padding=1, groups=4, stride=2), "stride must be 1"),
    (dict(in_channels=4, out_channels=4, kernel_size=3, padding=2, groups=4, dilation=2), "dilation"),
    (dict(in_channels=4, out_channels=4, kernel_size=3, padding=0, groups=4), "padding must be"),
    (dict(in_channels=4, out_channels=4, kernel_size=3, padding=1, groups=4,
          padding_mode="reflect"), "padding_mode"),
], ids=["channels", "groups", "even", "too-big", "stride", "dilation", "padding", "padding-mode"])
def test_what_op_1_does_not_compute_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=f"DepthwiseConv2d: .*{match}"):
        uk.nn.DepthwiseConv2d(**kwargs)


def test_from_conv_rejects_other_modules():
    with pytest.raises(TypeError, match="expected an nn.Conv2d, got Conv3d"):
        uk.nn.DepthwiseConv2d.from_conv(nn.Conv3d(4, 4, 3, padding=1, groups=4))
    with pytest.raises(ValueError, match="stride must be 1"):
        uk.nn.DepthwiseConv2d.from_conv(nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4))
