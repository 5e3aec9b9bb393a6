"""Triton kernels of the fused attention (DESIGN.md op 4): forward and backward in the style of
FlashAttention-2 (online softmax, accumulation in float32 or float64 for float64 input, only the
log-sum-exp saved), reading q, k and v straight from the packed qkv Linear output and writing the
output and the qkv gradient in the token layout the op returns: no permute or copy around them.

Sequences. The launchers take qkv as (B, N, 3C) or (B1, B2, N, 3C) with any strides, its last dim
packed [3, heads, head_dim]. A program works on one (sequence, head) pair:

* global and split attention: sequence s is (outer, inner) = divmod(s, n_inner) over the leading
  dims (n_inner = 1 for 3-D qkv), and its token i sits at
  ``outer * stride_outer + inner * stride_inner + i * stride_token``;
* windows: qkv is a (B, H*W, 3C) row-major grid; sequence s is (b, window) with windows_h x
  windows_w windows of window_size^2 tokens, token i of window (wr, wc) being grid pixel
  (wr * ws + i // ws, wc * ws + i % ws). The reference pads the grid right/bottom after norm1 and
  before the qkv Linear, so a pixel past the edge holds the Linear's bias (zero without one): its
  q, k and v are loaded as the bias, it is a key of every softmax in its window, and its query row
  is computed (it keeps the saved statistics finite) but never stored.

out, grad_out and grad_qkv are indexed the same way with their own strides; head_dim is padded to a
power of two inside the kernels by masking (28 -> 32), never in memory.

Saved statistics, shared with the other backends: ``lse`` (S, H, L) is the natural-log
log-sum-exp of each query row's scaled scores, window padding rows included; with
``return_cls_attn`` the forward also writes ``cls_probs`` (S, H, L), the probabilities of query
row 0 (the class token), and the backward takes their gradient.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._plan import LaunchPlan

__all__ = ["attention_forward", "attention_backward"]

# the softmax runs in base 2 (exp2); the saved log-sum-exp is in base e, like the other backends'
_LOG2E = tl.constexpr(math.log2(math.e))
_LN2 = tl.constexpr(math.log(2.0))

# ---- block sizes (not yet tuned on a GPU; sized so that ptxas spills nothing under Triton 3.6 and
# the newest, bench/gpu_static.py)
# Forward: BLOCK_M x BLOCK_N score tiles. Backward: one block size for the key and query blocks,
# since a program computes dk/dv of key block i and then dq of query block i.
# - 16-bit: 64-row forward tiles; 32-row backward tiles (at 64 rows and head_dim 64 the backward's
#   six (block, head_dim) tiles took all 255 registers on sm_80 and spilled 60-104 bytes under
#   Triton 3.6; at 32 rows on 4 warps it needs ~147).
# - float32 runs its dots as 3xTF32 (three products on split operands) and float64 as FMA loops: at
#   64-row tiles both spilled kilobytes, so they take 32-row forward tiles on 8 warps and 16-row
#   backward tiles; at head_dim 128 also a single pipeline stage (the second stage's prefetch
#   buffers spilled 24-72 bytes; one stage: 233-250 registers, no spill) and a backward split in
#   two launches, dk/dv then dq (GRADS below): with the window padding's bias the fused float32
#   kernel spilled 52-76 bytes on sm_90; each half alone takes 226-254 registers and spills
#   nothing. The halves recompute the probabilities as the fused kernel's two phases do, so the
#   split costs a launch and a second read of q, k, v and do.


class _Tiles(NamedTuple):
    forward_block: int
    forward_warps: int
    backward_block: int
    backward_warps: int
    stages: int
    backward_split: bool  # dk/dv and dq as two launches


def _tiles(dtype: torch.dtype, block_d: int) -> _Tiles:
    warps = 4 if block_d <= 64 else 8
    if dtype in (torch.float32, torch.float64):
        return _Tiles(32, 8, 16, warps, 2 if block_d <= 64 else 1, block_d > 64)
    return _Tiles(64, warps, 32, warps, 2, False)


# ---- kernels ------------------------------------------------------------------------------------

@triton.jit
def _token_offsets(seq, idx, seq_len, n_inner, window_size, grid_h, grid_w, windows_w,
                   stride_outer, stride_inner, stride_token, WINDOW: tl.constexpr):
    """int64 element offsets of tokens ``idx`` of sequence ``seq``; whether each is in the sequence
    (idx < seq_len); whether it is a real token (not window padding)."""
    outer = (seq // n_inner).to(tl.int64)
    inner = seq % n_inner
    in_seq = idx < seq_len
    if WINDOW:
        y = (inner // windows_w) * window_size + idx // window_size
        x = (inner % windows_w) * window_size + idx % window_size
        real = in_seq & (y < grid_h) & (x < grid_w)
        offsets = outer * stride_outer + (y * grid_w + x).to(tl.int64) * stride_token
    else:
        real = in_seq
        offsets = (outer * stride_outer + inner.to(tl.int64) * stride_inner
                   + idx.to(tl.int64) * stride_token)
    return offsets, in_seq, real


@triton.jit
def _load_tokens(ptr, offsets, in_seq, real, cols, col_mask, stride_chan, bias_ptr,
                 HAS_BIAS: tl.constexpr):
    """(tokens, BLOCK_D) tile of columns ``cols``; window padding reads as the bias (or 0)."""
    tile = tl.load(ptr + offsets[:, None] + cols[None, :] * stride_chan,
                   mask=real[:, None] & col_mask[None, :], other=0.0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_mask, other=0.0)
        padding = in_seq & (real == 0)
        tile = tl.where(padding[:, None], bias[None, :], tile)
    return tile


@triton.jit
def _forward_kernel(qkv, qkv_bias, out, lse, cls_probs,
                    seq_len, n_inner, window_size, grid_h, grid_w, windows_w,
                    qkv_s0, qkv_s1, qkv_s2, qkv_s3, out_s0, out_s1, out_s2, out_s3, qk_scale,
                    HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, WINDOW: tl.constexpr,
                    HAS_BIAS: tl.constexpr, RETURN_CLS: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # grid: (sequences * heads, query blocks): sequences * heads on the axis without the 65535
    # limit. qk_scale = scale * log2(e): the softmax runs in exp2.
    seq_head = tl.program_id(0)
    block = tl.program_id(1)
    seq = seq_head // HEADS
    head = seq_head % HEADS
    C: tl.constexpr = HEADS * HEAD_DIM
    acc_dtype = lse.dtype.element_ty
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    q_cols = head * HEAD_DIM + dims

    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    q_offs, q_in, q_real = _token_offsets(seq, rows, seq_len, n_inner, window_size, grid_h, grid_w,
                                          windows_w, qkv_s0, qkv_s1, qkv_s2, WINDOW)
    q = _load_tokens(qkv, q_offs, q_in, q_real, q_cols, dim_mask, qkv_s3, qkv_bias, HAS_BIAS)

    row_max = tl.full([BLOCK_M], float("-inf"), acc_dtype)
    row_sum = tl.zeros([BLOCK_M], acc_dtype)
    acc = tl.zeros([BLOCK_M, BLOCK_D], acc_dtype)
    for start in range(0, seq_len, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        k_offs, k_in, k_real = _token_offsets(seq, keys, seq_len, n_inner, window_size, grid_h,
                                              grid_w, windows_w, qkv_s0, qkv_s1, qkv_s2, WINDOW)
        k = _load_tokens(qkv, k_offs, k_in, k_real, C + q_cols, dim_mask, qkv_s3, qkv_bias,
                         HAS_BIAS)
        v = _load_tokens(qkv, k_offs, k_in, k_real, 2 * C + q_cols, dim_mask, qkv_s3, qkv_bias,
                         HAS_BIAS)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=acc_dtype) * qk_scale
        scores = tl.where(k_in[None, :], scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        rescale = tl.exp2(row_max - new_max)
        probs = tl.exp2(scores - new_max[:, None])
        row_sum = row_sum * rescale + tl.sum(probs, 1)
        acc = acc * rescale[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=PRECISION,
                                              out_dtype=acc_dtype)
        row_max = new_max
    acc = acc / row_sum[:, None]
    lse2 = row_max + tl.log2(row_sum)

    o_offs, _, _ = _token_offsets(seq, rows, seq_len, n_inner, window_size, grid_h, grid_w,
                                  windows_w, out_s0, out_s1, out_s2, WINDOW)
    tl.store(out + o_offs[:, None] + q_cols[None, :] * out_s3, acc.to(out.dtype.element_ty),
             mask=q_real[:, None] & dim_mask[None, :])
    tl.store(lse + seq_head.to(tl.int64) * seq_len + rows, lse2 * _LN2, mask=q_in)

    if RETURN_CLS:
        if block == 0:
            # Row 0's probabilities need its final log-sum-exp: a second sweep over the keys with
            # q's row 0 only, as an fp32 dot per key (no matrix product for one row).
            is_row0 = rows == 0
            q0 = tl.sum(tl.where(is_row0[:, None], q.to(acc_dtype), 0.0), 0)
            lse2_row0 = tl.sum(tl.where(is_row0, lse2, 0.0), 0)
            for start in range(0, seq_len, BLOCK_N):
                keys = start + tl.arange(0, BLOCK_N)
                k_offs, k_in, k_real = _token_offsets(seq, keys, seq_len, n_inner, window_size,
                                                      grid_h, grid_w, windows_w, qkv_s0, qkv_s1,
                                                      qkv_s2, WINDOW)
                k = _load_tokens(qkv, k_offs, k_in, k_real, C + q_cols, dim_mask, qkv_s3,
                                 qkv_bias, HAS_BIAS)
                scores0 = tl.sum(k.to(acc_dtype) * q0[None, :], 1) * qk_scale
                tl.store(cls_probs + seq_head.to(tl.int64) * seq_len + keys,
                         tl.exp2(scores0 - lse2_row0), mask=k_in)


@triton.jit
def _delta_kernel(out, grad_out, delta, seq_len, n_inner, window_size, grid_h, grid_w, windows_w,
                  out_s0, out_s1, out_s2, out_s3, dout_s0, dout_s1, dout_s2, dout_s3,
                  HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, WINDOW: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # delta = rowsum(grad_out * out) per (sequence, head, row): the softmax backward's correction.
    # grad_out reads 0 on window padding rows (they are cropped), so their delta is 0.
    seq_head = tl.program_id(0)
    block = tl.program_id(1)
    seq = seq_head // HEADS
    head = seq_head % HEADS
    acc_dtype = delta.dtype.element_ty
    dims = tl.arange(0, BLOCK_D)
    cols = head * HEAD_DIM + dims
    mask_d = dims < HEAD_DIM
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    o_offs, in_seq, real = _token_offsets(seq, rows, seq_len, n_inner, window_size, grid_h, grid_w,
                                          windows_w, out_s0, out_s1, out_s2, WINDOW)
    do_offs, _, _ = _token_offsets(seq, rows, seq_len, n_inner, window_size, grid_h, grid_w,
                                   windows_w, dout_s0, dout_s1, dout_s2, WINDOW)
    mask = real[:, None] & mask_d[None, :]
    o = tl.load(out + o_offs[:, None] + cols[None, :] * out_s3, mask=mask, other=0.0)
    do = tl.load(grad_out + do_offs[:, None] + cols[None, :] * dout_s3, mask=mask, other=0.0)
    tl.store(delta + seq_head.to(tl.int64) * seq_len + rows,
             tl.sum(o.to(acc_dtype) * do.to(acc_dtype), 1), mask=in_seq)


@triton.jit
def _backward_kernel(qkv, qkv_bias, grad_out, lse, delta, grad_cls, grad_qkv, grad_bias_parts,
                     seq_len, n_inner, window_size, grid_h, grid_w, windows_w,
                     qkv_s0, qkv_s1, qkv_s2, qkv_s3, dout_s0, dout_s1, dout_s2, dout_s3,
                     dqkv_s0, dqkv_s1, dqkv_s2, dqkv_s3, scale, qk_scale,
                     HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, WINDOW: tl.constexpr,
                     HAS_BIAS: tl.constexpr, HAS_CLS_GRAD: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, GRADS: tl.constexpr):
    # grid: (sequences * heads, blocks). Program i computes dk, dv of key block i (sweeping the
    # query blocks), then dq of query block i (sweeping the key blocks): no atomics, and the
    # probabilities are recomputed from the saved log-sum-exp. GRADS "qkv" runs both phases,
    # "kv" and "q" one each (the split launch of _tiles).
    #   p = exp(s - lse), dv = p^T do, dp = do v^T (+ the class-row gradient on row 0),
    #   ds = p * (dp - delta), dk = scale * ds^T q, dq = scale * ds k.
    # The class row: cls_probs = p[0, :] adds grad_cls to dp[0, :]; the launcher has added
    # <cls_probs, grad_cls> to delta[0] already.
    seq_head = tl.program_id(0)
    block = tl.program_id(1)
    seq = seq_head // HEADS
    head = seq_head % HEADS
    C: tl.constexpr = HEADS * HEAD_DIM
    acc_dtype = lse.dtype.element_ty
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    q_cols = head * HEAD_DIM + dims
    row_base = seq_head.to(tl.int64) * seq_len  # of lse, delta and grad_cls, all (S, H, L)

    if GRADS != "q":
        # ---- dk, dv of key block `block`
        keys = block * BLOCK + tl.arange(0, BLOCK)
        k_offs, k_in, k_real = _token_offsets(seq, keys, seq_len, n_inner, window_size, grid_h, grid_w,
                                              windows_w, qkv_s0, qkv_s1, qkv_s2, WINDOW)
        k = _load_tokens(qkv, k_offs, k_in, k_real, C + q_cols, dim_mask, qkv_s3, qkv_bias, HAS_BIAS)
        v = _load_tokens(qkv, k_offs, k_in, k_real, 2 * C + q_cols, dim_mask, qkv_s3, qkv_bias,
                         HAS_BIAS)
        if HAS_CLS_GRAD:
            cls_grad = tl.load(grad_cls + row_base + keys, mask=k_in, other=0.0)
        dk = tl.zeros([BLOCK, BLOCK_D], acc_dtype)
        dv = tl.zeros([BLOCK, BLOCK_D], acc_dtype)
        for start in range(0, seq_len, BLOCK):
            rows = start + tl.arange(0, BLOCK)
            q_offs, q_in, q_real = _token_offsets(seq, rows, seq_len, n_inner, window_size, grid_h,
                                                  grid_w, windows_w, qkv_s0, qkv_s1, qkv_s2, WINDOW)
            do_offs, _, _ = _token_offsets(seq, rows, seq_len, n_inner, window_size, grid_h, grid_w,
                                           windows_w, dout_s0, dout_s1, dout_s2, WINDOW)
            q = _load_tokens(qkv, q_offs, q_in, q_real, q_cols, dim_mask, qkv_s3, qkv_bias, HAS_BIAS)
            do = tl.load(grad_out + do_offs[:, None] + q_cols[None, :] * dout_s3,
                         mask=q_real[:, None] & dim_mask[None, :], other=0.0)
            lse2 = tl.load(lse + row_base + rows, mask=q_in, other=0.0) * _LOG2E
            row_delta = tl.load(delta + row_base + rows, mask=q_in, other=0.0)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=acc_dtype) * qk_scale
            probs = tl.where(q_in[:, None] & k_in[None, :], tl.exp2(scores - lse2[:, None]), 0.0)
            dv += tl.dot(tl.trans(probs).to(do.dtype), do, input_precision=PRECISION,
                         out_dtype=acc_dtype)
            dprobs = tl.dot(do, tl.trans(v), input_precision=PRECISION, out_dtype=acc_dtype)
            if HAS_CLS_GRAD:
                dprobs += tl.where((rows == 0)[:, None], cls_grad[None, :], 0.0)
            dscores = probs * (dprobs - row_delta[:, None])
            dk += tl.dot(tl.trans(dscores).to(q.dtype), q, input_precision=PRECISION,
                         out_dtype=acc_dtype)
        dk *= scale
        dk_offs, _, _ = _token_offsets(seq, keys, seq_len, n_inner, window_size, grid_h, grid_w,
                                       windows_w, dqkv_s0, dqkv_s1, dqkv_s2, WINDOW)
        store_mask = k_real[:, None] & dim_mask[None, :]
        tl.store(grad_qkv + dk_offs[:, None] + (C + q_cols)[None, :] * dqkv_s3,
                 dk.to(grad_qkv.dtype.element_ty), mask=store_mask)
        tl.store(grad_qkv + dk_offs[:, None] + (2 * C + q_cols)[None, :] * dqkv_s3,
                 dv.to(grad_qkv.dtype.element_ty), mask=store_mask)
        if HAS_BIAS:
            # padding keys are the bias: their dk, dv summed per (sequence, block), added up by the
            # launcher in a fixed order (deterministic, unlike atomics)
            padding = (k_in & (k_real == 0))[:, None]
            part = grad_bias_parts + (seq.to(tl.int64) * tl.num_programs(1) + block) * 2 * C
            tl.store(part + q_cols, tl.sum(tl.where(padding, dk, 0.0), 0), mask=dim_mask)
            tl.store(part + C + q_cols, tl.sum(tl.where(padding, dv, 0.0), 0), mask=dim_mask)

    if GRADS != "kv":
        # ---- dq of query block `block` (padding queries have do = 0 and delta = 0, so dq = 0)
        rows = block * BLOCK + tl.arange(0, BLOCK)
        q_offs, q_in, q_real = _token_offsets(seq, rows, seq_len, n_inner, window_size, grid_h, grid_w,
                                              windows_w, qkv_s0, qkv_s1, qkv_s2, WINDOW)
        do_offs, _, _ = _token_offsets(seq, rows, seq_len, n_inner, window_size, grid_h, grid_w,
                                       windows_w, dout_s0, dout_s1, dout_s2, WINDOW)
        q = _load_tokens(qkv, q_offs, q_in, q_real, q_cols, dim_mask, qkv_s3, qkv_bias, HAS_BIAS)
        do = tl.load(grad_out + do_offs[:, None] + q_cols[None, :] * dout_s3,
                     mask=q_real[:, None] & dim_mask[None, :], other=0.0)
        lse2 = tl.load(lse + row_base + rows, mask=q_in, other=0.0) * _LOG2E
        row_delta = tl.load(delta + row_base + rows, mask=q_in, other=0.0)
        dq = tl.zeros([BLOCK, BLOCK_D], acc_dtype)
        for start in range(0, seq_len, BLOCK):
            keys = start + tl.arange(0, BLOCK)
            k_offs, k_in, k_real = _token_offsets(seq, keys, seq_len, n_inner, window_size, grid_h,
                                                  grid_w, windows_w, qkv_s0, qkv_s1, qkv_s2, WINDOW)
            k = _load_tokens(qkv, k_offs, k_in, k_real, C + q_cols, dim_mask, qkv_s3, qkv_bias,
                             HAS_BIAS)
            v = _load_tokens(qkv, k_offs, k_in, k_real, 2 * C + q_cols, dim_mask, qkv_s3, qkv_bias,
                             HAS_BIAS)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=acc_dtype) * qk_scale
            probs = tl.where(q_in[:, None] & k_in[None, :], tl.exp2(scores - lse2[:, None]), 0.0)
            dprobs = tl.dot(do, tl.trans(v), input_precision=PRECISION, out_dtype=acc_dtype)
            if HAS_CLS_GRAD:
                cls_grad = tl.load(grad_cls + row_base + keys, mask=k_in, other=0.0)
                dprobs += tl.where((rows == 0)[:, None], cls_grad[None, :], 0.0)
            dscores = probs * (dprobs - row_delta[:, None])
            dq += tl.dot(dscores.to(k.dtype), k, input_precision=PRECISION, out_dtype=acc_dtype)
        dq *= scale
        dq_offs, _, _ = _token_offsets(seq, rows, seq_len, n_inner, window_size, grid_h, grid_w,
                                       windows_w, dqkv_s0, dqkv_s1, dqkv_s2, WINDOW)
        tl.store(grad_qkv + dq_offs[:, None] + q_cols[None, :] * dqkv_s3,
                 dq.to(grad_qkv.dtype.element_ty), mask=q_real[:, None] & dim_mask[None, :])


# ---- launchers ----------------------------------------------------------------------------------

def _sequences(qkv: torch.Tensor, window: tuple[int, int, int] | None) -> tuple[int, int, tuple]:
    """(number of sequences S, sequence length L, the layout arguments of _token_offsets)."""
    if window is not None:
        size, grid_h, grid_w = window
        windows_w = triton.cdiv(grid_w, size)
        n_inner = triton.cdiv(grid_h, size) * windows_w
        return qkv.shape[0] * n_inner, size * size, (size * size, n_inner, size, grid_h, grid_w,
                                                     windows_w)
    n_inner = qkv.shape[1] if qkv.dim() == 4 else 1
    seq_len = qkv.shape[-2]
    return qkv.shape[0] * n_inner, seq_len, (seq_len, n_inner, 1, 1, 1, 1)


def _strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    """(outer, inner, token, channel) strides of a 3-D or 4-D token tensor."""
    if t.dim() == 3:
        return t.stride(0), 0, t.stride(1), t.stride(2)
    return tuple(t.stride())


def _precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: float32 as 3xTF32, float32 accuracy (the contract's 1e-4) on
    tensor cores; float64 exact; 16-bit dtypes keep Triton's default. AMD GPUs take only ieee."""
    if torch.version.hip:
        return "ieee"
    return {torch.float32: "tf32x3", torch.float64: "ieee"}.get(dtype, "tf32")


