// Depthwise conv, channels-last, 2D and 3D: forward (also the input gradient, as a conv of grad_y
// with the flipped weight) and the weight / bias gradient. Plain CUDA C++, see depthwise_conv.h.
#include "depthwise_conv.h"

#include <algorithm>

#include "depthwise_tile.cuh"

namespace uniformer_kernels::cuda {
namespace {

using detail::Accum;
using detail::ceil_div;
using detail::Geometry;
using detail::KernelSize;
using detail::RuntimeKernelSize;

// ---- forward -------------------------------------------------------------------------------------

constexpr int kForwardThreads = 256;
// Outputs along W per thread: each input column is loaded once for all of them.
constexpr int kForwardTileW = 4;

// One thread: VEC channels of kForwardTileW consecutive outputs of one row. Threads are ordered
// channels fastest, so a warp reads contiguous channel runs of the same pixels.
template <typename Size, int VEC, typename T, typename IndexT>
__global__ void __launch_bounds__(kForwardThreads, detail::kMinBlocksPerSM<Size>)
    depthwise_conv_forward_kernel(const T* __restrict__ x, const Accum<T>* __restrict__ weight,
                                  const Accum<T>* __restrict__ bias, bool residual,
                                  T* __restrict__ y, Geometry<IndexT> g, int64_t items) {
  using A = Accum<T>;
  constexpr int TW = kForwardTileW;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kForwardThreads + threadIdx.x;
  if (item >= items) return;
  const IndexT channel_vecs = g.channels / VEC;
  const IndexT w_tiles = (g.width + TW - 1) / TW;
  IndexT rest = static_cast<IndexT>(item);
  const IndexT c0 = rest % channel_vecs * VEC;
  rest /= channel_vecs;
  const int w0 = static_cast<int>(rest % w_tiles) * TW;
  const IndexT row = rest / w_tiles;  // (n, d, h) flattened
  const int h = static_cast<int>(row % g.height);
  const int d = static_cast<int>(row / g.height % g.depth);
  const IndexT n = row / g.height / g.depth;

  A bias_v[VEC];
  if (bias != nullptr) {
    detail::load_vec<VEC>(bias + c0, bias_v);
  } else {
#pragma unroll
    for (int v = 0; v < VEC; ++v) bias_v[v] = A(0);
  }
  A acc[TW][VEC];
#pragma unroll
  for (int t = 0; t < TW; ++t) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) acc[t][v] = bias_v[v];
  }
  detail::accumulate_conv_tile<Size, VEC, TW>(acc, x, weight, g, n, d, h, w0, c0);

#pragma unroll
  for (int t = 0; t < TW; ++t) {
    const int w = w0 + t;
    if (w >= g.width) break;
    const IndexT offset = (row * g.width + w) * g.channels + c0;
    if (residual) {
      A xv[VEC];
      detail::load_vec<VEC>(x + offset, xv);
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[t][v] += xv[v];
    }
    detail::store_vec<VEC>(y + offset, acc[t]);
  }
}

// The sizes UniFormer uses get their own instantiation; anything else runs the run-time-size
// kernel. 2D convs arrive as 3D with KD = 1.
template <typename F>
cudaError_t dispatch_forward_kernel_size(const ConvShape& s, F&& f) {
  const int kd = s.kernel_d, kh = s.kernel_h, kw = s.kernel_w;
  if (kd == 1 && kh == 3 && kw == 3) return f(KernelSize<1, 3, 3>{});
  if (kd == 1 && kh == 5 && kw == 5) return f(KernelSize<1, 5, 5>{});
  if (kd == 1 && kh == 7 && kw == 7) return f(KernelSize<1, 7, 7>{});
  if (kd == 3 && kh == 3 && kw == 3) return f(KernelSize<3, 3, 3>{});
  if (kd == 5 && kh == 5 && kw == 5) return f(KernelSize<5, 5, 5>{});
  if (kd == 3 && kh == 1 && kw == 1) return f(KernelSize<3, 1, 1>{});
  return f(RuntimeKernelSize{});
}

template <typename Size, int VEC, typename T, typename IndexT>
cudaError_t launch_forward(const T* x, const Accum<T>* weight, const Accum<T>* bias,
                           bool residual, T* y, const ConvShape& shape, cudaStream_t stream) {
  const int64_t items = shape.batch * shape.depth * shape.height *
                        ceil_div(shape.width, kForwardTileW) * (shape.channels / VEC);
  const int64_t blocks = ceil_div(items, kForwardThreads);
  if (blocks > std::numeric_limits<int32_t>::max()) return cudaErrorInvalidValue;
  depthwise_conv_forward_kernel<Size, VEC, T, IndexT>
      UK_LAUNCH(static_cast<unsigned>(blocks), kForwardThreads, 0, stream)(
          x, weight, bias, residual, y, detail::make_geometry<IndexT>(shape), items);
  return cudaGetLastError();
}

