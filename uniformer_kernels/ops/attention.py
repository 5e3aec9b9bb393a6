"""Op 4: the global relation aggregator, multi-head attention fused on the qkv Linear's output.

    out = softmax(q k^T * scale) v    per head, q, k, v read from qkv (..., N, 3C) packed as
                                      [3, heads, head_dim]; out (..., N, C) is proj's input

Variants (one op, chosen by the arguments):

* global: qkv (B, N, 3C) (SABlock, EvoSABlock, the video SABlock);
* split video attention (SplitSABlock): qkv with two leading dims, (B1, B2, N, 3C), any strides,
  one sequence per (b1, b2). With tokens in (B, T*H*W, 3C) order, temporal attention is
  ``qkv.view(B, T, HW, 3C).transpose(1, 2)`` and spatial attention ``qkv.view(B, T, HW, 3C)``;
  the output has the input's dim order, so it folds back to (B, T*H*W, C) as a view;
* windows (SABlock_Windows): qkv (B, H*W, 3C) of a row-major H x W grid (``grid_size``), split
  into ``window_size``^2 windows. The reference pads the grid right/bottom after norm1 and before
  the qkv Linear, with no mask, so a padded token's q, k and v are the Linear's bias (``qkv_bias``;
  zeros for a Linear without bias) and padded keys join every softmax of their window; padded
  queries are cropped. The bias gets the gradient that flows through the padded tokens;
* ``return_cls_attn``: also the class token's (token 0) attention probabilities to the other
  tokens, averaged over heads: (B, N - 1), float32, as ``Attention(return_cls_attn=True)``
  computes them after the softmax (the light models prune tokens by them). Differentiable.

Backends: triton (CUDA default; CPU tensors under TRITON_INTERPRET=1 when forced), cpu and eager.
cpu runs the C++ kernel of csrc/cpu/attention.cpp for float32/float64 sequences of up to
MAX_KERNEL_SEQ_LEN tokens: one task per (sequence, head), BLAS gemms straight on the strided q, k, v
of qkv and into out (a window's rows gathered into a per-thread buffer, padding from the bias), the
L x L scores in a per-thread buffer that stays in cache, the class row taken from it. 16-bit inputs
and longer sequences go through PyTorch's CPU flash-attention kernel on views of qkv instead
(windows gathered first: no strided view expresses the padding). eager is the reference composition (score
matrix, softmax, matmul) in the accumulation dtype.

Registered as the custom op ``uniformer_kernels::attention`` -> (out, lse, cls_probs), with a fake
implementation and autograd; its backward is the custom op
``uniformer_kernels::attention_backward``.
``lse`` (S, H, L) is the log-sum-exp of every query's scaled scores over the S sequences of length L
(B * windows for window mode, B1 * B2 for split): all backends save it in the same form, so a
backward may run on another backend than its forward. ``cls_probs`` (B, H, N) is the class token's
probability row per head (empty without return_cls_attn). Both are in the accumulation dtype:
float32, float64 for float64 input.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .. import _extension, backends
from . import _autocast, _device_guard
from ._direct_call import may_skip_dispatch

MAX_HEAD_DIM = 128
SUPPORTED_BACKENDS = ("triton", "cpu", "eager")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class Window(NamedTuple):
    """Window attention's geometry: window side and grid; rows x cols windows cover the grid."""
    size: int
    grid_h: int
    grid_w: int

    @property
    def rows(self) -> int:
        return -(-self.grid_h // self.size)

    @property
    def cols(self) -> int:
        return -(-self.grid_w // self.size)


def attention(qkv: torch.Tensor, num_heads: int, scale: float | None = None,
              window_size: int | None = None, return_cls_attn: bool = False, *,
              grid_size: tuple[int, int] | None = None, qkv_bias: torch.Tensor | None = None):
    """Multi-head attention on the packed output of a qkv Linear (see the module docstring).

    qkv: (B, N, 3C) or (B1, B2, N, 3C), any strides, float16/bfloat16/float32/float64; the last
        dim is [q | k | v], each [heads, head_dim] (``Attention.qkv``'s output as is).
    num_heads: C must be a multiple; head_dim = C // num_heads at most 128.
    scale: multiplies q k^T; default head_dim ** -0.5 (pass ``Attention.scale``).
    window_size: window attention, windows of window_size x window_size over the grid_size grid
        of a (B, H*W, 3C) qkv, padded as the reference pads it.
    return_cls_attn: also return the class token's attention to the other tokens averaged over
        heads, (B, N - 1) float32 (float64 for float64 qkv); global 3-D qkv only.
    grid_size: (H, W), with window_size only.
    qkv_bias: (3C,) the qkv Linear's bias, the value of window padding tokens; with window_size
        only (None for a Linear without bias).

    Returns out: qkv's shape with C channels, qkv's dtype, dense in qkv's dim order; and with
    return_cls_attn the tuple (out, cls_attn). Differentiable in qkv and qkv_bias. Under
    ``torch.autocast`` qkv and qkv_bias go to the autocast dtype, as for PyTorch's attention.
    """
    qkv, qkv_bias = _autocast.cast_args(qkv, qkv_bias)
    head_dim = _check_qkv(qkv, num_heads)
    scale = _check_scale(scale, head_dim)
    window = _check_window(qkv, window_size, grid_size, qkv_bias)
    if not isinstance(return_cls_attn, bool):
        raise TypeError(f"return_cls_attn: expected a bool, got {type(return_cls_attn).__name__}")
    if return_cls_attn and (window is not None or qkv.dim() != 3):
        raise ValueError("return_cls_attn: only for global attention on a (B, N, 3C) qkv (the "
                         "class token is token 0 of one sequence), not with windows or split views")
    size, grid_h, grid_w = window or (0, 0, 0)
    op = _attention_impl if may_skip_dispatch(qkv, qkv_bias) else _attention
    out, _, cls_probs = op(qkv, qkv_bias, num_heads, scale, size, grid_h, grid_w, return_cls_attn)
    if return_cls_attn:
        return out, cls_probs[:, :, 1:].mean(dim=1)
    return out


# ---- argument checks ----------------------------------------------------------------------------

def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_qkv(qkv, num_heads) -> int:
    """Validates qkv and num_heads; returns head_dim."""
    if not isinstance(qkv, torch.Tensor):
        raise TypeError(f"qkv: expected a torch.Tensor, got {type(qkv).__name__}")
    if qkv.dtype not in FLOAT_DTYPES:
        raise TypeError(f"qkv: expected float16, bfloat16, float32 or float64, got {qkv.dtype}")
    if qkv.dim() not in (3, 4):
        raise ValueError(f"qkv: expected (B, N, 3C) or (B1, B2, N, 3C), got shape "
                         f"{tuple(qkv.shape)}")
    if qkv.numel() == 0:
        raise ValueError(f"qkv: empty tensor of shape {tuple(qkv.shape)}")
    if not _is_int(num_heads) or num_heads < 1:
        raise TypeError(f"num_heads: expected a positive int, got {num_heads!r}")
    packed = qkv.shape[-1]
    if packed % (3 * num_heads):
        raise ValueError(f"qkv: last dim {packed} must be 3 * C with C a multiple of num_heads="
                         f"{num_heads} (packed [3, heads, head_dim])")
    head_dim = packed // (3 * num_heads)
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"qkv: head_dim {head_dim} (C={packed // 3} / num_heads={num_heads}) "
                         f"exceeds {MAX_HEAD_DIM}")
    return head_dim


def _check_scale(scale, head_dim: int) -> float:
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale: expected a finite float or None, got {scale!r}")
    return float(scale)


def _check_window(qkv, window_size, grid_size, qkv_bias) -> Window | None:
    if window_size is None:
        if grid_size is not None or qkv_bias is not None:
            name = "grid_size" if grid_size is not None else "qkv_bias"
            raise ValueError(f"{name}: only used with window_size (window attention)")
        return None
    if not _is_int(window_size) or window_size < 1:
        raise TypeError(f"window_size: expected a positive int or None, got {window_size!r}")
    if (not isinstance(grid_size, (tuple, list)) or len(grid_size) != 2
            or not all(_is_int(s) and s > 0 for s in grid_size)):
        raise ValueError(f"grid_size: window attention needs the grid as (H, W) positive ints, "
                         f"got {grid_size!r}")
    grid_h, grid_w = grid_size
    if qkv.dim() != 3 or qkv.shape[1] != grid_h * grid_w:
        raise ValueError(f"qkv: window attention expects (B, H*W, 3C) = (B, {grid_h * grid_w}, "
                         f"3C) for grid_size {tuple(grid_size)}, got shape {tuple(qkv.shape)}")
    if qkv_bias is not None:
        if not isinstance(qkv_bias, torch.Tensor):
            raise TypeError(f"qkv_bias: expected a torch.Tensor or None, got "
                            f"{type(qkv_bias).__name__}")
        if qkv_bias.device != qkv.device:
            raise ValueError(f"qkv_bias: on {qkv_bias.device}, but qkv is on {qkv.device}")
        if qkv_bias.dtype != qkv.dtype:
            raise TypeError(f"qkv_bias: dtype {qkv_bias.dtype} differs from qkv's {qkv.dtype}")
        if tuple(qkv_bias.shape) != (qkv.shape[-1],):
            raise ValueError(f"qkv_bias: expected shape ({qkv.shape[-1]},), got "
                             f"{tuple(qkv_bias.shape)}")
    return Window(window_size, grid_h, grid_w)


# ---- shared pieces ------------------------------------------------------------------------------

def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _sequence_shape(qkv: torch.Tensor, window: Window | None) -> tuple[int, int]:
    """(S, L): the number of attention sequences and their length."""
    if window is not None:
        return qkv.shape[0] * window.rows * window.cols, window.size ** 2
    return math.prod(qkv.shape[:-2]), qkv.shape[-2]


def _empty_outputs(qkv, num_heads, window, return_cls_attn):
    """Uninitialised (out, lse, cls_probs): out dense in qkv's dim order (what torch.empty_like
    makes of the non-dense C-channel slice), the rest contiguous."""
    channels = qkv.shape[-1] // 3
    acc = _accumulation_dtype(qkv.dtype)
    num_seq, seq_len = _sequence_shape(qkv, window)
    out = torch.empty_like(qkv[..., :channels])
    lse = qkv.new_empty((num_seq, num_heads, seq_len), dtype=acc)
    cls_shape = (qkv.shape[0], num_heads, qkv.shape[1]) if return_cls_attn else (0,)
    return out, lse, qkv.new_empty(cls_shape, dtype=acc)


def _in_qkv_layout(t: torch.Tensor, qkv: torch.Tensor) -> torch.Tensor:
    """``t`` (qkv's shape, any channel count) laid out as the op returns it, as _empty_outputs and
    the fakes allocate it: ``t`` itself when it already is (no copy), else a copy."""
    channels = qkv[..., :t.shape[-1]]
    if t.stride() == torch.empty_like(channels, device="meta").stride():
        return t
    return torch.empty_like(channels).copy_(t)


def _split_heads(seqs: torch.Tensor, num_heads: int):
    """(S, L, 3C) -> q, k, v as (S, H, L, D) views."""
    return seqs.unflatten(-1, (3, num_heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)


def _heads(seqs: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(S, L, C) -> (S, H, L, D) view."""
    return seqs.unflatten(-1, (num_heads, -1)).transpose(1, 2)


def _to_windows(x: torch.Tensor, window: Window, fill: torch.Tensor | None) -> torch.Tensor:
    """(B, H*W, X) grid -> (B * windows, size^2, X) windows, padding tokens set to ``fill`` (X,)
    or 0: the reference's pad + window_partition (two copies)."""
    size, grid_h, grid_w = window
    batch, _, channels = x.shape
    padded = x.new_empty(batch, window.rows * size, window.cols * size, channels)
    padded[:, :grid_h, :grid_w] = x.unflatten(1, (grid_h, grid_w))
    fill = 0.0 if fill is None else fill
    padded[:, grid_h:] = fill
    padded[:, :grid_h, grid_w:] = fill
    windows = padded.view(batch, window.rows, size, window.cols, size, channels).transpose(2, 3)
    return windows.reshape(-1, size * size, channels)


def _from_windows(windows: torch.Tensor, window: Window) -> torch.Tensor:
    """(B * windows, size^2, X) -> the padded (B, rows * size, cols * size, X) grid."""
    size, channels = window.size, windows.shape[-1]
    grid = windows.view(-1, window.rows, window.cols, size, size, channels).transpose(2, 3)
    return grid.reshape(-1, window.rows * size, window.cols * size, channels)


def _sequences(x: torch.Tensor, window: Window | None, fill: torch.Tensor | None = None):
    """x (..., N, X) as (S, L, X) sequences: a view when the leading dims merge, else a copy."""
    if window is not None:
        return _to_windows(x, window, fill)
    return x.reshape(-1, *x.shape[-2:])


def _cls_probs(q, k, lse, scale):
    """(B, H, N) probabilities of query row 0: exp(q_0 . k * scale - lse_0)."""
    acc = lse.dtype
    scores = torch.einsum("bhd,bhnd->bhn", q[:, :, 0].to(acc), k.to(acc)) * scale
    return torch.exp(scores - lse[:, :, :1])


def _add_cls_grad(dq, dk, q, k, cls_probs, grad_cls, scale) -> None:
    """Adds the gradient reaching q and k through cls_probs = softmax row 0 to dq, dk in place:
    d scores_0 = p_0 * (g - <p_0, g>)."""
    acc = cls_probs.dtype
    grad_cls = grad_cls.to(acc)
    dscores = cls_probs * (grad_cls - (cls_probs * grad_cls).sum(-1, keepdim=True))
    dq[:, :, 0] += (torch.einsum("bhn,bhnd->bhd", dscores, k.to(acc)) * scale).to(dq.dtype)
    dk += (dscores.unsqueeze(-1) * q[:, :, :1].to(acc) * scale).to(dk.dtype)


# ---- eager and cpu backends: one composition around two attention cores ------------------------
#
# A core maps q, k, v (S, H, L, D) to (o, lse) and back to (dq, dk, dv); the composition gathers
# the sequences, adds the class row and scatters the results into the op's layout.

def _eager_core_forward(q, k, v, scale):
    acc = _accumulation_dtype(q.dtype)
    scores = (q.to(acc) @ k.to(acc).transpose(-2, -1)) * scale
    lse = scores.logsumexp(dim=-1)
    return torch.exp(scores - lse.unsqueeze(-1)) @ v.to(acc), lse


def _eager_core_backward(grad_o, q, k, v, o, lse, scale):
    # the plain softmax backward: its row sums come from probs * grad_probs, so o is not needed
    acc = lse.dtype
    q, k, v, grad_o = (t.to(acc) for t in (q, k, v, grad_o))
    probs = torch.exp((q @ k.transpose(-2, -1)) * scale - lse.unsqueeze(-1))
    grad_v = probs.transpose(-2, -1) @ grad_o
    grad_probs = grad_o @ v.transpose(-2, -1)
    grad_scores = probs * (grad_probs - (probs * grad_probs).sum(-1, keepdim=True))
    return grad_scores @ k * scale, grad_scores.transpose(-2, -1) @ q * scale, grad_v


def _flash_core_forward(q, k, v, scale):
    # returns o as (S, H, L, D) over (S, L, H, D) memory: (S, L, C) without a copy
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False,
                                                                      scale=scale)


def _flash_core_backward(grad_o, q, k, v, o, lse, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_o, q, k, v, o, lse, 0.0, False, scale=scale)


def _composed_forward(core, qkv, qkv_bias, num_heads, scale, window, return_cls_attn):
    seqs = _sequences(qkv, window, qkv_bias)
    q, k, v = _split_heads(seqs, num_heads)
    o, lse = core(q, k, v, scale)
    lse = lse.contiguous()
    o = o.transpose(1, 2).reshape(*seqs.shape[:2], -1).to(qkv.dtype)  # (S, L, C)
    if window is None:
        out = _in_qkv_layout(o.view(*qkv.shape[:-1], -1), qkv)
    else:
        out = torch.empty_like(qkv[..., :o.shape[-1]])
        out.unflatten(1, (window.grid_h, window.grid_w)).copy_(
            _from_windows(o, window)[:, :window.grid_h, :window.grid_w])
    cls_probs = _cls_probs(q, k, lse, scale) if return_cls_attn else lse.new_empty(0)
    return out, lse, cls_probs


def _composed_backward(core, grad_out, grad_cls_probs, qkv, qkv_bias, out, lse, cls_probs,
                       num_heads, scale, window):
    seqs = _sequences(qkv, window, qkv_bias)
    q, k, v = _split_heads(seqs, num_heads)
    # padding rows of out and grad_out are 0: cropped queries get no gradient
    o = _heads(_sequences(out, window), num_heads)
    grad_o = _heads(_sequences(grad_out, window), num_heads)
    dq, dk, dv = core(grad_o, q, k, v, o, lse, scale)
    if grad_cls_probs is not None:
        _add_cls_grad(dq, dk, q, k, cls_probs, grad_cls_probs, scale)
    # (S, L, 3, H, D): one copy packs the three gradients as qkv is packed
    grad_seqs = torch.stack([g.transpose(1, 2) for g in (dq, dk, dv)], dim=2).flatten(2)
    grad_seqs = grad_seqs.to(qkv.dtype)
    if window is None:  # a bias only enters through window padding
        grad_bias = qkv.new_empty(0) if qkv_bias is None else torch.zeros_like(qkv_bias)
        return _in_qkv_layout(grad_seqs.view(qkv.shape), qkv), grad_bias
    grid = _from_windows(grad_seqs, window)
    grid_h, grid_w = window.grid_h, window.grid_w
    grad_qkv = torch.empty_like(qkv)
    grad_qkv.unflatten(1, (grid_h, grid_w)).copy_(grid[:, :grid_h, :grid_w])
    grad_bias = qkv.new_empty(0)
    if qkv_bias is not None:
        acc = lse.dtype
        grad_bias = (grid[:, grid_h:].sum((0, 1, 2), dtype=acc)
                     + grid[:, :grid_h, grid_w:].sum((0, 1, 2), dtype=acc)).to(qkv_bias.dtype)
    return grad_qkv, grad_bias


def _eager_forward(qkv, qkv_bias, num_heads, scale, window, return_cls_attn):
    return _composed_forward(_eager_core_forward, qkv, qkv_bias, num_heads, scale, window,
                             return_cls_attn)


def _eager_backward(*args):
    return _composed_backward(_eager_core_backward, *args)


# ---- cpu backend: the C++ kernel (csrc/cpu/attention.cpp) where it applies, else the composition
# over PyTorch's CPU flash kernel (window mode, 16-bit dtypes, a strided last dim, no BLAS).

# Longer sequences go to the flash kernel, which tiles them: the kernel's L x L buffers would leave
# L2 (at N = 1024 forward+backward flash was 1.2x faster; at N <= 256 the kernel is, see
# bench/results/cpu-amd-epyc-1t/attention.md).
MAX_KERNEL_SEQ_LEN = 512


def _kernel_applies(qkv, window) -> bool:
    seq_len = qkv.shape[-2] if window is None else window.size ** 2
    return (qkv.dtype in (torch.float32, torch.float64) and qkv.stride(-1) == 1
            and seq_len <= MAX_KERNEL_SEQ_LEN and _extension.loaded() and _extension.CPU_ATTENTION)


def _as_sequences(t: torch.Tensor) -> torch.Tensor:
    """(B, N, X) or (B1, B2, N, X) as the kernel's (S1, S2, L, X) view."""
    return t.unsqueeze(0) if t.dim() == 3 else t


def _window_args(window) -> tuple[int, int, int]:
    return tuple(window) if window is not None else (0, 0, 0)


def _cpu_forward(qkv, qkv_bias, num_heads, scale, window, return_cls_attn):
    if not _kernel_applies(qkv, window):
        return _composed_forward(_flash_core_forward, qkv, qkv_bias, num_heads, scale, window,
                                 return_cls_attn)
    out, lse, cls_probs = _empty_outputs(qkv, num_heads, window, return_cls_attn)
    torch.ops.uniformer_kernels_C.attention_forward(
        _as_sequences(qkv), qkv_bias, _as_sequences(out), lse, cls_probs, num_heads, scale,
        *_window_args(window))
    return out, lse, cls_probs


def _cpu_backward(grad_out, grad_cls_probs, qkv, qkv_bias, out, lse, cls_probs, num_heads, scale,
                  window):
    if not _kernel_applies(qkv, window):
        return _composed_backward(_flash_core_backward, grad_out, grad_cls_probs, qkv, qkv_bias,
                                  out, lse, cls_probs, num_heads, scale, window)
    grad_qkv = torch.empty_like(qkv)
    # a bias only enters through window padding; without padding its gradient is 0
    grad_bias = qkv.new_empty(0) if qkv_bias is None else torch.zeros_like(qkv_bias)
    grad_cls_probs = lse.new_empty(0) if grad_cls_probs is None else grad_cls_probs.contiguous()
    torch.ops.uniformer_kernels_C.attention_backward(
        _as_sequences(grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()),
        grad_cls_probs, _as_sequences(qkv), qkv_bias, lse, _as_sequences(grad_qkv), grad_bias,
        num_heads, scale, *_window_args(window))
    return grad_qkv, grad_bias


# ---- triton backend -----------------------------------------------------------------------------

def _triton_forward(qkv, qkv_bias, num_heads, scale, window, return_cls_attn):
    from ..triton import attention as kernels  # imported here: the package works without Triton
    out, lse, cls_probs = _empty_outputs(qkv, num_heads, window, return_cls_attn)
    with _device_guard.on_device_of(qkv):
        kernels.attention_forward(qkv, qkv_bias, out, lse, cls_probs if return_cls_attn else None,
                                  num_heads=num_heads, scale=scale, window=window)
    return out, lse, cls_probs


def _triton_backward(grad_out, grad_cls_probs, qkv, qkv_bias, out, lse, cls_probs, num_heads,
                     scale, window):
    from ..triton import attention as kernels
    grad_qkv = torch.empty_like(qkv)
    grad_bias = qkv.new_empty(0 if qkv_bias is None else qkv.shape[-1])
    with _device_guard.on_device_of(qkv):
        kernels.attention_backward(grad_out, grad_cls_probs, qkv, qkv_bias, out, lse, cls_probs,
                                   grad_qkv, None if qkv_bias is None else grad_bias,
                                   num_heads=num_heads, scale=scale, window=window)
    return grad_qkv, grad_bias


_FORWARD = {"triton": _triton_forward, "cpu": _cpu_forward, "eager": _eager_forward}
_BACKWARD = {"triton": _triton_backward, "cpu": _cpu_backward, "eager": _eager_backward}


# ---- custom ops ---------------------------------------------------------------------------------

def _window(window_size: int, grid_h: int, grid_w: int) -> Window | None:
    return Window(window_size, grid_h, grid_w) if window_size else None


@_autocast.autocast_off
def _attention_impl(qkv: torch.Tensor, qkv_bias: torch.Tensor | None, num_heads: int,
                    scale: float, window_size: int, grid_h: int, grid_w: int, return_cls_attn: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, lse, cls_probs); window_size 0 means no windows."""
    backend = backends.resolve_backend(qkv.device, SUPPORTED_BACKENDS, op="attention")
    return _FORWARD[backend](qkv, qkv_bias, num_heads, scale,
                             _window(window_size, grid_h, grid_w), return_cls_attn)


_attention = torch.library.custom_op("uniformer_kernels::attention",
                                     mutates_args=())(_attention_impl)


@_attention.register_fake
def _(qkv, qkv_bias, num_heads, scale, window_size, grid_h, grid_w, return_cls_attn):
    return _empty_outputs(qkv, num_heads, _window(window_size, grid_h, grid_w), return_cls_attn)


@torch.library.custom_op("uniformer_kernels::attention_backward", mutates_args=())
@_autocast.autocast_off
def _attention_backward(grad_out: torch.Tensor, grad_cls_probs: torch.Tensor | None,
                        qkv: torch.Tensor, qkv_bias: torch.Tensor | None, out: torch.Tensor,
                        lse: torch.Tensor, cls_probs: torch.Tensor, num_heads: int, scale: float,
                        window_size: int, grid_h: int, grid_w: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_qkv, grad_bias); grad_bias is empty without a bias."""
    backend = backends.resolve_backend(qkv.device, SUPPORTED_BACKENDS, op="attention backward")
    return _BACKWARD[backend](grad_out, grad_cls_probs, qkv, qkv_bias, out, lse, cls_probs,
                              num_heads, scale, _window(window_size, grid_h, grid_w))


@_attention_backward.register_fake
def _(grad_out, grad_cls_probs, qkv, qkv_bias, out, lse, cls_probs, num_heads, scale,
      window_size, grid_h, grid_w):
    return torch.empty_like(qkv), qkv.new_empty(0 if qkv_bias is None else qkv.shape[-1])


def _setup_context(ctx, inputs, output):
    qkv, qkv_bias, num_heads, scale, window_size, grid_h, grid_w, return_cls_attn = inputs
    out, lse, cls_probs = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(qkv, qkv_bias, out, lse, cls_probs)
    ctx.args = (num_heads, scale, window_size, grid_h, grid_w)
    ctx.return_cls_attn = return_cls_attn


def _backward(ctx, grad_out, grad_lse, grad_cls_probs):
    qkv, qkv_bias, out, lse, cls_probs = ctx.saved_tensors
    grad_qkv, grad_bias = _attention_backward(
        grad_out, grad_cls_probs if ctx.return_cls_attn else None, qkv, qkv_bias, out, lse,
        cls_probs, *ctx.args)
    return grad_qkv, (grad_bias if qkv_bias is not None else None), *(None,) * 6


_attention.register_autograd(_backward, setup_context=_setup_context)
