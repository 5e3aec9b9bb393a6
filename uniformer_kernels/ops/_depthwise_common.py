"""What the depthwise conv family's ops (depthwise.py, pos_embed_norm.py) share: argument checks,
the channels-last 5-D layout the kernels work in, and the kernels of each backend.

The triton and cuda backends expose the same three functions on channels-last 5-D tensors
(N, D, H, W, C), a 2-D conv having D = 1, with weights (KD, KH, KW, C) in the accumulation dtype:

    depthwise_conv_forward(x, weight, bias, residual) -> y
    depthwise_conv_backward_weight(grad_y, x, kernel_size, deterministic) -> (grad_weight, grad_bias)
    pos_embed_norm_forward(x, weight, bias, norm_weight, norm_bias, norm, eps) -> (y, z, mean, rstd)

cuda's are the compiled ops torch.ops.uniformer_kernels_C.* (csrc/cpu/depthwise.cpp defines the
schemas, csrc/cuda the CUDA implementations), triton's are in uniformer_kernels/triton/depthwise.py.
The cpu backend skips this layer: its ops (depthwise_conv_cpu, depthwise_conv_backward_cpu,
pos_embed_norm_cpu) take the ops' own layouts and relayout in C++, which saves ~100 µs of PyTorch
calls a call at batch-1 shapes; they compute in float32/float64, loading and storing bfloat16
themselves; float16 inputs are widened around them.
The cpu backend's forward runs PyTorch's conv (oneDNN) instead where that was measured faster:
float32 NCHW 2-D input of at least ONEDNN_MIN_NUMEL elements, float32 3-D input of at least
ONEDNN_MIN_CHANNELS_3D channels unless a 3x3x3 conv with the residual (see forward_on_onednn).
The input gradient needs no kernel of its own: with stride 1 and padding k//2 it is the forward
conv of grad_y with the kernel flipped in every dim.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator

import torch

from .. import backends

SUPPORTED_BACKENDS = ("triton", "cuda", "cpu", "eager")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# What the CPU ops take (bfloat16 loaded and stored natively, float accumulation); ops/ widens
# float16 around them.
CPU_KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
MAX_KERNEL_SIZE = 7
# PyTorch's conv (oneDNN) beat the cpu kernel's float32 forward in two places (AMD EPYC, AVX2, 1
# thread; the numbers are in docs/DESIGN.md, "Against oneDNN"). NCHW 2-D input from this many
# elements on, where x and y together fill a 512 KiB L2: the kernel's NCHW <-> (N, D, H, W, C)
# relayouts are strided copies, cheap in L2 and not beyond (oneDNN / ours 0.2-0.86 at the models'
# larger maps; channels-last input needs no relayout, and on 3-D NCHW input ours won). And 3-D
# input with at least ONEDNN_MIN_CHANNELS_3D channels, either layout (5x5x5 0.4-1.0, unfused 3x3x3
# median 0.85), but for 3x3x3 with the residual, where our fused add saves oneDNN's extra pass
# over y (level or ours).
ONEDNN_MIN_NUMEL = 64 * 1024
ONEDNN_MIN_CHANNELS_3D = 512

# None: the rule of forward_on_onednn; True/False: always/never (tests, the bench).
_onednn_forced: contextvars.ContextVar[bool | None] = contextvars.ContextVar(
    "uniformer_kernels_cpu_onednn", default=None)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_tensor(name: str, t, like: torch.Tensor | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected float16, bfloat16, float32 or float64, got {t.dtype}")
    if like is not None:
        if t.device != like.device:
            raise ValueError(f"{name}: on {t.device}, but x is on {like.device}")
        if t.dtype != like.dtype:
            raise TypeError(f"{name}: dtype {t.dtype} differs from x's {like.dtype}")


def check_conv_args(x, weight, bias) -> tuple[int, ...]:
    """Validates a depthwise conv's arguments; returns the kernel size (one entry per spatial dim)."""
    check_tensor("x", x)
    if x.dim() not in (4, 5):
        raise ValueError(f"x: expected a 4-D (N, C, H, W) or 5-D (N, C, D, H, W) tensor, got shape "
                         f"{tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"x: empty tensor of shape {tuple(x.shape)}")
    check_tensor("weight", weight, like=x)
    channels = x.shape[1]
    if weight.dim() != x.dim() or weight.shape[0] != channels or weight.shape[1] != 1:
        expected = f"({channels}, 1" + ", k" * (x.dim() - 2) + ")"
        raise ValueError(f"weight: expected a depthwise weight of shape {expected} for x with "
                         f"{channels} channels, got {tuple(weight.shape)}")
    kernel_size = tuple(weight.shape[2:])
    if any(k % 2 == 0 or k > MAX_KERNEL_SIZE for k in kernel_size):
        raise ValueError(f"weight: kernel size {kernel_size} must be odd and at most "
                         f"{MAX_KERNEL_SIZE} in every dim (padding k//2 keeps the size)")
    if bias is not None:
        check_tensor("bias", bias, like=x)
        if tuple(bias.shape) != (channels,):
            raise ValueError(f"bias: expected shape ({channels},), got {tuple(bias.shape)}")
    return kernel_size


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """The format the output is returned in: channels-last when x is (and not also plain
    contiguous, as when C == 1 or the spatial size is 1), else contiguous."""
    channels_last = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    if x.is_contiguous(memory_format=channels_last) and not x.is_contiguous():
        return channels_last
    return torch.contiguous_format


def to_channels_last_5d(x: torch.Tensor) -> torch.Tensor:
    """(N, C, [D,] H, W) -> contiguous (N, D, H, W, C): a free view for channels-last input."""
    if x.dim() == 4:
        x = x.unsqueeze(2)
    return x.permute(0, 2, 3, 4, 1).contiguous()


def from_channels_last_5d(y5: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N, D, H, W, C) -> x's shape and memory format (a free view when that is channels-last)."""
    y = y5.permute(0, 4, 1, 2, 3)
    if like.dim() == 4:
        y = y.squeeze(2)
    return y.contiguous(memory_format=memory_format_of(like))


def weight_to_kernel_layout(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(C, 1, [KD,] KH, KW) -> contiguous (KD, KH, KW, C) in ``dtype`` (few calls: this runs on
    every op call, and each PyTorch call costs microseconds next to batch-1 kernels)."""
    kernel_5d = kernel_size_5d(tuple(weight.shape[2:]))
    taps = weight.reshape(weight.shape[0], -1).t()
    if taps.dtype != dtype:
        taps = taps.to(dtype)
    return taps.contiguous().view(kernel_5d + [weight.shape[0]])


def weight_from_kernel_layout(w: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(KD, KH, KW, C) -> ``like``'s (C, 1, [KD,] KH, KW) shape and dtype."""
    w = w.permute(3, 0, 1, 2)
    if like.dim() == 4:
        w = w.squeeze(1)
    return w.unsqueeze(1).to(like.dtype).contiguous()


def in_layout_of(grad: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``grad`` with ``param``'s strides. A weight gradient of a channels-last activation comes
    out channels-last, and DDP copies each gradient into a bucket view with its parameter's
    strides (warning "Grad strides do not match bucket view strides" and copying slowly when they
    differ); AccumulateGrad likewise stores a gradient that obeys the parameter's layout as is."""
    if grad.stride() == param.stride():
        return grad
    return torch.empty_like(param, dtype=grad.dtype).copy_(grad)


def kernel_size_5d(kernel_size: tuple[int, ...]) -> list[int]:
    return [1, *kernel_size] if len(kernel_size) == 2 else list(kernel_size)


def forward_on_onednn(x: torch.Tensor, kernel_size: tuple[int, ...], residual: bool) -> bool:
    """Whether the cpu backend's depthwise forward runs PyTorch's conv (oneDNN) rather than our
    kernel. A pure function of dtype, rank, layout, sizes and residual (unless forced), so traced,
    compiled and eager calls choose alike and nothing is timed at run time."""
    forced = _onednn_forced.get()
    if forced is not None:
        return forced
    if x.dtype != torch.float32:
        return False  # PyTorch's float64 and (without AVX-512) bfloat16 convs are no oneDNN
    if x.dim() == 5:
        return x.shape[1] >= ONEDNN_MIN_CHANNELS_3D and (not residual or max(kernel_size) > 3)
    return x.numel() >= ONEDNN_MIN_NUMEL and memory_format_of(x) == torch.contiguous_format


@contextlib.contextmanager
def cpu_onednn(use: bool | None) -> Iterator[None]:
    """Inside the block the cpu backend's depthwise forward runs oneDNN always (True), never
    (False) or by forward_on_onednn's rule (None); this thread or async task only."""
    if use is not None and not isinstance(use, bool):
        raise TypeError(f"use: expected True, False or None, got {type(use).__name__}")
    token = _onednn_forced.set(use)
    try:
        yield
    finally:
        _onednn_forced.reset(token)


def choose_backend(x: torch.Tensor, op: str) -> str:
    return backends.resolve_backend(x.device, SUPPORTED_BACKENDS, op=op)


@functools.cache
def kernels(backend: str):
    """The kernel functions of ``backend`` (triton or cuda), made once."""
    if backend == "triton":
        from ..triton import depthwise  # imported here: the package must work without Triton
        return depthwise
    return torch.ops.uniformer_kernels_C