def attention_forward(qkv: torch.Tensor, qkv_bias: torch.Tensor | None, out: torch.Tensor,
                      lse: torch.Tensor, cls_probs: torch.Tensor | None, *, num_heads: int,
                      scale: float, window: tuple[int, int, int] | None) -> None:
    """Writes ``out`` (qkv's shape with C channels), ``lse`` (S, H, L) contiguous in the
    accumulation dtype and, when given, ``cls_probs`` (S, H, L) contiguous.

    ``window``: None, or (window_size, grid_h, grid_w) for a (B, grid_h * grid_w, 3C) qkv;
    ``qkv_bias`` (3C,) fills window padding (None: zeros).
    """
    forward_plan(qkv, qkv_bias, out, lse, cls_probs, num_heads=num_heads, scale=scale,
                 window=window).launch()


def forward_plan(qkv: torch.Tensor, qkv_bias: torch.Tensor | None, out: torch.Tensor,
                 lse: torch.Tensor, cls_probs: torch.Tensor | None, *, num_heads: int,
                 scale: float, window: tuple[int, int, int] | None) -> LaunchPlan:
    """The launch of attention_forward."""
    num_seq, seq_len, layout = _sequences(qkv, window)
    head_dim = qkv.shape[-1] // (3 * num_heads)
    block_d = max(16, triton.next_power_of_2(head_dim))
    tiles = _tiles(qkv.dtype, block_d)
    grid = (num_seq * num_heads, triton.cdiv(seq_len, tiles.forward_block))
    return LaunchPlan(
        "attention.fwd", _forward_kernel, grid,
        (qkv, qkv_bias, out, lse, cls_probs, *layout, *_strides(qkv), *_strides(out),
         scale * _LOG2E.value),
        dict(HEADS=num_heads, HEAD_DIM=head_dim, WINDOW=window is not None,
             HAS_BIAS=qkv_bias is not None, RETURN_CLS=cls_probs is not None,
             PRECISION=_precision(qkv.dtype), BLOCK_M=tiles.forward_block,
             BLOCK_N=tiles.forward_block, BLOCK_D=block_d),
        num_warps=tiles.forward_warps, num_stages=tiles.stages)


