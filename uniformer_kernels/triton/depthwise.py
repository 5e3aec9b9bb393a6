"""Triton kernels of the depthwise conv family (DESIGN.md ops 1 and 2).

The launchers have the contract of the C++ internal ops in csrc/cpu/depthwise.cpp, so ops/ calls
either interchangeably: x is a contiguous channels-last (N, D, H, W, C) tensor (2-D convs come with
D = 1), the weight is (KD, KH, KW, C) and every parameter is in the accumulation dtype (float32;
float64 for float64 x). Sums run in the accumulation dtype and are rounded to x's dtype once.

Tiling: a "row" is one output (n, d, h); a program takes BLOCK_W consecutive pixels of a row times
BLOCK_C channels. Channels are the contiguous dimension, so every load and store of a tile is
coalesced along C. Masked loads give the zero padding. The input row a tap reads is
``row + di * H + dh`` (the same n), valid when d + di and h + dh are in range. Row offsets are
int64 scalars (tensors may exceed 2^31 elements); offsets inside a row stay int32, which the
launchers check (W * C < 2^31).

The kernels take C as C_GROUPS * C_VEC, C_VEC (constexpr) the largest power of two <= 16 dividing
C: Triton only knows an integer argument's divisibility when it is a multiple of 16, and without
it a channel count like 56 (UniFormer-XXS) loses the 16-byte vector loads.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._plan import LaunchPlan

__all__ = ["depthwise_conv_forward", "depthwise_conv_backward_weight", "pos_embed_norm_forward"]

# ---- block-size heuristics (tune on a GPU here) --------------------------------------------------

# Conv tiles (forward and weight gradient): up to 64 channels (a 256-byte fp32 segment per pixel) by
# enough pixels to give ~1024 elements per program, 8 per thread with 4 warps.
_CONV_MAX_BLOCK_C = 64
_CONV_TILE_ELEMENTS = 1024
_CONV_MAX_BLOCK_W = 32
_CONV_NUM_WARPS = 4
# pos_embed_norm tiles hold all channels of a pixel (the LayerNorm reduction is in the tile), so
# wide C leaves room for few pixels: up to 4096 elements, at most 8 per thread (16 spilled in
# float32 at C = 256 on sm_80, bench/gpu_static.py); 16-bit tiles take 8 warps, below.
_NORM_TILE_ELEMENTS = 4096
_NORM_MAX_BLOCK_W = 16
_NORM_ELEMENTS_PER_THREAD = 8
# 16-bit forward tiles (the conv, its input gradient and pos_embed_norm) run on 8 warps. At the
# counts above, the ptxas of Triton 3.9 aimed at 40-56 registers for the 3-D ones on sm_80 and
# spilled 8 bytes; on 8 warps no 16-bit forward tile spills under Triton 3.6 or 3.9
# (bench/gpu_static.py).
_16BIT_FORWARD_NUM_WARPS = 8
# Weight gradient split: about this many programs (several waves of an H100's 132 SMs) ...
_WEIGHT_GRAD_TARGET_PROGRAMS = 1024
# ... each reducing at least this many pixels per tap, so the per-program partial sums
# (TAPS x C each) stay under 1/8 of the bytes of grad_y and x.
_WEIGHT_GRAD_MIN_PIXELS_PER_TAP = 4


def _channel_vector(channels: int) -> int:
    """C_VEC: the largest power of two <= 16 dividing ``channels``."""
    return min(16, channels & -channels)


def _forward_num_warps(dtype: torch.dtype, num_warps: int) -> int:
    """Warps of a forward tile: ``num_warps``, or 8 for 16-bit dtypes."""
    return _16BIT_FORWARD_NUM_WARPS if dtype in (torch.float16, torch.bfloat16) else num_warps


def _conv_blocks(width: int, channels: int) -> tuple[int, int]:
    """(BLOCK_W, BLOCK_C) for the conv kernels."""
    block_c = min(_CONV_MAX_BLOCK_C, max(4, triton.next_power_of_2(channels)))
    block_w = min(_CONV_MAX_BLOCK_W, _CONV_TILE_ELEMENTS // block_c, triton.next_power_of_2(width))
    return block_w, block_c


def _norm_blocks(width: int, channels: int) -> tuple[int, int, int]:
    """(BLOCK_W, BLOCK_C, num_warps) for pos_embed_norm: BLOCK_C covers all channels."""
    block_c = max(4, triton.next_power_of_2(channels))
    block_w = max(1, min(_NORM_MAX_BLOCK_W, _NORM_TILE_ELEMENTS // block_c,
                         triton.next_power_of_2(width)))
    num_warps = min(16, max(4, block_w * block_c // (32 * _NORM_ELEMENTS_PER_THREAD)))
    return block_w, block_c, num_warps


# ---- kernels ------------------------------------------------------------------------------------

@triton.jit
def _conv_tile(x_ptr, w_ptr, b_ptr, row, w_offs, c_offs, c_mask, D, H, W, C,
               KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
               HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr):
    """The (BLOCK_W, BLOCK_C) accumulator of output row ``row`` (int64), pixels w_offs, channels
    c_offs: bias + taps (+ x). Lanes outside C come out 0."""
    acc_dtype = w_ptr.dtype.element_ty
    acc = tl.zeros((w_offs.shape[0], c_offs.shape[0]), dtype=acc_dtype)
    if HAS_BIAS:
        acc += tl.load(b_ptr + c_offs, mask=c_mask, other=0.0)[None, :]
    offs = w_offs[:, None] * C + c_offs[None, :]
    c_mask_2d = c_mask[None, :]
    if RESIDUAL:
        mask = (w_offs < W)[:, None] & c_mask_2d
        acc += tl.load(x_ptr + row * W * C + offs, mask=mask, other=0.0).to(acc_dtype)
    h = row % H
    d = (row // H) % D
    # The (i, j) loops stay rolled: unrolled, the compiler hoists every tap's load and spills at
    # 5x5x5. Each iteration sweeps one input row with KW unrolled loads; the weight pointer steps
    # through the taps in (i, j, k) order.
    w_tap = w_ptr + c_offs
    for i in range(KD):
        in_d = d + i - KD // 2
        for j in range(KH):
            in_h = h + j - KH // 2
            # an input row outside the tensor has an empty W range (a scalar select: a scalar bool
            # broadcast into a mask trips the interpreter)
            w_end = tl.where((in_d >= 0) & (in_d < D) & (in_h >= 0) & (in_h < H), W, 0)
            x_tap = x_ptr + (row + (i - KD // 2) * H + (j - KH // 2)) * W * C + offs - (KW // 2) * C
            for k in tl.static_range(KW):
                in_w = w_offs + (k - KW // 2)
                mask = ((in_w >= 0) & (in_w < w_end))[:, None] & c_mask_2d
                xv = tl.load(x_tap, mask=mask, other=0.0).to(acc_dtype)
                acc += xv * tl.load(w_tap, mask=c_mask, other=0.0)[None, :]
                x_tap += C
                w_tap += C
    return acc


@triton.jit
def _forward_kernel(x_ptr, w_ptr, b_ptr, y_ptr, D, H, W, C_GROUPS,
                    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                    HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr,
                    C_VEC: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    C = C_GROUPS * C_VEC
    # grid: (rows * W tiles, channel blocks); consecutive programs walk along W, then rows, so the
    # input rows shared by neighbouring output rows are still in L2.
    w_tiles = tl.cdiv(W, BLOCK_W)
    pid = tl.program_id(0)
    row = (pid // w_tiles).to(tl.int64)
    w_offs = (pid % w_tiles) * BLOCK_W + tl.arange(0, BLOCK_W)
    c_offs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offs < C
    acc = _conv_tile(x_ptr, w_ptr, b_ptr, row, w_offs, c_offs, c_mask, D, H, W, C,
                     KD, KH, KW, HAS_BIAS, RESIDUAL)
    offs = w_offs[:, None] * C + c_offs[None, :]
    mask = (w_offs < W)[:, None] & c_mask[None, :]
    tl.store(y_ptr + row * W * C + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _weight_grad_kernel(gy_ptr, x_ptr, gw_ptr, gb_ptr, rows, D, H, W, C_GROUPS, rows_per_chunk,
                        KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, ATOMIC: tl.constexpr,
                        C_VEC: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    # grid: (row chunks, channel blocks). A program reduces its chunk of rows for every tap. With
    # ATOMIC it adds into gw (TAPS, C) / gb (C,); otherwise it writes its own partial sums at
    # gw[chunk] (chunks, TAPS, C) / gb[chunk] (chunks, C) for the launcher to add in a fixed order.
    C = C_GROUPS * C_VEC
    TAPS: tl.constexpr = KD * KH * KW
    acc_dtype = gw_ptr.dtype.element_ty
    chunk = tl.program_id(0)
    c_offs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offs < C
    row_begin = chunk.to(tl.int64) * rows_per_chunk
    row_end = tl.minimum(row_begin + rows_per_chunk, rows)
    if not ATOMIC:
        gw_ptr += chunk.to(tl.int64) * TAPS * C
        gb_ptr += chunk.to(tl.int64) * C

    tile = tl.arange(0, BLOCK_W)
    tile_offs = tile[:, None] * C + c_offs[None, :]
    c_mask_2d = c_mask[None, :]
    # grad_bias: the sum of grad_y
    acc = tl.zeros((BLOCK_W, BLOCK_C), dtype=acc_dtype)
    for w0 in range(0, W, BLOCK_W):
        mask = (w0 + tile < W)[:, None] & c_mask_2d
        for row in range(row_begin, row_end):
            gy = tl.load(gy_ptr + (row * W + w0) * C + tile_offs, mask=mask, other=0.0)
            acc += gy.to(acc_dtype)
    if ATOMIC:
        tl.atomic_add(gb_ptr + c_offs, tl.sum(acc, axis=0), mask=c_mask, sem="relaxed")
    else:
        tl.store(gb_ptr + c_offs, tl.sum(acc, axis=0), mask=c_mask)

    # grad_weight, tap by tap in a runtime loop (unrolled, the loop nest would be copied up to 343
    # times); grad_y is re-read once per tap, from cache when the chunk is small.
    for tap in range(TAPS):
        di = tap // (KH * KW) - KD // 2
        dh = (tap // KW) % KH - KH // 2
        dw = tap % KW - KW // 2
        acc = tl.zeros((BLOCK_W, BLOCK_C), dtype=acc_dtype)
        for w0 in range(0, W, BLOCK_W):
            w_offs = w0 + tile
            in_w = w_offs + dw
            w_ok = (w_offs < W) & (in_w >= 0)
            for row in range(row_begin, row_end):
                in_d = (row // H) % D + di
                in_h = row % H + dh
                w_end = tl.where((in_d >= 0) & (in_d < D) & (in_h >= 0) & (in_h < H), W, 0)
                # one mask for both loads: pixels in the row whose tap input is in the tensor (the
                # other products are zero padding)
                mask = (w_ok & (in_w < w_end))[:, None] & c_mask_2d
                gy = tl.load(gy_ptr + (row * W + w0) * C + tile_offs, mask=mask, other=0.0)
                in_pixel = (row + di * H + dh) * W + w0 + dw
                xv = tl.load(x_ptr + in_pixel * C + tile_offs, mask=mask, other=0.0)
                acc += gy.to(acc_dtype) * xv.to(acc_dtype)
        if ATOMIC:
            tl.atomic_add(gw_ptr + tap * C + c_offs, tl.sum(acc, axis=0), mask=c_mask,
                          sem="relaxed")
        else:
            tl.store(gw_ptr + tap * C + c_offs, tl.sum(acc, axis=0), mask=c_mask)


@triton.jit
def _pos_embed_norm_kernel(x_ptr, w_ptr, b_ptr, nw_ptr, nb_ptr, y_ptr, z_ptr, mean_ptr, rstd_ptr,
                           D, H, W, C_GROUPS, eps,
                           KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                           LAYER_NORM: tl.constexpr, C_VEC: tl.constexpr,
                           BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    C = C_GROUPS * C_VEC
    # grid: (rows * W tiles,); BLOCK_C >= C, so a program owns whole pixels and normalises them
    # straight from the accumulator.
    w_tiles = tl.cdiv(W, BLOCK_W)
    pid = tl.program_id(0)
    row = (pid // w_tiles).to(tl.int64)
    w_offs = (pid % w_tiles) * BLOCK_W + tl.arange(0, BLOCK_W)
    c_offs = tl.arange(0, BLOCK_C)
    c_mask = c_offs < C
    w_mask = w_offs < W
    y = _conv_tile(x_ptr, w_ptr, b_ptr, row, w_offs, c_offs, c_mask, D, H, W, C,
                   KD, KH, KW, True, True)
    offs = row * W * C + w_offs[:, None] * C + c_offs[None, :]
    mask = w_mask[:, None] & c_mask[None, :]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)

    norm_w = tl.load(nw_ptr + c_offs, mask=c_mask, other=0.0)[None, :]
    norm_b = tl.load(nb_ptr + c_offs, mask=c_mask, other=0.0)[None, :]
    if LAYER_NORM:
        # lanes past C are 0 in y, so they add nothing to the sum; the centred values are masked.
        # Two passes over the registers: the centred variance does not cancel like E[y^2] - mean^2.
        mean = tl.sum(y, axis=1) / C
        centred = tl.where(c_mask[None, :], y - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / C + eps)
        z = centred * rstd[:, None] * norm_w + norm_b
        pixels = row * W + w_offs
        tl.store(mean_ptr + pixels, mean, mask=w_mask)
        tl.store(rstd_ptr + pixels, rstd, mask=w_mask)
    else:
        z = y * norm_w + norm_b
    tl.store(z_ptr + offs, z.to(z_ptr.dtype.element_ty), mask=mask)


# ---- launchers ----------------------------------------------------------------------------------

_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"uniformer_kernels.triton.depthwise: {message}")


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_input(x: torch.Tensor, name: str) -> None:
    _require(x.dim() == 5 and x.is_contiguous(),
             f"{name} must be a contiguous (N, D, H, W, C) tensor, got shape {tuple(x.shape)}")
    _require(x.dtype in _INPUT_DTYPES,
             f"{name} must be float32, float16, bfloat16 or float64, got {x.dtype}")
    _require(x.shape[3] * x.shape[4] < 2**31, f"{name}: W * C must be < 2^31, got {tuple(x.shape)}")


def _check_kernel_size(kernel_size) -> tuple[int, int, int]:
    _require(len(kernel_size) == 3 and all(k % 2 == 1 and 1 <= k <= 7 for k in kernel_size),
             f"kernel sizes must be 3 odd numbers <= 7, got {tuple(kernel_size)}")
    return tuple(int(k) for k in kernel_size)


def _check_param(p: torch.Tensor, x: torch.Tensor, shape: tuple, name: str) -> None:
    acc = _accumulation_dtype(x.dtype)
    _require(tuple(p.shape) == tuple(shape) and p.is_contiguous() and p.dtype == acc
             and p.device == x.device,
             f"{name} must be a contiguous {acc} tensor of shape {tuple(shape)} on {x.device}, got "
             f"{p.dtype} {tuple(p.shape)} on {p.device}")


def depthwise_conv_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           residual: bool) -> torch.Tensor:
    """y = bias + depthwise_conv(x, weight) (+ x when residual), zero padding K // 2 per dim.

    Also gives dx: depthwise_conv_forward(grad_y, weight.flip(0, 1, 2).contiguous(), None, residual).
    """
    _check_input(x, "x")
    _require(weight.dim() == 4, f"weight must be (KD, KH, KW, C), got {tuple(weight.shape)}")
    kd, kh, kw = _check_kernel_size(weight.shape[:3])
    n, d, h, w, c = x.shape
    _check_param(weight, x, (kd, kh, kw, c), "weight")
    if bias is not None:
        _check_param(bias, x, (c,), "bias")
    y = torch.empty_like(x)
    if y.numel() == 0:
        return y
    forward_plan(x, weight, bias, y, residual).launch()
    return y


def forward_plan(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor,
                 residual: bool) -> LaunchPlan:
    """The launch of depthwise_conv_forward on checked, non-empty arguments."""
    kd, kh, kw = weight.shape[:3]
    n, d, h, w, c = x.shape
    block_w, block_c = _conv_blocks(w, c)
    c_vec = _channel_vector(c)
    grid = (n * d * h * triton.cdiv(w, block_w), triton.cdiv(c, block_c))
    return LaunchPlan(
        "depthwise.fwd", _forward_kernel, grid,
        (x, weight, bias if bias is not None else weight, y, d, h, w, c // c_vec),
        dict(KD=kd, KH=kh, KW=kw, HAS_BIAS=bias is not None, RESIDUAL=bool(residual),
             C_VEC=c_vec, BLOCK_W=block_w, BLOCK_C=block_c),
        num_warps=_forward_num_warps(x.dtype, _CONV_NUM_WARPS))


def depthwise_conv_backward_weight(grad_y: torch.Tensor, x: torch.Tensor, kernel_size,
                                   deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_weight (KD, KH, KW, C), grad_bias (C,)) in the accumulation dtype.

    deterministic: each program writes its partial sums and torch adds them in chunk order, so the
    result is bitwise reproducible; otherwise programs atomically add into one buffer.
    """
    _check_input(x, "x")
    _require(grad_y.shape == x.shape and grad_y.is_contiguous() and grad_y.dtype == x.dtype
             and grad_y.device == x.device,
             f"grad_y must be contiguous and match x ({tuple(x.shape)}, {x.dtype}, {x.device}), got "
             f"{tuple(grad_y.shape)}, {grad_y.dtype}, {grad_y.device}")
    kd, kh, kw = _check_kernel_size(kernel_size)
    c = x.shape[4]
    acc = _accumulation_dtype(x.dtype)
    if x.numel() == 0:
        return x.new_zeros((kd, kh, kw, c), dtype=acc), x.new_zeros((c,), dtype=acc)
    plan, grad_w, grad_b = weight_grad_plan(grad_y, x, (kd, kh, kw), deterministic)
    plan.launch()
    if deterministic:
        grad_w, grad_b = grad_w.sum(0), grad_b.sum(0)
    return grad_w.view(kd, kh, kw, c), grad_b