template <int VEC, typename T>
cudaError_t launch_forward_vec(const T* x, const Accum<T>* weight, const Accum<T>* bias,
                               bool residual, T* y, const ConvShape& shape,
                               cudaStream_t stream) {
  // Tensors past 2^31 elements, and channel counts that are no multiple of the vector width (not
  // UniFormer's), are rare enough that the run-time-size kernel serves them alone: fewer
  // instantiations, faster builds.
  if (detail::needs_int64_index(shape)) {
    return launch_forward<RuntimeKernelSize, VEC, T, int64_t>(x, weight, bias, residual, y, shape,
                                                              stream);
  }
  if constexpr (VEC == 1) {
    return launch_forward<RuntimeKernelSize, VEC, T, int32_t>(x, weight, bias, residual, y, shape,
                                                              stream);
  } else {
    return dispatch_forward_kernel_size(shape, [&](auto size) {
      return launch_forward<decltype(size), VEC, T, int32_t>(x, weight, bias, residual, y, shape,
                                                             stream);
    });
  }
}

// ---- weight / bias gradient ----------------------------------------------------------------------

// A block is kBwdChannels channels x kBwdRows thread rows; blocks are (channel block, depth tap,
// chunk of row segments). A row segment is a run of output columns of one output row; each thread
// row walks its segments, sliding the input window along W in registers.
constexpr int kBwdChannels = 32;
constexpr int kBwdRows = 8;
// Blocks the chunking aims for: a few waves on an H100 / A100. A function of the shape only, so
// the deterministic summation order does not change with the GPU.
constexpr int64_t kBwdTargetBlocks = 1024;
// Rows are cut into segments only while there are too few rows to fill the blocks, and never
// below this width: each segment reloads a kernel-wide halo.
constexpr int64_t kBwdMinSegmentWidth = 8;
// Accumulators written to shared memory per round of the in-block reduction.
constexpr int kBwdReduceGroup = kBwdRows;

struct BackwardWeightPlan {
  int64_t channel_blocks, segment_width, segments_per_row, segments_per_chunk, chunks;
};

BackwardWeightPlan plan_backward_weight(const ConvShape& s) {
  const int64_t rows = s.batch * s.depth * s.height;
  const int64_t channel_blocks = ceil_div(s.channels, kBwdChannels);
  const int64_t wanted_chunks = ceil_div(kBwdTargetBlocks, channel_blocks * s.kernel_d);
  const int64_t wanted_segments = wanted_chunks * kBwdRows;  // one per thread row
  const int64_t cuts = std::clamp<int64_t>(ceil_div(wanted_segments, std::max<int64_t>(rows, 1)), 1,
                                           std::max<int64_t>(1, s.width / kBwdMinSegmentWidth));
  const int64_t segment_width = std::max<int64_t>(1, ceil_div(s.width, cuts));
  const int64_t segments_per_row = std::max<int64_t>(1, ceil_div(s.width, segment_width));
  const int64_t segments = rows * segments_per_row;
  const int64_t chunks =
      std::clamp<int64_t>(wanted_chunks, 1, std::max<int64_t>(1, ceil_div(segments, kBwdRows)));
  const int64_t segments_per_chunk = std::max<int64_t>(1, ceil_div(segments, chunks));
  return {channel_blocks, segment_width, segments_per_row, segments_per_chunk,
          std::max<int64_t>(1, ceil_div(segments, segments_per_chunk))};
}

