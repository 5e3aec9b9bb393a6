"""Eager inference calls the ops' implementations directly (ops/_direct_call.py); everything else
goes through the torch.library custom ops. Both paths must agree bit for bit."""
import importlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import uniformer_kernels as uk

# the submodules (uniformer_kernels.ops re-exports functions under the same names)
attention_module = importlib.import_module("uniformer_kernels.ops.attention")
depthwise_module = importlib.import_module("uniformer_kernels.ops.depthwise")
pos_embed_norm_module = importlib.import_module("uniformer_kernels.ops.pos_embed_norm")


def _depthwise_args():
    """x, and weight and bias as a module holds them: Parameters that require a gradient."""
    x = torch.randn(2, 6, 7, 9).contiguous(memory_format=torch.channels_last)
    return x, torch.nn.Parameter(torch.randn(6, 1, 3, 3)), torch.nn.Parameter(torch.randn(6))


def _calls():
    """(module, custom op attribute, call) for each op with a direct path."""
    x, weight, bias = _depthwise_args()
    qkv = torch.randn(2, 7, 3 * 8)
    return [
        (depthwise_module, "_depthwise_conv",
         lambda grad: uk.ops.depthwise_conv(x.requires_grad_(grad), weight, bias, residual=True)),
        (pos_embed_norm_module, "_pos_embed_norm",
         lambda grad: uk.ops.pos_embed_norm(x.requires_grad_(grad), weight, bias, torch.ones(6),
                                            torch.zeros(6))[1]),
        (attention_module, "_attention",
         lambda grad: uk.ops.attention(qkv.requires_grad_(grad), 2)),
    ]


def _refuse(*args, **kwargs):
    raise AssertionError("the custom op was dispatched")


@pytest.mark.parametrize("index", range(3), ids=["depthwise_conv", "pos_embed_norm", "attention"])
def test_inference_skips_the_custom_op_and_autograd_does_not(index, monkeypatch):
    module, name, call = _calls()[index]
    with torch.no_grad():
        direct = call(False)
    through_op = call(True).detach()
    assert torch.equal(direct, through_op)

    monkeypatch.setattr(module, name, _refuse)
    with torch.no_grad():
        call(False)  # direct: never touches the (now refusing) custom op
    with pytest.raises(AssertionError, match="dispatched"):
        call(True)


class _LoggingTensor(torch.Tensor):
    """A subclass that could intercept calls (it inherits __torch_function__)."""


def test_which_calls_may_skip_the_dispatch():
    from uniformer_kernels.ops._direct_call import may_skip_dispatch
    plain, weight = torch.randn(3), torch.nn.Parameter(torch.randn(3))
    assert may_skip_dispatch(plain, None)
    assert not may_skip_dispatch(plain, weight)  # the weight needs a gradient
    with torch.no_grad():
        assert may_skip_dispatch(plain, weight)  # eval: a module's Parameters are plain tensors
        assert not may_skip_dispatch(plain.as_subclass(_LoggingTensor))
    with torch.inference_mode():
        assert may_skip_dispatch(plain, weight)


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_dispatch_modes_see_the_custom_op():
    x, weight, bias = _depthwise_args()
    with torch.no_grad(), _OpLog() as log:
        uk.ops.depthwise_conv(x, weight, bias)
    assert any("uniformer_kernels.depthwise_conv" in name for name in log.names), log.names