def attention_backward(grad_out: torch.Tensor, grad_cls_probs: torch.Tensor | None,
                       qkv: torch.Tensor, qkv_bias: torch.Tensor | None, out: torch.Tensor,
                       lse: torch.Tensor, cls_probs: torch.Tensor | None, grad_qkv: torch.Tensor,
                       grad_bias: torch.Tensor | None, *, num_heads: int, scale: float,
                       window: tuple[int, int, int] | None) -> None:
    """Writes ``grad_qkv`` (qkv's shape) and, with a bias, ``grad_bias`` (3C,): the gradient that
    reaches the bias through the window padding tokens (its q third is 0: padding queries are
    cropped). ``grad_cls_probs`` (S, H, L) is the gradient of ``cls_probs``, or None."""
    delta_plan, gradient_plans, delta, grad_cls_probs, grad_bias_parts = backward_plans(
        grad_out, grad_cls_probs, qkv, qkv_bias, out, lse, grad_qkv, num_heads=num_heads,
        scale=scale, window=window)
    delta_plan.launch()
    if grad_cls_probs is not None:
        delta[:, :, 0] += (cls_probs * grad_cls_probs).sum(-1)
    for plan in gradient_plans:
        plan.launch()
    if qkv_bias is not None:
        channels = qkv.shape[-1] // 3
        grad_bias[:channels].zero_()
        grad_bias[channels:].copy_(grad_bias_parts.sum(0))


