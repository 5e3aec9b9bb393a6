"""Op 4, attention, on every backend this machine runs (eager; cpu, the C++ kernel and, for windows
and 16-bit inputs, PyTorch's CPU flash kernel, at real UniFormer sizes; Triton compiled on a GPU at
the same sizes, else in its interpreter on small shapes) against float64 references taken
from the reference modules themselves: forward, the qkv gradient and the qkv-bias gradient of
global attention (Attention), the class-token row (EvoSABlock), windows with the reference padding
(SABlock_Windows) and split video attention (SplitSABlock); layouts, poisoned buffers,
torch.library registration, torch.compile, bad input."""
from __future__ import annotations

import contextlib
import importlib
import platform
import sys
import textwrap
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn as nn

import uniformer_kernels as uk
from uniformer_kernels import _extension, backends
from uniformer_kernels.ops.attention import attention
from uniformer_kernels.ops import _device_guard
from uniformer_kernels.testing import (assert_rel_close, gpu_marks, randomize_state_,
                                       run_with_poisoned_malloc, tolerance, triton_marks,
                                       triton_test_device)
from uniformer_models.blocks import SABlock_Windows, SplitSABlock, window_partition, window_reverse
from uniformer_models.layers import Attention
from uniformer_models.uniformer_light import EvoSABlock

# the module, not the function uniformer_kernels.ops.attention that the package exports
attention_op = importlib.import_module("uniformer_kernels.ops.attention")


TRITON_DEVICE = triton_test_device()[0]  # "cuda" (compiled), "cpu" (interpreter) or None
# The interpreter takes seconds per call: there the Triton cases are fewer and smaller.
INTERPRETED = TRITON_DEVICE == "cpu"

MARKS = {
    "eager": [],
    "cpu": [pytest.mark.skipif(not _extension.loaded(), reason="uniformer_kernels._C not built")],
    "triton": triton_marks(),
}
BACKENDS = [pytest.param(name, marks=marks) for name, marks in MARKS.items()]


def device_of(backend: str) -> str:
    """Where ``backend``'s tests put their tensors (the references stay on the CPU)."""
    return TRITON_DEVICE if backend == "triton" else "cpu"


def small(backend: str) -> bool:
    """Whether ``backend`` gets the interpreter's small shapes."""
    return backend == "triton" and INTERPRETED


@pytest.fixture(autouse=True)
def no_forced_backend(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)


def fresh_seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()).item())


# ---- float64 references from the reference modules ----------------------------------------------

class Tap:
    """Hooks on a reference ``Attention``: its qkv Linear's output is rounded to ``dtype`` (so the
    float64 reference computes on exactly the op's input) and kept, with proj's input (the
    attention output) and the class-attention row when the module returns one."""

    def __init__(self, attn: Attention, dtype: torch.dtype):
        self.dtype = dtype
        self.qkv = self.out = self.cls = None
        attn.qkv.register_forward_hook(self._on_qkv)
        attn.proj.register_forward_pre_hook(self._on_proj)
        attn.register_forward_hook(self._on_attention)

    def _on_qkv(self, module, args, out):
        self.qkv = out.to(self.dtype).to(out.dtype)
        return self.qkv

    def _on_proj(self, module, args):
        self.out = args[0]

    def _on_attention(self, module, args, out):
        if isinstance(out, tuple):
            self.cls = out[1]


@dataclass
class Case:
    """One op call and its float64 reference."""
    qkv: torch.Tensor          # the qkv buffer, in the test dtype
    num_heads: int
    kwargs: dict               # the op's keyword arguments (qkv_bias in the test dtype)
    view: Callable             # buffer -> what the op is given (split attention's strided views)
    ref_out: torch.Tensor      # float64, the op output's shape
    ref_cls: torch.Tensor | None
    ref_grads: Callable        # (grad_out, grad_cls) -> (grad of the buffer, grad of qkv_bias)


def reference_module(module: nn.Module) -> nn.Module:
    return randomize_state_(module, seed=fresh_seed()).double()


def tap_grads(tap: Tap, grad_out, grad_cls=None, out=None, qkv=None):
    """Gradient of the tapped qkv for upstream gradients of the tapped output (and class row)."""
    outputs, grads = [tap.out if out is None else out], [grad_out]
    if grad_cls is not None:
        outputs.append(tap.cls)
        grads.append(grad_cls)
    return torch.autograd.grad(outputs, [tap.qkv if qkv is None else qkv], grads,
                               retain_graph=True)[0]


