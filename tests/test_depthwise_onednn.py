"""The cpu backend's choice between our depthwise forward kernel and PyTorch's conv (oneDNN):
the rule (ops/_depthwise_common.py: forward_on_onednn) picks what the measurements say, each path
runs where it is chosen and forced, both keep the op's contract against float64 (output, layout,
dtype, residual, every gradient), and the choice survives tracing and poisoned memory."""
import textwrap

import pytest
import torch

import uniformer_kernels as uk
from uniformer_kernels import _extension
from uniformer_kernels.ops import _depthwise_common as common
from uniformer_kernels.testing import run_with_poisoned_malloc

from test_depthwise import channels_last, check_depthwise, make_inputs

pytestmark = pytest.mark.skipif(not _extension.loaded(), reason="uniformer_kernels._C not built")

KERNEL_OP = "uniformer_kernels_C::depthwise_conv_cpu"


def nchw(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype)


def cl(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype).contiguous(memory_format=channels_last(len(shape)))


K2, K3 = (3, 3), (3, 3, 3)


@pytest.mark.parametrize("x,kernel,residual,expected", [
    (nchw(1, 64, 56, 56), K2, False, True),  # S/XXS stage 1-2, dense XXS: NCHW 2-D float32, large
    (nchw(1, 128, 28, 28), (5, 5), True, True),
    (nchw(1, 56, 128, 128), K2, True, True),
    (nchw(8, 512, 7, 7), K2, False, True),  # the batch counts: the relayouts copy all of it
    (nchw(1, common.ONEDNN_MIN_NUMEL, 1, 1), K2, False, True),
    (nchw(1, common.ONEDNN_MIN_NUMEL - 1, 1, 1), K2, False, False),
    (nchw(1, 320, 14, 14), K2, False, False),  # small maps: ours, relayouts included, was faster
    (nchw(1, 512, 7, 7), K2, True, False),
    (cl(1, 64, 56, 56), (5, 5), False, False),  # channels-last: no relayout, ours everywhere
    (cl(1, 56, 128, 128), K2, False, False),
    (torch.empty(1, 64, 112, 56)[:, :, ::2], K2, False, True),  # strided NCHW view: relayouts too
    (nchw(1, 64, 4, 56, 56), (5, 5, 5), False, False),  # 3-D below 512 channels: ours, any layout
    (cl(1, 320, 4, 14, 14), K3, False, False),
    (cl(1, 512, 4, 7, 7), K3, False, True),  # 3-D from 512 channels: oneDNN, either layout...
    (nchw(1, 512, 2, 3, 3), (1, 5, 5), True, True),
    (cl(1, 512, 4, 7, 7), K3, True, False),  # ...but for 3x3x3 with our fused residual
    (nchw(1, 64, 56, 56, dtype=torch.float64), K2, False, False),  # PyTorch's float64 conv is no
    (cl(1, 512, 4, 7, 7, dtype=torch.float64), K3, False, False),  # oneDNN,
    (nchw(1, 64, 56, 56, dtype=torch.bfloat16), K2, False, False),  # nor without AVX-512 bfloat16
], ids=lambda v: "x".join(map(str, v.shape)) + f"-{v.dtype}-{common.memory_format_of(v)}"
    if isinstance(v, torch.Tensor) else str(v))
def test_rule_picks_what_was_measured_faster(x, kernel, residual, expected):
    assert common.forward_on_onednn(x, kernel, residual) is expected


def test_forcing_overrides_the_rule_and_nests():
    def on_onednn(x):
        return common.forward_on_onednn(x, K2, False)

    large, small = nchw(1, 64, 56, 56), cl(1, 8, 5, 5)
    with common.cpu_onednn(True):
        assert on_onednn(small)
        with common.cpu_onednn(False):
            assert not on_onednn(large)
            with common.cpu_onednn(None):
                assert on_onednn(large) and not on_onednn(small)
        assert on_onednn(small)
    assert on_onednn(large) and not on_onednn(small)
    with pytest.raises(TypeError, match="use"):
        with common.cpu_onednn(1):
            pass