def weight_grad_plan(grad_y: torch.Tensor, x: torch.Tensor, kernel_size: tuple[int, int, int],
                     deterministic: bool) -> tuple[LaunchPlan, torch.Tensor, torch.Tensor]:
    """The launch of depthwise_conv_backward_weight on checked, non-empty arguments, with the
    buffers it writes: (chunks, TAPS, C) / (chunks, C) partial sums when deterministic, else the
    zeroed (TAPS, C) / (C,) sums."""
    kd, kh, kw = kernel_size
    n, d, h, w, c = x.shape
    acc = _accumulation_dtype(x.dtype)
    taps, rows = kd * kh * kw, n * d * h
    block_w, block_c = _conv_blocks(w, c)
    c_blocks = triton.cdiv(c, block_c)
    rows_per_chunk = max(triton.cdiv(rows * c_blocks, _WEIGHT_GRAD_TARGET_PROGRAMS),
                         triton.cdiv(_WEIGHT_GRAD_MIN_PIXELS_PER_TAP * taps, w))
    rows_per_chunk = min(rows_per_chunk, rows)
    chunks = triton.cdiv(rows, rows_per_chunk)
    if deterministic:
        grad_w = torch.empty((chunks, taps, c), dtype=acc, device=x.device)
        grad_b = torch.empty((chunks, c), dtype=acc, device=x.device)
    else:
        grad_w = torch.zeros((taps, c), dtype=acc, device=x.device)
        grad_b = torch.zeros((c,), dtype=acc, device=x.device)
    plan = LaunchPlan(
        "depthwise.dw", _weight_grad_kernel, (chunks, c_blocks),
        (grad_y, x, grad_w, grad_b, rows, d, h, w, c // _channel_vector(c), rows_per_chunk),
        dict(KD=kd, KH=kh, KW=kw, ATOMIC=not deterministic, C_VEC=_channel_vector(c),
             BLOCK_W=block_w, BLOCK_C=block_c), num_warps=_CONV_NUM_WARPS)
    return plan, grad_w, grad_b


def pos_embed_norm_forward(
        x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, norm_weight: torch.Tensor,
        norm_bias: torch.Tensor, norm: int, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """y = x + depthwise_conv(x, weight, bias) and z = norm(y) from y's unrounded accumulator.

    norm 0: LayerNorm over C (biased variance, eps) with affine norm_weight / norm_bias; mean and
    rstd per pixel come back as (N*D*H*W,) tensors. norm 1: z = y * norm_weight + norm_bias (an eval
    BatchNorm folded by the caller); mean and rstd are empty.
    """
    _check_input(x, "x")
    _require(norm in (0, 1), f"norm must be 0 (layernorm) or 1 (affine), got {norm}")
    _require(weight.dim() == 4, f"weight must be (KD, KH, KW, C), got {tuple(weight.shape)}")
    kd, kh, kw = _check_kernel_size(weight.shape[:3])
    n, d, h, w, c = x.shape
    _check_param(weight, x, (kd, kh, kw, c), "weight")
    for p, name in ((bias, "bias"), (norm_weight, "norm_weight"), (norm_bias, "norm_bias")):
        _check_param(p, x, (c,), name)
    acc = _accumulation_dtype(x.dtype)
    layer_norm = norm == 0
    pixels = n * d * h * w if layer_norm else 0
    y, z = torch.empty_like(x), torch.empty_like(x)
    mean = torch.empty((pixels,), dtype=acc, device=x.device)
    rstd = torch.empty((pixels,), dtype=acc, device=x.device)
    if x.numel() == 0:
        return y, z, mean, rstd
    pos_embed_norm_plan(x, weight, bias, norm_weight, norm_bias, y, z, mean, rstd, layer_norm,
                        eps).launch()
    return y, z, mean, rstd


def pos_embed_norm_plan(x, weight, bias, norm_weight, norm_bias, y, z, mean, rstd,
                        layer_norm: bool, eps: float) -> LaunchPlan:
    """The launch of pos_embed_norm_forward on checked, non-empty arguments."""
    kd, kh, kw = weight.shape[:3]
    n, d, h, w, c = x.shape
    block_w, block_c, num_warps = _norm_blocks(w, c)
    grid = (n * d * h * triton.cdiv(w, block_w),)
    # the mean/rstd pointers are never read for norm 1: y stands in for the empty tensors
    return LaunchPlan(
        "pos_embed_norm.fwd", _pos_embed_norm_kernel, grid,
        (x, weight, bias, norm_weight, norm_bias, y, z, mean if layer_norm else y,
         rstd if layer_norm else y, d, h, w, c // _channel_vector(c), float(eps)),
        dict(KD=kd, KH=kh, KW=kw, LAYER_NORM=layer_norm, C_VEC=_channel_vector(c),
             BLOCK_W=block_w, BLOCK_C=block_c), num_warps=_forward_num_warps(x.dtype, num_warps))