// grad_w[i, j, k, c] = sum over outputs of grad_y * x[tap-shifted]; grad_b[c] = sum of grad_y.
// Every thread keeps all KH x KW taps of its depth tap i (blockIdx.y) and channel in registers, with
// a KW-wide ring of input columns per kernel row: per output column it loads grad_y once and one
// new input column per kernel row. The block then sums its kBwdRows thread rows in a fixed order
// and either adds the result atomically (partials == nullptr) or stores it as this chunk's partial.
template <int KH, int KW, typename T, typename IndexT>
__global__ void __launch_bounds__(kBwdChannels* kBwdRows)
    depthwise_conv_backward_weight_kernel(const T* __restrict__ grad_y, const T* __restrict__ x,
                                          Geometry<IndexT> g, int segment_width,
                                          int segments_per_row, IndexT segments_per_chunk,
                                          Accum<T>* __restrict__ grad_w,
                                          Accum<T>* __restrict__ grad_b,
                                          Accum<T>* __restrict__ partials) {
  using A = Accum<T>;
  constexpr bool kRuntime = KH == 0;
  constexpr int kh_cap = kRuntime ? kMaxKernelSize : KH;
  constexpr int kw_cap = kRuntime ? kMaxKernelSize : KW;
  constexpr int kTaps = kh_cap * kw_cap;
  const int kh = kRuntime ? g.kh : KH;
  const int kw = kRuntime ? g.kw : KW;
  const int slot0 = kw_cap / 2 - kw / 2;  // as in accumulate_conv_tile: kernel row centred in ring
  const int i = blockIdx.y;
  const bool with_bias = i == 0;  // one depth tap's blocks sum grad_b
  const int tx = threadIdx.x, ty = threadIdx.y;
  const IndexT c = static_cast<IndexT>(blockIdx.x) * kBwdChannels + tx;
  const IndexT segments = g.batch * g.depth * g.height * segments_per_row;
  const IndexT chunk_begin = static_cast<IndexT>(blockIdx.z) * segments_per_chunk;
  const IndexT chunk_end =
      segments - chunk_begin < segments_per_chunk ? segments : chunk_begin + segments_per_chunk;
  const IndexT row_stride = g.width * g.channels;

  A acc[kTaps];
#pragma unroll
  for (int a = 0; a < kTaps; ++a) acc[a] = A(0);
  A bias_acc = A(0);

  if (c < g.channels) {
    for (IndexT segment = chunk_begin + ty; segment < chunk_end; segment += kBwdRows) {
      const IndexT r = segment / segments_per_row;  // output row (n, d, h) flattened
      const int w_begin = static_cast<int>(segment % segments_per_row) * segment_width;
      const int w_end = min(w_begin + segment_width, static_cast<int>(g.width));
      const int h = static_cast<int>(r % g.height);
      const int d = static_cast<int>(r / g.height % g.depth);
      const IndexT n = r / g.height / g.depth;
      const int di = d + i - g.kd / 2;
      const bool plane_valid = di >= 0 && di < g.depth;
      if (!plane_valid && !with_bias) continue;
      const T* gy_row = grad_y + r * row_stride + c;
      // x_rows[j]: kernel row j's input row, null where it falls in the zero padding.
      const T* x_rows[kh_cap];
      // ring[j][(q + s) % kw_cap] holds input column w - kw_cap / 2 + s at step q of an unrolled
      // group of kw_cap columns, so the window slides with no register moves.
      A ring[kh_cap][kw_cap];
#pragma unroll
      for (int j = 0; j < kh_cap; ++j) {
        const int hj = h + j - kh / 2;
        const bool valid = plane_valid && j < kh && hj >= 0 && hj < g.height;
        x_rows[j] = valid ? x + ((n * g.depth + di) * g.height + hj) * row_stride + c : nullptr;
#pragma unroll
        for (int s = 0; s < kw_cap; ++s) {
          const int wi = w_begin + s - kw_cap / 2;  // column in slot s before the first step
          ring[j][s] = x_rows[j] != nullptr && s < kw_cap - 1 && wi >= 0 && wi < g.width
                           ? detail::to_accum(x_rows[j][static_cast<IndexT>(wi) * g.channels])
                           : A(0);
        }
      }
      for (int w_base = w_begin; w_base < w_end; w_base += kw_cap) {
#pragma unroll
        for (int q = 0; q < kw_cap; ++q) {
          const int w = w_base + q;
          if (w >= w_end) break;
          const A go = detail::to_accum(gy_row[static_cast<IndexT>(w) * g.channels]);
          bias_acc += go;
          const int newest = w + kw_cap / 2;
#pragma unroll
          for (int j = 0; j < kh_cap; ++j) {
            ring[j][(q + kw_cap - 1) % kw_cap] =
                x_rows[j] != nullptr && newest < g.width
                    ? detail::to_accum(x_rows[j][static_cast<IndexT>(newest) * g.channels])
                    : A(0);
#pragma unroll
            for (int s = 0; s < kw_cap; ++s) acc[j * kw_cap + s] += go * ring[j][(q + s) % kw_cap];
          }
        }
      }
    }
  }

  // Sum the kBwdRows thread rows: kBwdReduceGroup accumulators per round, thread row ty adding up
  // accumulator (round + ty) in row order. Accumulator kTaps is the bias.
  __shared__ A stage[kBwdReduceGroup][kBwdRows][kBwdChannels];
  const int taps = g.kd * kh * kw;
  A* partial = partials == nullptr
                   ? nullptr
                   : partials + static_cast<int64_t>(blockIdx.z) * (taps + 1) * g.channels;
#pragma unroll
  for (int round = 0; round < kTaps + 1; round += kBwdReduceGroup) {
#pragma unroll
    for (int q = 0; q < kBwdReduceGroup; ++q) {
      if (round + q < kTaps) stage[q][ty][tx] = acc[round + q];
      if (round + q == kTaps) stage[q][ty][tx] = bias_acc;
    }
    __syncthreads();
    const int a = round + ty;
    const int j = a / kw_cap, s = a % kw_cap;
    const bool is_bias = a == kTaps;
    const bool is_tap = a < kTaps && j < kh && s >= slot0 && s < kw_cap - slot0;
    if (c < g.channels && ((is_bias && with_bias) || is_tap)) {
      A sum = A(0);
#pragma unroll
      for (int r = 0; r < kBwdRows; ++r) sum += stage[ty][r][tx];
      const int64_t tap = is_bias ? taps : (i * kh + j) * kw + (s - slot0);
      if (partial != nullptr) {
        partial[tap * g.channels + c] = sum;
      } else if (is_bias) {
        atomicAdd(grad_b + c, sum);
      } else {
        atomicAdd(grad_w + tap * g.channels + c, sum);
      }
    }
    __syncthreads();
  }
}