def global_case(batch, tokens, num_heads, head_dim, dtype) -> Case:
    """SABlock's attention: Attention(C, heads, qkv_bias=True) on (B, N, C) tokens."""
    channels = num_heads * head_dim
    attn = reference_module(Attention(channels, num_heads, qkv_bias=True))
    tap = Tap(attn, dtype)
    attn(torch.randn(batch, tokens, channels, dtype=torch.float64))
    return Case(tap.qkv.detach().to(dtype), num_heads, dict(scale=attn.scale), lambda t: t,
                tap.out.detach(), None, lambda g, _: (tap_grads(tap, g), None))


def evo_case(batch, grid, num_heads, head_dim, prune_ratio, dtype) -> Case:
    """EvoSABlock's attention over [cls, tokens] (pruned to [cls, kept, representative] when
    prune_ratio < 1), returning the class-attention row."""
    channels, (height, width) = num_heads * head_dim, grid
    block = reference_module(EvoSABlock(channels, num_heads, qkv_bias=True,
                                        prune_ratio=prune_ratio, trade_off=0.5))
    tap = Tap(block.attn, dtype)
    tokens = height * width
    scores = None if prune_ratio == 1 else torch.rand(batch, tokens, dtype=torch.float64) + 0.1
    block(torch.randn(batch, 1, channels, dtype=torch.float64),
          torch.randn(batch, channels, height, width, dtype=torch.float64), scores,
          torch.arange(tokens).expand(batch, -1))
    return Case(tap.qkv.detach().to(dtype), num_heads,
                dict(scale=block.attn.scale, return_cls_attn=True), lambda t: t, tap.out.detach(),
                tap.cls.detach(), lambda g, g_cls: (tap_grads(tap, g, g_cls), None))