def backward_plans(grad_out: torch.Tensor, grad_cls_probs: torch.Tensor | None,
                   qkv: torch.Tensor, qkv_bias: torch.Tensor | None, out: torch.Tensor,
                   lse: torch.Tensor, grad_qkv: torch.Tensor, *, num_heads: int, scale: float,
                   window: tuple[int, int, int] | None
                   ) -> tuple[LaunchPlan, list[LaunchPlan], torch.Tensor, torch.Tensor | None,
                              torch.Tensor | None]:
    """The launches of attention_backward (delta, then the gradients: one fused launch, or dk/dv
    and dq where _tiles splits it) and the buffers they share with it: delta, grad_cls_probs in
    the accumulation dtype (or None) and grad_bias_parts (None without a bias)."""
    num_seq, seq_len, layout = _sequences(qkv, window)
    channels = qkv.shape[-1] // 3
    head_dim = channels // num_heads
    block_d = max(16, triton.next_power_of_2(head_dim))
    tiles = _tiles(qkv.dtype, block_d)
    block = tiles.backward_block
    blocks = triton.cdiv(seq_len, block)
    delta = torch.empty(num_seq, num_heads, seq_len, device=qkv.device, dtype=lse.dtype)
    delta_plan = LaunchPlan(
        "attention.delta", _delta_kernel, (num_seq * num_heads, blocks),
        (out, grad_out, delta, *layout, *_strides(out), *_strides(grad_out)),
        dict(HEADS=num_heads, HEAD_DIM=head_dim, WINDOW=window is not None, BLOCK_M=block,
             BLOCK_D=block_d), num_warps=4 if block_d <= 64 else 8)
    if grad_cls_probs is not None:
        grad_cls_probs = grad_cls_probs.to(lse.dtype).contiguous()
    grad_bias_parts = None
    if qkv_bias is not None:
        grad_bias_parts = torch.empty(num_seq * blocks, 2 * channels, device=qkv.device,
                                      dtype=lse.dtype)
    gradient_plans = [LaunchPlan(
        "attention.bwd", _backward_kernel, (num_seq * num_heads, blocks),
        (qkv, qkv_bias, grad_out, lse, delta, grad_cls_probs, grad_qkv, grad_bias_parts, *layout,
         *_strides(qkv), *_strides(grad_out), *_strides(grad_qkv), scale, scale * _LOG2E.value),
        dict(HEADS=num_heads, HEAD_DIM=head_dim, WINDOW=window is not None,
             HAS_BIAS=qkv_bias is not None, HAS_CLS_GRAD=grad_cls_probs is not None,
             PRECISION=_precision(qkv.dtype), BLOCK=block, BLOCK_D=block_d, GRADS=grads),
        num_warps=tiles.backward_warps, num_stages=tiles.stages)
        for grads in (("kv", "q") if tiles.backward_split else ("qkv",))]
    return delta_plan, gradient_plans, delta, grad_cls_probs, grad_bias_parts