// Deterministic second pass: element e of (grad_w, grad_b) flattened is the sum over chunks of the
// partials, each thread row summing every kBwdRows-th chunk, then the rows added in order.
template <typename A>
__global__ void __launch_bounds__(kBwdChannels* kBwdRows)
    sum_chunk_partials_kernel(const A* __restrict__ partials, int64_t chunks,
                              int64_t elems_per_chunk, int64_t weight_elems, A* __restrict__ grad_w,
                              A* __restrict__ grad_b) {
  __shared__ A stage[kBwdRows][kBwdChannels];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kBwdChannels + tx;
  A sum = A(0);
  if (e < elems_per_chunk) {
    for (int64_t k = ty; k < chunks; k += kBwdRows) sum += partials[k * elems_per_chunk + e];
  }
  stage[ty][tx] = sum;
  __syncthreads();
  if (ty != 0 || e >= elems_per_chunk) return;
  A total = A(0);
#pragma unroll
  for (int r = 0; r < kBwdRows; ++r) total += stage[r][tx];
  if (e < weight_elems) {
    grad_w[e] = total;
  } else {
    grad_b[e - weight_elems] = total;
  }
}

template <typename F>
cudaError_t dispatch_backward_kernel_size(const ConvShape& s, F&& f) {
  const int kh = s.kernel_h, kw = s.kernel_w;
  if (kh == 3 && kw == 3) return f(KernelSize<1, 3, 3>{});
  if (kh == 5 && kw == 5) return f(KernelSize<1, 5, 5>{});
  if (kh == 7 && kw == 7) return f(KernelSize<1, 7, 7>{});
  if (kh == 1 && kw == 1) return f(KernelSize<1, 1, 1>{});
  return f(RuntimeKernelSize{});
}

// partials == nullptr: atomic variant (grad_w, grad_b zeroed first by the caller).
template <typename T>
cudaError_t launch_backward_weight(const T* grad_y, const T* x, Accum<T>* grad_w,
                                   Accum<T>* grad_b, Accum<T>* partials, const ConvShape& shape,
                                   cudaStream_t stream) {
  const BackwardWeightPlan plan = plan_backward_weight(shape);
  const dim3 grid(static_cast<unsigned>(plan.channel_blocks), static_cast<unsigned>(shape.kernel_d),
                  static_cast<unsigned>(plan.chunks));
  const dim3 block(kBwdChannels, kBwdRows);
  auto launch = [&](auto size, auto index) {
    using Size = decltype(size);
    using IndexT = decltype(index);
    depthwise_conv_backward_weight_kernel<Size::kh, Size::kw, T, IndexT> UK_LAUNCH(
        grid, block, 0, stream)(
        grad_y, x, detail::make_geometry<IndexT>(shape), static_cast<int>(plan.segment_width),
        static_cast<int>(plan.segments_per_row), static_cast<IndexT>(plan.segments_per_chunk),
        grad_w, grad_b, partials);
    return cudaGetLastError();
  };
  cudaError_t status;
  if (detail::needs_int64_index(shape)) {
    status = launch(RuntimeKernelSize{}, int64_t{});
  } else {
    status = dispatch_backward_kernel_size(shape, [&](auto size) { return launch(size, int32_t{}); });
  }
  if (status != cudaSuccess || partials == nullptr) return status;

  const int64_t weight_elems =
      static_cast<int64_t>(shape.kernel_d) * shape.kernel_h * shape.kernel_w * shape.channels;
  const int64_t elems_per_chunk = weight_elems + shape.channels;
  sum_chunk_partials_kernel<Accum<T>> UK_LAUNCH(
      static_cast<unsigned>(ceil_div(elems_per_chunk, kBwdChannels)), block, 0, stream)(
      partials, plan.chunks, elems_per_chunk, weight_elems, grad_w, grad_b);
  return cudaGetLastError();
}