def ops_run(fn):
    """Names of the operators ``fn`` ran (profiler events)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {event.name for event in prof.events()}


@pytest.mark.parametrize("direct", [True, False], ids=["direct-call", "through-the-op"])
def test_each_path_runs_where_chosen(direct):
    """Each path runs where the rule sends it, with or without the custom op's dispatch (a
    gradient to record sends the call through it); the backward stays ours."""
    for shape, kernel, fmt, residual, expected in (
            ((1, 64, 56, 56), (3, 3), None, True, "oneDNN"),
            ((1, 64, 56, 56), (3, 3), torch.channels_last, True, "ours"),
            ((1, 512, 2, 7, 7), (3, 3, 3), None, False, "oneDNN"),
            ((1, 512, 2, 7, 7), (3, 3, 3), None, True, "ours")):
        x, weight, _ = make_inputs(shape[0], shape[1], shape[2:], kernel, memory_format=fmt)
        weight.requires_grad_(not direct)
        with uk.backend("cpu"):
            names = ops_run(lambda: uk.ops.depthwise_conv(x, weight, None, residual=residual))
        ran = "ours" if KERNEL_OP in names else "oneDNN" if "aten::convolution" in names else None
        assert ran == expected, (shape, residual, sorted(names))
        if not direct:
            with uk.backend("cpu"):
                y = uk.ops.depthwise_conv(x, weight, None, residual=residual)
                names = ops_run(lambda: y.sum().backward())
            assert "uniformer_kernels_C::depthwise_conv_backward_cpu" in names, sorted(names)


# Odd sizes on both paths (forced), the model shape the rule sends to oneDNN, both layouts.
PARITY_CASES = [
    ((2, 37, 9, 13), (3, 3), None), ((1, 19, 15, 17), (7, 7), None), ((2, 13, 7, 9), (5, 5), "cl"),
    ((1, 64, 56, 56), (5, 5), None), ((1, 11, 3, 5, 7), (3, 3, 3), None),
    ((1, 512, 3, 5, 7), (5, 5, 5), "cl"),
]


@pytest.mark.parametrize("use_onednn", [True, False], ids=["oneDNN", "ours"])
@pytest.mark.parametrize("shape,kernel,fmt", PARITY_CASES, ids=lambda v: "x".join(map(str, v))
                         if isinstance(v, tuple) else str(v))
def test_forced_paths_match_float64(use_onednn, shape, kernel, fmt):
    memory_format = channels_last(len(shape)) if fmt == "cl" else None
    x, weight, bias = make_inputs(shape[0], shape[1], shape[2:], kernel,
                                  memory_format=memory_format)
    with common.cpu_onednn(use_onednn):
        with uk.backend("cpu"):
            names = ops_run(lambda: uk.ops.depthwise_conv(x, weight, bias, residual=True))
        assert (KERNEL_OP not in names) is use_onednn, sorted(names)
        check_depthwise("cpu", x, weight, bias, residual=True)
        check_depthwise("cpu", x, weight, None, residual=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=str)
def test_forced_onednn_keeps_the_dtype_contract(dtype):
    x, weight, bias = make_inputs(2, 9, (7, 11), (3, 3), dtype=dtype)
    with common.cpu_onednn(True):
        check_depthwise("cpu", x, weight, bias, residual=True)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")
def test_jit_trace_records_the_op_on_the_onednn_path():
    x, weight, bias = make_inputs(1, 64, (56, 56), (3, 3))
    assert common.forward_on_onednn(x, K2, True)
    with uk.backend("cpu"):
        traced = torch.jit.trace(lambda x, w, b: uk.ops.depthwise_conv(x, w, b, residual=True),
                                 (x, weight, bias))
        graph = str(traced.graph)
        assert "uniformer_kernels::depthwise_conv" in graph and "aten::conv" not in graph, graph
        y = traced(x, weight, bias)
    with common.cpu_onednn(False), uk.backend("cpu"):
        want = uk.ops.depthwise_conv(x, weight, bias, residual=True)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


def test_onednn_path_under_poisoned_memory():
    """As test_depthwise's poisoning test, on the path the rule sends large NCHW maps to: every
    allocation starts as 0x7f bytes (3.4e38 in float32), so an unwritten element fails."""
    script = textwrap.dedent("""
        import torch
        import torch.nn.functional as F
        import uniformer_kernels as uk
        from uniformer_kernels.ops import _depthwise_common as common
        from uniformer_kernels.testing import assert_rel_close
        assert (torch.empty(4096).view(torch.int32) == 0x7f7f7f7f).all(), "poison not active"
        torch.manual_seed(0)
        for shape, k in (((1, 64, 56, 56), 3), ((2, 37, 9, 13), 5)):
            x = torch.randn(shape)
            w, b = torch.randn(shape[1], 1, k, k), torch.randn(shape[1])
            with uk.backend("cpu"), common.cpu_onednn(True):
                for residual in (False, True):
                    y = uk.ops.depthwise_conv(x, w, b, residual=residual)
                    ref = F.conv2d(x.double(), w.double(), b.double(), padding=k // 2,
                                   groups=shape[1]) + (x.double() if residual else 0)
                    assert_rel_close(y, ref, 1e-5, f"{shape} residual={residual}")
        print("checked")
    """)
    run_with_poisoned_malloc(script, timeout=300)