def window_case(batch, grid, window_size, num_heads, head_dim, dtype, qkv_bias=True) -> Case:
    """SABlock_Windows' attention: the module pads the normed grid, applies the qkv Linear to the
    windows and crops; the op gets the unpadded qkv and the bias."""
    channels, (height, width), ws = num_heads * head_dim, grid, window_size
    block = reference_module(SABlock_Windows(channels, num_heads, window_size=ws,
                                             qkv_bias=qkv_bias))
    if qkv_bias:  # a bias of the size of the activations makes the padding tokens count
        nn.init.normal_(block.attn.qkv.bias)
    tap = Tap(block.attn, dtype)
    block(torch.randn(batch, channels, height, width, dtype=torch.float64))
    padded_h, padded_w = -(-height // ws) * ws, -(-width // ws) * ws
    padding = torch.ones(padded_h, padded_w, dtype=torch.bool)
    padding[:height, :width] = False

    def to_grid(windows):  # the reference's window_reverse, to the padded grid
        return window_reverse(windows.view(-1, ws, ws, windows.shape[-1]), ws, padded_h, padded_w)

    def crop(grid_tensor):
        return grid_tensor[:, :height, :width].reshape(batch, height * width, -1)

    def ref_grads(grad_out, _):
        grad_grid = grad_out.new_zeros(batch, padded_h, padded_w, channels)
        grad_grid[:, :height, :width] = grad_out.view(batch, height, width, channels)
        grad_windows = window_partition(grad_grid, ws).view(-1, ws * ws, channels)
        grad_qkv = to_grid(tap_grads(tap, grad_windows))
        return crop(grad_qkv), (grad_qkv[:, padding].sum((0, 1)) if qkv_bias else None)

    bias = block.attn.qkv.bias.detach().to(dtype) if qkv_bias else None
    return Case(crop(to_grid(tap.qkv.detach())).to(dtype), num_heads,
                dict(scale=block.attn.scale, window_size=ws, grid_size=(height, width),
                     qkv_bias=bias),
                lambda t: t, crop(to_grid(tap.out.detach())), None, ref_grads)


def split_case(batch, frames, grid, num_heads, head_dim, dtype, temporal: bool) -> Case:
    """SplitSABlock's temporal (t_attn, over T per position) or spatial (attn, over H*W per frame)
    attention. The op reads both from a (B, T*H*W, 3C) buffer through strided views; the module
    copies its tokens into (B*H*W, T) and (B*T, H*W) sequences."""
    channels, (height, width) = num_heads * head_dim, grid
    block = reference_module(SplitSABlock(channels, num_heads, qkv_bias=True))
    tap = Tap(block.t_attn if temporal else block.attn, dtype)
    block(torch.randn(batch, channels, frames, height, width, dtype=torch.float64))
    positions, packed = height * width, 3 * channels
    if temporal:
        def to_buffer(t):  # (B*HW, T, X) -> (B, T*HW, X)
            t = t.view(batch, positions, frames, t.shape[-1]).transpose(1, 2)
            return t.reshape(batch, frames * positions, -1)

        def view(buffer):
            return buffer.view(batch, frames, positions, packed).transpose(1, 2)

        ref_out = tap.out.detach().view(batch, positions, frames, channels)
    else:
        def to_buffer(t):  # (B*T, HW, X) -> (B, T*HW, X)
            return t.reshape(batch, -1, t.shape[-1])

        def view(buffer):
            return buffer.view(batch, frames, positions, packed)

        ref_out = tap.out.detach().view(batch, frames, positions, channels)
    return Case(to_buffer(tap.qkv.detach()).to(dtype), num_heads, dict(scale=block.attn.scale),
                view, ref_out, None,
                lambda g, _: (to_buffer(tap_grads(tap, g.reshape(tap.out.shape))), None))


def run_op(case: Case, backend: str, buffer: torch.Tensor | None = None):
    """The op on ``backend``, forward then backward with random upstream gradients; returns
    (out, cls_attn, grad_out, grad_cls, grad of the buffer, grad of qkv_bias)."""
    if buffer is None:
        buffer = case.qkv.detach().to(device_of(backend)).requires_grad_()
    kwargs = dict(case.kwargs)
    bias = kwargs.get("qkv_bias")
    if bias is not None:
        bias = kwargs["qkv_bias"] = bias.detach().to(buffer.device).requires_grad_()
    with uk.backend(backend):
        result = attention(case.view(buffer), case.num_heads, **kwargs)
        out, cls = result if isinstance(result, tuple) else (result, None)
        outputs, grads = [out], [torch.randn_like(out)]
        if cls is not None:
            outputs.append(cls)
            grads.append(torch.randn_like(cls))
        inputs = [buffer] + ([bias] if bias is not None else [])
        grad_inputs = torch.autograd.grad(outputs, inputs, grads)
    grad_cls = grads[1] if cls is not None else None
    grad_bias = grad_inputs[1] if bias is not None else None
    # to the CPU, where the references are (dense tensors keep their strides)
    return tuple(None if t is None else t.cpu() for t in
                 (out, cls, grads[0], grad_cls, grad_inputs[0], grad_bias))


def check(case: Case, backend: str, buffer: torch.Tensor | None = None) -> torch.Tensor:
    """Ours vs the reference: output, class row, qkv and bias gradients; returns the output."""
    dtype = case.qkv.dtype
    tol = tolerance(dtype, "attention")
    out, cls, grad_out, grad_cls, grad_qkv, grad_bias = run_op(case, backend, buffer)
    assert out.dtype == dtype
    assert_rel_close(out, case.ref_out, tol, f"{backend} out")
    if case.ref_cls is not None:
        assert cls.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert_rel_close(cls, case.ref_cls, tol, f"{backend} cls_attn")
    ref_grad_qkv, ref_grad_bias = case.ref_grads(
        grad_out.double(), None if grad_cls is None else grad_cls.double())
    assert_rel_close(grad_qkv, ref_grad_qkv, tol, f"{backend} grad qkv")
    if ref_grad_bias is not None:
        assert_rel_close(grad_bias, ref_grad_bias, tol, f"{backend} grad qkv_bias")
    return out


# ---- parity -------------------------------------------------------------------------------------

HEAD_DIMS = (28, 32, 64, 128)
# 512: the longest sequence the C++ kernel takes (cpu backend); 1024 goes to the flash kernel
TOKENS = (1, 7, 49, 196, 512, 1024)


def global_params():
    """Every head_dim x N on eager, cpu and compiled Triton; the interpreter gets the small N, and
    N = 196 (four key blocks, the last one partial) at one head_dim."""
    params = []
    for head_dim in HEAD_DIMS:
        for tokens in TOKENS:
            for backend in ("eager", "cpu"):
                params.append(pytest.param(backend, head_dim, tokens, marks=MARKS[backend]))
            if not INTERPRETED or tokens <= 49 or (tokens, head_dim) == (196, 64):
                params.append(pytest.param("triton", head_dim, tokens, marks=MARKS["triton"]))
    return params


@pytest.mark.parametrize("backend,head_dim,tokens", global_params())
def test_global_attention_matches_reference(backend, head_dim, tokens):
    batch, heads = (2, 2) if not small(backend) else (1, 2 if tokens < 196 else 1)
    check(global_case(batch, tokens, heads, head_dim, torch.float32), backend)


@pytest.mark.parametrize("backend,grid,prune_ratio,head_dim", [
    *[pytest.param(b, (14, 14), 1.0, 28, marks=MARKS[b]) for b in ("eager", "cpu", "triton")],
    *[pytest.param(b, (14, 14), 0.5, 28, marks=MARKS[b])
      for b in ("eager", "cpu") + (() if INTERPRETED else ("triton",))],
    *[pytest.param(b, (7, 9), 0.5, 32, marks=MARKS[b]) for b in ("eager", "cpu", "triton")],
])
def test_class_token_row_matches_evo_block(backend, grid, prune_ratio, head_dim):
    """N = 197 (every token, XXS stage 3 at 224) and pruned [cls, kept, representative]; the
    class-row gradient flows into q and k as in the reference."""
    heads = 2 if not small(backend) else 1
    check(evo_case(2, grid, heads, head_dim, prune_ratio, torch.float32), backend)


# backends that get the full-size cases
FULL_SIZE = ("eager", "cpu") + (() if INTERPRETED else ("triton",))


@pytest.mark.parametrize("backend,grid,window_size,qkv_bias", [
    *[pytest.param(b, g, 14, True, marks=MARKS[b])
      for b in FULL_SIZE for g in ((32, 32), (30, 45))],
    *[pytest.param(b, (30, 45), 14, False, marks=MARKS[b]) for b in FULL_SIZE],
    *[pytest.param(b, (9, 11), 4, bias, marks=MARKS[b])
      for b in FULL_SIZE for bias in (True, False)],
    *[pytest.param("triton", (5, 7), 4, bias, marks=MARKS["triton"]) for bias in (True, False)],
    pytest.param("triton", (8, 8), 4, True, marks=MARKS["triton"]),
    pytest.param("triton", (11, 13), 10, True, marks=MARKS["triton"] + [pytest.mark.slow]),
])
def test_window_attention_matches_reference(backend, grid, window_size, qkv_bias):
    """Grids that need padding right and bottom (32x32 / 14, 30x45, 9x11, 5x7, 11x13 / 10:
    windows of two key blocks) and one that does not (8x8 / 4)."""
    batch, heads = (2, 2) if not small(backend) else (1, 2 if window_size < 10 else 1)
    check(window_case(batch, grid, window_size, heads, 32, torch.float32, qkv_bias), backend)


@pytest.mark.parametrize("backend", [pytest.param(b, marks=MARKS[b]) for b in ("cpu", "triton")])
def test_window_attention_with_bias_at_head_dim_128(backend):
    """float32 at head_dim 128 runs Triton's backward as two launches (dk/dv with the bias
    gradient of the padding keys, then dq): the case whose fused kernel spilled."""
    check(window_case(1, (9, 9), 7, 2, 128, torch.float32, qkv_bias=True), backend)


@pytest.mark.parametrize("temporal", [True, False], ids=["temporal", "spatial"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_split_attention_matches_reference(backend, temporal):
    """Both views of one (B, T*H*W, 3C) buffer; the output folds back to (B, T*H*W, C) as a view."""
    frames, grid = (4, (7, 7)) if not small(backend) else (3, (2, 3))
    case = split_case(2 if not small(backend) else 1, frames, grid, 2, 32, torch.float32,
                      temporal)
    out = check(case, backend)
    tokens_first = out.transpose(1, 2) if temporal else out
    assert tokens_first.is_contiguous()  # (B, T, HW, C) memory: a view of (B, T*HW, C)


@pytest.mark.parametrize("backend,dtype", [
    *[pytest.param(b, dt, marks=MARKS[b])
      for b in ("eager", "cpu") for dt in (torch.float16, torch.bfloat16, torch.float64)],
    pytest.param("triton", torch.float16, marks=MARKS["triton"]),
    pytest.param("triton", torch.float64, marks=MARKS["triton"]),
    # the interpreter's bfloat16 dots are wrong (DESIGN.md): compiled only
    pytest.param("triton", torch.bfloat16, marks=MARKS["triton"] + gpu_marks()),
])
def test_16bit_and_float64_inputs(backend, dtype):
    """Float32 accumulation (float64 for float64): within the contract for the dtype of the float64
    reference, for the class row at head_dim 28 (light models) and windows with padding."""
    if small(backend):  # shapes for the interpreter: N = 66, two key blocks
        cases = [evo_case(1, (5, 13), 1, 28, 1.0, dtype), window_case(1, (5, 7), 4, 2, 32, dtype)]
    else:
        cases = [evo_case(1, (8, 12), 2, 28, 1.0, dtype), window_case(1, (9, 11), 4, 2, 32, dtype)]
    for case in cases:
        check(case, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_qkv(backend):
    """A qkv sliced from a wider buffer, and one whose storage is token-major (N, B, 3C): values
    as for the contiguous input, the output dense in qkv's dim order; grad_out with stride 0."""
    case = global_case(2, 13, 2, 32, torch.float32)
    device = device_of(backend)
    wide = torch.randn(2, 13, case.qkv.shape[-1] + 5, device=device)
    wide[..., :-5] = case.qkv.to(device)
    wide.requires_grad_()
    check(case, backend, buffer=wide[..., :-5])
    token_major = case.qkv.to(device).transpose(0, 1).contiguous().transpose(0, 1)
    token_major.requires_grad_()
    out = check(case, backend, buffer=token_major)
    assert out.transpose(0, 1).is_contiguous()
    with uk.backend(backend):
        (grad,) = torch.autograd.grad(attention(token_major, 2, **case.kwargs).sum(), token_major)
    grad = grad.cpu()
    ref = case.ref_grads(torch.ones_like(case.ref_out), None)[0]
    assert_rel_close(grad, ref, tolerance(torch.float32, "attention"), f"{backend} grad of sum")


def reference_attention(qkv: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """Plain float64 global attention on (B, N, 3C)."""
    q, k, v = qkv.double().unflatten(-1, (3, num_heads, -1)).permute(2, 0, 3, 1, 4)
    probs = torch.softmax(q @ k.transpose(-2, -1) * scale, dim=-1)
    return (probs @ v).transpose(1, 2).flatten(2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_scores_and_nan(backend):
    """Scores in the thousands (one key dominates, the rest underflow to 0) stay exact; a NaN in
    one token's q makes that sequence's output rows NaN and leaves the other sequence alone."""
    qkv = torch.randn(2, 37, 3 * 64, device=device_of(backend)) * 12  # q.k ~ 1e4: exp underflows
    with uk.backend(backend):                                           # for all but the top key
        out = attention(qkv, 2, scale=1.0)
    assert_rel_close(out, reference_attention(qkv, 2, 1.0), tolerance(torch.float32, "attention"),
                     f"{backend} extreme scores")
    qkv[1, 5, 3] = float("nan")  # head 0's q of token 5 in sequence 1
    with uk.backend(backend):
        out = attention(qkv, 2)
    assert out[1, 5, :32].isnan().all()
    assert not out[0].isnan().any()


@pytest.mark.skipif(not _extension.loaded() or sys.platform != "linux"
                    or platform.machine() != "x86_64",
                    reason="needs uniformer_kernels._C and torch's x86-64 Linux wheel (MKL inside)")
def test_cpu_backend_runs_the_cpp_kernel_where_it_applies():
    """float32/float64 global, split and window attention take the C++ kernel; 16-bit inputs and
    sequences (windows) over MAX_KERNEL_SEQ_LEN tokens the composition."""
    assert _extension.CPU_ATTENTION, "torch links no sgemm_: the cpu backend fell back"
    qkv = torch.randn(2, 12, 48)
    assert attention_op._kernel_applies(qkv, None)
    assert attention_op._kernel_applies(qkv.view(2, 3, 4, 48).transpose(1, 2), None)
    assert attention_op._kernel_applies(qkv.double(), None)
    assert not attention_op._kernel_applies(qkv.half(), None)
    assert attention_op._kernel_applies(qkv, attention_op.Window(2, 3, 4))
    big_windows = attention_op.Window(23, 23, 23)  # 529 tokens per window
    assert not attention_op._kernel_applies(torch.randn(1, 23 * 23, 48), big_windows)
    long = torch.randn(1, attention_op.MAX_KERNEL_SEQ_LEN + 1, 48)
    assert not attention_op._kernel_applies(long, None)


@pytest.mark.parametrize("forward_backend,backward_backend", [
    pytest.param("cpu", "eager", marks=MARKS["cpu"]),
    pytest.param("triton", "eager", marks=MARKS["triton"]),
    pytest.param("eager", "triton", marks=MARKS["triton"]),
])
def test_backward_may_run_on_another_backend(forward_backend, backward_backend):
    """The saved log-sum-exp means the same on every backend (window padding rows included)."""
    for case in (window_case(1, (5, 7), 4, 2, 16, torch.float32),
                 evo_case(1, (3, 4), 2, 16, 1.0, torch.float32)):
        device = device_of("triton" if "triton" in (forward_backend, backward_backend) else "cpu")
        qkv = case.qkv.detach().to(device).requires_grad_()
        with uk.backend(forward_backend):
            result = attention(qkv, case.num_heads, **case.kwargs)
        out, cls = result if isinstance(result, tuple) else (result, None)
        grad_out = torch.randn_like(out)
        grad_cls = torch.randn_like(cls) if cls is not None else None
        with uk.backend(backward_backend):
            (grad,) = torch.autograd.grad([out] + ([cls] if cls is not None else []), [qkv],
                                          [grad_out] + ([grad_cls] if cls is not None else []))
        ref = case.ref_grads(grad_out.cpu().double(),
                             None if cls is None else grad_cls.cpu().double())[0]
        assert_rel_close(grad.cpu(), ref, tolerance(torch.float32, "attention"), "grad qkv")


# ---- poisoned memory ----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", [pytest.param("triton", marks=MARKS["triton"])])
def test_triton_kernels_overwrite_nan_filled_outputs(backend):
    """The launchers write into buffers they are given: filled with NaN, every element the kernels
    should write (out, lse, the class row, every grad_qkv element, the bias gradient) is finite
    afterwards, and equal to the eager backend's (windows with padding, class row, split views)."""
    from uniformer_kernels.triton import attention as kernels
    device = device_of(backend)

    def randn(*shape):
        return torch.randn(*shape, device=device)

    window = attention_op.Window(4, 5, 7)
    bias = randn(96)
    for qkv, qkv_bias, win, cls in [
        (randn(1, 35, 96), bias, window, False),
        (randn(2, 11, 96), None, None, True),
        (randn(1, 12, 96).view(1, 3, 4, 96).transpose(1, 2), None, None, False),
    ]:
        eager_out, eager_lse, eager_cls = attention_op._eager_forward(qkv, qkv_bias, 2, 0.25, win,
                                                                      cls)
        out, lse, cls_probs = (torch.full_like(t, float("nan"))
                               for t in attention_op._empty_outputs(qkv, 2, win, cls))
        kernels.attention_forward(qkv, qkv_bias, out, lse, cls_probs if cls else None,
                                  num_heads=2, scale=0.25, window=win)
        for got, want, name in ((out, eager_out, "out"), (lse, eager_lse, "lse"),
                                (cls_probs, eager_cls, "cls_probs")):
            assert_rel_close(got, want, 1e-5, name)
        grad_out = torch.randn_like(out)
        grad_cls = torch.randn_like(cls_probs) if cls else None
        want_qkv, want_bias = attention_op._eager_backward(grad_out, grad_cls, qkv, qkv_bias, out,
                                                           lse, cls_probs, 2, 0.25, win)
        grad_qkv = torch.full_like(qkv, float("nan"))
        grad_bias = torch.full((96,), float("nan"), device=device) if qkv_bias is not None else None
        kernels.attention_backward(grad_out, grad_cls, qkv, qkv_bias, out, lse,
                                   cls_probs if cls else None, grad_qkv, grad_bias, num_heads=2,
                                   scale=0.25, window=win)
        assert_rel_close(grad_qkv, want_qkv, 1e-5, "grad_qkv")
        if qkv_bias is not None:
            assert_rel_close(grad_bias, want_bias, 1e-5, "grad_bias")
            assert (grad_bias[:32] == 0).all()  # padding queries are cropped: no q gradient


@pytest.mark.skipif(sys.platform != "linux", reason="glibc malloc perturbation")
def test_poisoned_heap_never_leaks_into_results():
    """eager and cpu compose torch ops into buffers they allocate and fill piecewise (window
    padding, cropping, gradient packing). In a child process every allocation starts as 0x7f
    bytes (3.4e38 in float32; mmap off below 32 MiB so torch's buffers come from that heap): an
    element left unwritten shows up as a huge error."""
    backends_here = ["eager"] + (["cpu"] if _extension.loaded() else [])
    script = textwrap.dedent(f"""
        import torch
        import uniformer_kernels as uk
        from uniformer_kernels.ops.attention import attention
        assert (torch.empty(4096).view(torch.int32) == 0x7f7f7f7f).all(), "poison not active"
        for backend in {backends_here!r}:
            qkv = torch.randn(2, 9 * 11, 192, requires_grad=True)
            bias = torch.randn(192, requires_grad=True)
            grid = torch.randn(2, 3 * 20, 192, requires_grad=True)
            with uk.backend(backend):
                out = attention(qkv, 2, window_size=4, grid_size=(9, 11), qkv_bias=bias)
                split = attention(grid.view(2, 3, 20, 192).transpose(1, 2), 2)
                token, cls = attention(grid, 2, return_cls_attn=True)
                grads = torch.autograd.grad((out.sum(), split.sum(), token.sum() + cls.sum()),
                                            (qkv, bias, grid))
            for t in (out, split, token, cls) + grads:
                assert t.abs().max() < 1e3, backend
        print("checked", {backends_here!r})
    """)
    run_with_poisoned_malloc(script, timeout=600)


# ---- torch.library: opcheck, gradcheck, compile -------------------------------------------------

def opcheck_calls(device):
    """(forward args, backward args) for global + class row, windows + bias, split views; one
    head and few sequences, for the interpreter's sake."""
    qkv = torch.randn(1, 12, 48, device=device)
    bias = torch.randn(48, device=device)
    split = torch.randn(1, 12, 48, device=device).view(1, 3, 4, 48).transpose(1, 2)
    calls = []
    for x, b, window, cls in ((qkv, None, (0, 0, 0), True), (qkv, bias, (3, 3, 4), False),
                              (split, None, (0, 0, 0), False)):
        fwd = (x.detach().requires_grad_(), None if b is None else b.detach().requires_grad_(),
               1, 0.25, *window, cls)
        out, lse, cls_probs = attention_op._attention(x, b, 1, 0.25, *window, cls)
        bwd = (torch.randn_like(out), torch.randn_like(cls_probs) if cls else None, x, b, out, lse,
               cls_probs, 1, 0.25, *window)
        calls.append((fwd, bwd))
    return calls


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    with uk.backend(backend):
        for fwd, bwd in opcheck_calls(device_of(backend)):
            torch.library.opcheck(attention_op._attention, fwd)
            torch.library.opcheck(attention_op._attention_backward, bwd)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    device = device_of(backend)
    qkv = torch.randn(1, 12, 48, dtype=torch.float64, device=device, requires_grad=True)
    bias = torch.randn(48, dtype=torch.float64, device=device, requires_grad=True)
    with uk.backend(backend):
        assert torch.autograd.gradcheck(
            lambda q, b: attention(q, 1, window_size=3, grid_size=(3, 4), qkv_bias=b),
            (qkv, bias), fast_mode=True)
        assert torch.autograd.gradcheck(lambda q: attention(q, 1, return_cls_attn=True), (qkv,),
                                        fast_mode=True)
        assert torch.autograd.gradcheck(
            lambda q: attention(q.view(1, 3, 4, 48).transpose(1, 2), 1), (qkv,), fast_mode=True)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=gpu_marks())])
def test_compile_fullgraph_forward_and_backward(device):
    """Windows with bias and the class row inside one compiled function: no graph break, one
    compilation, the same values and gradients as eager (on CUDA: the triton backend)."""
    torch._dynamo.reset()
    qkv = torch.randn(2, 35, 96, device=device, requires_grad=True)
    bias = torch.randn(96, device=device, requires_grad=True)

    def block(qkv, bias):
        windows = attention(qkv, 2, window_size=4, grid_size=(5, 7), qkv_bias=bias)
        tokens, cls = attention(qkv, 2, return_cls_attn=True)
        return windows.square().sum() + tokens.sum() + cls.square().sum()

    compiled = torch.compile(block, fullgraph=True, backend="inductor")
    with torch._dynamo.config.patch(recompile_limit=1):
        loss = compiled(qkv, bias)
        grads = torch.autograd.grad(loss, (qkv, bias))
    eager_loss = block(qkv, bias)
    assert_rel_close(loss, eager_loss.double(), 1e-6)
    for got, want in zip(grads, torch.autograd.grad(eager_loss, (qkv, bias))):
        assert_rel_close(got, want.double(), 1e-6)


# ---- devices: tensors on a GPU other than the current one --------------------------------------

@pytest.mark.gpu
def test_tensors_on_a_device_other_than_the_current_one():
    """With cuda:0 current, windows with bias and the class row on cuda:1 tensors, forward and
    backward: Triton launches on the current device unless the op switches to the tensors'."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 CUDA GPUs, found {torch.cuda.device_count()}")
    if TRITON_DEVICE != "cuda":
        pytest.skip("the triton backend does not run compiled here")
    with torch.cuda.device(0):
        for case in (window_case(2, (9, 11), 4, 2, 32, torch.float32),
                     evo_case(2, (7, 9), 2, 32, 1.0, torch.float32)):
            buffer = case.qkv.to("cuda:1").requires_grad_()
            check(case, "triton", buffer=buffer)
        assert torch.cuda.current_device() == 0


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=MARKS["triton"])])
def test_triton_launches_run_on_the_qkv_device(backend, monkeypatch):
    """Forward and backward launchers run inside the device guard, with qkv's device current (on
    one GPU the guard changes nothing but its code runs; on the CPU it is a no-op context)."""
    from uniformer_kernels.triton import attention as kernels
    guarded, launches = [], []
    real_guard = _device_guard.on_device_of

    @contextlib.contextmanager
    def recording_guard(t):
        with real_guard(t):
            guarded.append(t.device)
            yield
            guarded.pop()

    def spy(name):
        real = getattr(kernels, name)

        def launcher(*args, **kwargs):
            qkv = args[0] if name == "attention_forward" else args[2]
            current = torch.cuda.current_device() if qkv.is_cuda else None
            launches.append((name, bool(guarded) and guarded[-1] == qkv.device,
                             current in (None, qkv.device.index)))
            return real(*args, **kwargs)
        return launcher

    monkeypatch.setattr(_device_guard, "on_device_of", recording_guard)
    for name in ("attention_forward", "attention_backward"):
        monkeypatch.setattr(kernels, name, spy(name))
    check(window_case(1, (5, 7), 4, 2, 16, torch.float32), backend)
    assert {name for name, _, _ in launches} == {"attention_forward", "attention_backward"}
    assert all(inside and current for _, inside, current in launches), launches


# ---- backend choice and bad input ---------------------------------------------------------------

def test_forcing_a_backend_without_attention_raises():
    with uk.backend("cuda"), pytest.raises(ValueError, match="'cuda'.*does not implement"):
        attention(torch.randn(1, 4, 12), 2)


def test_automatic_choice_on_cpu_is_cpu_or_eager_never_the_interpreter(monkeypatch):
    calls = []
    for name in ("cpu", "eager", "triton"):
        monkeypatch.setitem(attention_op._FORWARD, name,
                            lambda *args, name=name, real=attention_op._FORWARD[name]:
                            calls.append(name) or real(*args))
    attention(torch.randn(1, 4, 12), 2)
    assert calls == ["cpu" if _extension.loaded() else "eager"]


def bad_calls():
    qkv = torch.randn(2, 12, 96)
    bias = torch.randn(96)
    window = dict(window_size=2, grid_size=(3, 4))
    return [
        ("not a tensor", dict(qkv=qkv.numpy(), num_heads=2), TypeError,
         "qkv: expected a torch.Tensor"),
        ("integer dtype", dict(qkv=qkv.long(), num_heads=2), TypeError, "qkv: expected float16"),
        ("rank 2", dict(qkv=qkv[0], num_heads=2), ValueError, r"qkv: expected \(B, N, 3C\)"),
        ("rank 5", dict(qkv=qkv[None, None], num_heads=2), ValueError, "qkv: expected"),
        ("empty batch", dict(qkv=qkv[:0], num_heads=2), ValueError, "qkv: empty tensor"),
        ("no tokens", dict(qkv=qkv[:, :0], num_heads=2), ValueError, "qkv: empty tensor"),
        ("last dim not 3C", dict(qkv=qkv[..., :95], num_heads=1), ValueError,
         "last dim 95 must be 3 \\* C"),
        ("C not divisible by heads", dict(qkv=qkv, num_heads=5), ValueError,
         "multiple of num_heads=5"),
        ("head_dim above 128", dict(qkv=torch.randn(1, 4, 3 * 132), num_heads=1), ValueError,
         "head_dim 132 .* exceeds 128"),
        ("num_heads zero", dict(qkv=qkv, num_heads=0), TypeError, "num_heads: expected a positive"),
        ("num_heads float", dict(qkv=qkv, num_heads=2.0), TypeError, "num_heads"),
        ("scale nan", dict(qkv=qkv, num_heads=2, scale=float("nan")), TypeError, "scale: expected"),
        ("scale string", dict(qkv=qkv, num_heads=2, scale="0.1"), TypeError, "scale: expected"),
        ("window without grid", dict(qkv=qkv, num_heads=2, window_size=2), ValueError,
         "grid_size: window attention needs"),
        ("window on a non-grid input", dict(qkv=qkv, num_heads=2, window_size=2, grid_size=(3, 5)),
         ValueError, r"qkv: window attention expects \(B, H\*W, 3C\) = \(B, 15, 3C\)"),
        ("window on split views", dict(qkv=qkv.view(2, 3, 4, 96), num_heads=2, **window),
         ValueError, "qkv: window attention expects"),
        ("window size zero", dict(qkv=qkv, num_heads=2, window_size=0, grid_size=(3, 4)),
         TypeError, "window_size: expected a positive int"),
        ("grid without window", dict(qkv=qkv, num_heads=2, grid_size=(3, 4)), ValueError,
         "grid_size: only used with window_size"),
        ("bias without window", dict(qkv=qkv, num_heads=2, qkv_bias=bias), ValueError,
         "qkv_bias: only used with window_size"),
        ("bias shape", dict(qkv=qkv, num_heads=2, qkv_bias=bias[:32], **window), ValueError,
         r"qkv_bias: expected shape \(96,\)"),
        ("bias dtype", dict(qkv=qkv, num_heads=2, qkv_bias=bias.half(), **window), TypeError,
         "qkv_bias: dtype torch.float16 differs"),
        ("bias device", dict(qkv=qkv, num_heads=2, qkv_bias=bias.to("meta"), **window),
         ValueError, "qkv_bias: on meta"),
        ("cls not bool", dict(qkv=qkv, num_heads=2, return_cls_attn=1), TypeError,
         "return_cls_attn: expected a bool"),
        ("cls with windows", dict(qkv=qkv, num_heads=2, return_cls_attn=True, **window),
         ValueError, "return_cls_attn: only for global attention"),
        ("cls with split views", dict(qkv=qkv.view(2, 3, 4, 96), num_heads=2,
                                      return_cls_attn=True), ValueError, "return_cls_attn: only"),
    ]


@pytest.mark.parametrize("case", bad_calls(), ids=lambda c: c[0])
def test_bad_input_raises_before_any_kernel(case, monkeypatch):
    def launched(*args):
        raise AssertionError("the op ran")
    monkeypatch.setattr(attention_op, "_attention", launched)
    _, kwargs, error, message = case
    with pytest.raises(error, match=message):
        attention(**kwargs)