int64_t weight_elems(const ConvShape& s) {
  return static_cast<int64_t>(s.kernel_d) * s.kernel_h * s.kernel_w * s.channels;
}

size_t accum_bytes(DType dtype) { return dtype == DType::kFloat64 ? sizeof(double) : sizeof(float); }

// Zeroes the gradients: what an empty input yields, and where the atomic variant adds into.
cudaError_t zero_weight_grads(DType dtype, void* grad_w, void* grad_b, const ConvShape& shape,
                              cudaStream_t stream) {
  const size_t bytes = accum_bytes(dtype);
  cudaError_t status = cudaMemsetAsync(grad_w, 0, weight_elems(shape) * bytes, stream);
  if (status != cudaSuccess) return status;
  return cudaMemsetAsync(grad_b, 0, shape.channels * bytes, stream);
}

}  // namespace

cudaError_t launch_depthwise_conv_forward(DType dtype, const void* x, const void* weight,
                                          const void* bias, bool residual, void* y,
                                          const ConvShape& shape, cudaStream_t stream) {
  if (!detail::valid_shape(shape)) return cudaErrorInvalidValue;
  if (detail::numel(shape) == 0) return cudaSuccess;
  return detail::dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = Accum<T>;
    constexpr int kVec = detail::kVecWidth<T>;
    const auto* x_t = static_cast<const T*>(x);
    const auto* w_t = static_cast<const A*>(weight);
    const auto* b_t = static_cast<const A*>(bias);
    auto* y_t = static_cast<T*>(y);
    const bool vectorised = shape.channels % kVec == 0 &&
                            detail::aligned_to(x, sizeof(T) * kVec) &&
                            detail::aligned_to(y, sizeof(T) * kVec) &&
                            detail::aligned_to(weight, sizeof(A) * kVec) &&
                            (bias == nullptr || detail::aligned_to(bias, sizeof(A) * kVec));
    return vectorised ? launch_forward_vec<kVec>(x_t, w_t, b_t, residual, y_t, shape, stream)
                      : launch_forward_vec<1>(x_t, w_t, b_t, residual, y_t, shape, stream);
  });
}

int64_t depthwise_conv_backward_weight_workspace_elems(const ConvShape& shape) {
  return plan_backward_weight(shape).chunks * (weight_elems(shape) + shape.channels);
}

cudaError_t launch_depthwise_conv_backward_weight_deterministic(
    DType dtype, const void* grad_y, const void* x, void* workspace, void* grad_weight,
    void* grad_bias, const ConvShape& shape, cudaStream_t stream) {
  if (!detail::valid_shape(shape)) return cudaErrorInvalidValue;
  if (detail::numel(shape) == 0) return zero_weight_grads(dtype, grad_weight, grad_bias, shape, stream);
  return detail::dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = Accum<T>;
    return launch_backward_weight<T>(static_cast<const T*>(grad_y), static_cast<const T*>(x),
                                     static_cast<A*>(grad_weight), static_cast<A*>(grad_bias),
                                     static_cast<A*>(workspace), shape, stream);
  });
}

cudaError_t launch_depthwise_conv_backward_weight_atomic(DType dtype, const void* grad_y,
                                                         const void* x, void* grad_weight,
                                                         void* grad_bias, const ConvShape& shape,
                                                         cudaStream_t stream) {
  if (!detail::valid_shape(shape)) return cudaErrorInvalidValue;
  cudaError_t status = zero_weight_grads(dtype, grad_weight, grad_bias, shape, stream);
  if (status != cudaSuccess || detail::numel(shape) == 0) return status;
  return detail::dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = Accum<T>;
    return launch_backward_weight<T>(static_cast<const T*>(grad_y), static_cast<const T*>(x),
                                     static_cast<A*>(grad_weight), static_cast<A*>(grad_bias),
                                     nullptr, shape, stream);
  });
}

}  // namespace uniformer_kernels::cuda
