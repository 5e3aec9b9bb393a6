"""Mixed precision: the ops and every drop-in module under ``torch.autocast`` return the dtypes the
PyTorch modules they replace return there (nn.Conv2d/3d, the reference blocks), within the 16-bit
contract of DESIGN.md against float64. CPU bfloat16 here; CUDA float16 and bfloat16 marked ``gpu``.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import uniformer_models as um
import uniformer_kernels as uk
from uniformer_kernels import backends
from uniformer_kernels.convert import accelerate
from uniformer_kernels.testing import assert_rel_close, gpu_marks, randomize_state_, tolerance

CASES = [pytest.param("cpu", torch.bfloat16, id="cpu-bf16")] + [
    pytest.param("cuda", dtype, marks=gpu_marks(), id=f"cuda-{str(dtype)[6:]}")
    for dtype in (torch.float16, torch.bfloat16)]


@pytest.fixture(autouse=True)
def no_forced_backend(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)


def tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in tensors(o)]
    return []


def to64(value):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.detach().double()
    if isinstance(value, (list, tuple)):
        return type(value)(to64(v) for v in value)
    return value


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("input_dtype", ["float32", "autocast"])
def test_depthwise_conv_module_follows_autocast_like_nn_conv(dims, input_dtype, device, dtype):
    """The issue's case: float32 parameters, input in float32 or already 16-bit."""
    channels, k = 24, 3 if dims == 2 else 5
    cls, torch_cls = ((uk.nn.DepthwiseConv2d, nn.Conv2d) if dims == 2 else
                      (uk.nn.DepthwiseConv3d, nn.Conv3d))
    conv = torch_cls(channels, channels, k, padding=k // 2, groups=channels).to(device)
    fast = cls.from_conv(copy.deepcopy(conv))
    shape = (2, channels, 13, 11) if dims == 2 else (2, channels, 5, 9, 7)
    x = torch.randn(shape, device=device)
    x = x if input_dtype == "float32" else x.to(dtype)
    grads = {}
    for label, module in (("fast", fast), ("torch", conv)):
        xi = x.clone().requires_grad_(True)
        with torch.autocast(device, dtype=dtype):
            y = module(xi)
        grads[label] = y
        y.double().sin().sum().backward()
        grads[label] = (y, xi.grad, module.weight.grad, module.bias.grad)
    exact_conv = copy.deepcopy(conv).double()
    x64 = x.double().requires_grad_(True)
    y64 = exact_conv(x64)
    y64.sin().sum().backward()
    exact = (y64, x64.grad, exact_conv.weight.grad, exact_conv.bias.grad)
    tol = tolerance(dtype, "conv")
    for name, got, ref, theirs in zip(("y", "dx", "dw", "db"), grads["fast"], exact, grads["torch"]):
        assert got.dtype == theirs.dtype, name
        assert_rel_close(got, ref, tol, name=name)


@pytest.mark.parametrize("device,dtype", CASES)
def test_ops_take_autocast_dtypes(device, dtype):
    """depthwise_conv as F.conv2d (and ``x + conv(x)`` with residual: float32 x stays float32),
    pos_embed_norm as ``x + conv(x)`` with float32 norm parameters, attention as PyTorch's."""
    channels = 16
    x = torch.randn(2, channels, 9, 7, device=device)
    w = torch.randn(channels, 1, 3, 3, device=device) / 3
    b, nw, nb = (torch.randn(channels, device=device) for _ in range(3))
    tol = tolerance(dtype, "conv")
    ref = torch.nn.functional.conv2d(x.double(), w.double(), b.double(), padding=1, groups=channels)
    with torch.autocast(device, dtype=dtype):
        y = uk.ops.depthwise_conv(x, w, b)
        y_res = uk.ops.depthwise_conv(x, w, b, residual=True)
        y_res16 = uk.ops.depthwise_conv(x.to(dtype), w, b, residual=True)
        p, z = uk.ops.pos_embed_norm(x.to(dtype), w, b, nw, nb)
        qkv = torch.randn(2, 11, 3 * channels, device=device)
        out = uk.ops.attention(qkv, 2)
    assert (y.dtype, y_res.dtype, y_res16.dtype, p.dtype, z.dtype, out.dtype) == (
        dtype, torch.float32, dtype, dtype, dtype, dtype)
    assert_rel_close(y, ref, tol)
    assert_rel_close(y_res, ref + x.double(), tolerance(torch.float32, "conv"))
    assert_rel_close(y_res16, ref + x.to(dtype).double(), tol)
    q, k, v = qkv.double().view(2, 11, 3, 2, 8).permute(2, 0, 3, 1, 4)
    expected = torch.softmax(q @ k.transpose(-1, -2) * 8 ** -0.5, -1) @ v
    assert_rel_close(out, expected.transpose(1, 2).reshape(2, 11, channels),
                     tolerance(dtype, "attention"))


def tiny(kind: str) -> tuple[nn.Module, torch.Tensor]:
    """One block per stage, every kind of drop-in module between them."""
    widths = dict(embed_dim=(16, 32, 64, 64), head_dim=16, num_classes=10)
    if kind == "image":
        model, shape = um.UniFormer(depth=(1, 1, 1, 1), **widths), (2, 3, 64, 48)
    elif kind == "dense_hybrid":
        model = um.UniFormer(depth=(1, 1, 2, 1), features_only=True, hybrid=True, window_size=2,
                             **widths)
        shape = (2, 3, 80, 48)
    elif kind == "video_split":
        model, shape = um.UniFormerVideo(depth=(1, 1, 1, 1), split=True, **widths), (2, 3, 4, 64, 48)
    else:
        model, shape = um.UniFormerLight(depth=(1, 1, 2, 1), **widths), (2, 3, 64, 64)
    return randomize_state_(model), torch.randn(shape, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("kind", ["image", "dense_hybrid", "video_split", "light"])
def test_every_drop_in_module_follows_autocast(kind, mode, device, dtype):
    """Each converted module (blocks, stems, MLPs) gets the input its reference got in a float32
    forward and the same input in the autocast dtype; under autocast it must return the
    reference module's dtypes, and values within the 16-bit contract of the float64 module."""
    model, x = tiny(kind)
    model = model.to(device).train(mode == "train")
    inputs = {}

    def record(name):
        def hook(module, args, kwargs):
            inputs.setdefault(name, (args, kwargs))  # the first call's (returns None: no change)
        return hook

    hooks = [m.register_forward_pre_hook(record(name), with_kwargs=True)
             for name, m in model.named_modules()]
    with torch.no_grad():
        model(x.to(device))
    for h in hooks:
        h.remove()
    fast = accelerate(copy.deepcopy(model))
    converted = {name: m for name, m in fast.named_modules()
                 if isinstance(m, uk.nn.MODULES) and name in inputs}
    assert {type(m) for m in converted.values()} >= {uk.nn.PatchEmbed} | (
        {uk.nn.SplitSABlock} if kind == "video_split" else {uk.nn.EvoSABlock} if kind == "light"
        else {uk.nn.SABlock_Windows} if kind == "dense_hybrid" else {uk.nn.CBlock, uk.nn.SABlock})
    tol = tolerance(dtype, "model")
    for name, module in converted.items():
        reference = model.get_submodule(name)
        args, kwargs = inputs[name]
        exact = tensors(copy.deepcopy(reference).double()(*to64(args), **to64(kwargs)))
        for cast in (False, True):
            a = tuple(t.to(dtype) if cast and isinstance(t, torch.Tensor) and t.is_floating_point()
                      else t for t in args)
            with torch.no_grad(), torch.autocast(device, dtype=dtype):
                got, theirs = tensors(module(*a, **kwargs)), tensors(reference(*a, **kwargs))
            assert [t.dtype for t in got] == [t.dtype for t in theirs], (name, cast)
            for i, (out, ref) in enumerate(zip(got, exact)):
                if out.is_floating_point():
                    assert_rel_close(out, ref, tol, name=f"{name} output {i} (input cast {cast})")


def test_compiled_depthwise_conv_follows_autocast():
    """Dynamo traces the autocast casts (aot_eager: no C++ inductor build on the CPU here)."""
    torch._dynamo.reset()
    conv = uk.nn.DepthwiseConv2d(16, 16, 3, padding=1, groups=16)
    x = torch.randn(2, 16, 9, 7)
    compiled = torch.compile(conv, fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, expected = compiled(x), conv(x)
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
