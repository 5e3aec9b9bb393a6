// Fused positional encoding + norm, channels-last: y = x + depthwise_conv(x) and z = norm(y) in one
// pass over x. Plain CUDA C++, see pos_embed_norm.h.
#include "pos_embed_norm.h"

#include <algorithm>
#include <type_traits>

#include "depthwise_tile.cuh"

namespace uniformer_kernels::cuda {
namespace {

using detail::Accum;
using detail::ceil_div;
using detail::Geometry;
using detail::KernelSize;
using detail::RuntimeKernelSize;

constexpr int kWarp = 32;
constexpr int kMaxWarps = 4;
// Outputs along W per lane: the W halo of the 3-wide kernel is shared between them.
constexpr int kTileW = 2;
// Static shared memory a block may use without opting in.
constexpr int64_t kDefaultSharedBytes = 48 * 1024;

// Sums v over the group_lanes lanes (a power of two <= 32, aligned) of each group; every lane of
// the group gets the same total (a butterfly: each step adds the same two values on both sides).
template <typename A>
__device__ __forceinline__ void group_allreduce(A (&v)[kTileW], int group_lanes) {
  for (int offset = group_lanes / 2; offset > 0; offset /= 2) {
#pragma unroll
    for (int t = 0; t < kTileW; ++t) v[t] += __shfl_xor_sync(0xffffffffu, v[t], offset);
  }
}

// As detail::kMinBlocksPerSM; float32 asks for 8 blocks of 128 threads (64 registers), because
// ptxas's own target spilled the 3x3x3 kernel on sm_90 (56 registers, 16 bytes). 8 blocks is the
// occupancy ptxas chose for the 3x3 one.
template <typename Size, typename T>
constexpr int kPosEmbedMinBlocks = std::is_same_v<T, float> && !Size::kRuntime
                                       ? 8
                                       : detail::kMinBlocksPerSM<Size>;

// A group of group_lanes lanes owns kTileW consecutive pixels of one row and all C channels of
// them, lane l taking channel vectors l, l + group_lanes, ...; so the LayerNorm reduction is a
// shuffle within the group. For LayerNorm the fp32 y values wait in shared memory (this lane's
// slots only, laid out [slot][lane] so a warp's accesses hit 32 different banks) for the mean and
// variance passes; the affine norm writes z straight away.
template <typename Size, int VEC, typename T, typename IndexT>
__global__ void __launch_bounds__(kMaxWarps* kWarp, kPosEmbedMinBlocks<Size, T>)
    pos_embed_norm_kernel(const T* __restrict__ x, const Accum<T>* __restrict__ weight,
                          const Accum<T>* __restrict__ bias,
                          const Accum<T>* __restrict__ norm_weight,
                          const Accum<T>* __restrict__ norm_bias, bool layer_norm, Accum<T> eps,
                          T* __restrict__ y, T* __restrict__ z, Accum<T>* __restrict__ mean_out,
                          Accum<T>* __restrict__ rstd_out, Geometry<IndexT> g, int group_lanes,
                          int64_t groups) {
  using A = Accum<T>;
  constexpr int TW = kTileW;
  UK_DYNAMIC_SHARED(unsigned char, pos_embed_shared, 16);

  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int group_lane = lane % group_lanes;
  const IndexT channel_vecs = g.channels / VEC;
  const int rounds = static_cast<int>((channel_vecs + group_lanes - 1) / group_lanes);
  const int64_t group = (static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + warp) *
                            (kWarp / group_lanes) +
                        lane / group_lanes;
  // No early return for groups past the end: their lanes still take part in the shuffles.
  const bool group_valid = group < groups;
  const IndexT w_tiles = (g.width + TW - 1) / TW;
  const IndexT item = group_valid ? static_cast<IndexT>(group) : IndexT(0);
  const int w0 = static_cast<int>(item % w_tiles) * TW;
  const IndexT row = item / w_tiles;  // (n, d, h) flattened
  const int h = static_cast<int>(row % g.height);
  const int d = static_cast<int>(row / g.height % g.depth);
  const IndexT n = row / g.height / g.depth;
  A* stash = reinterpret_cast<A*>(pos_embed_shared) +
             static_cast<int64_t>(warp) * rounds * TW * VEC * kWarp + lane;
  auto slot = [&](int round, int t, int v) -> A& { return stash[((round * TW + t) * VEC + v) * kWarp]; };

  A sum[TW];
#pragma unroll
  for (int t = 0; t < TW; ++t) sum[t] = A(0);
  for (int round = 0; round < rounds; ++round) {
    const IndexT cv = group_lane + static_cast<IndexT>(round) * group_lanes;
    if (!group_valid || cv >= channel_vecs) continue;
    const IndexT c0 = cv * VEC;
    A bias_v[VEC];
    detail::load_vec<VEC>(bias + c0, bias_v);
    A acc[TW][VEC];
#pragma unroll
    for (int t = 0; t < TW; ++t) {
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[t][v] = bias_v[v];
    }
    detail::accumulate_conv_tile<Size, VEC, TW>(acc, x, weight, g, n, d, h, w0, c0);
    A scale[VEC], shift[VEC];
    if (!layer_norm) {
      detail::load_vec<VEC>(norm_weight + c0, scale);
      detail::load_vec<VEC>(norm_bias + c0, shift);
    }
#pragma unroll
    for (int t = 0; t < TW; ++t) {
      if (w0 + t < g.width) {
        const IndexT offset = (row * g.width + w0 + t) * g.channels + c0;
        A xv[VEC];
        detail::load_vec<VEC>(x + offset, xv);
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[t][v] += xv[v];
        detail::store_vec<VEC>(y + offset, acc[t]);
        if (!layer_norm) {
          A zv[VEC];
#pragma unroll
          for (int v = 0; v < VEC; ++v) zv[v] = acc[t][v] * scale[v] + shift[v];
          detail::store_vec<VEC>(z + offset, zv);
        }
      }
      if (layer_norm) {
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          slot(round, t, v) = acc[t][v];
          sum[t] += acc[t][v];
        }
      }
    }
  }
  if (!layer_norm) return;

  // Two passes over the stashed y (mean, then the sum of squared deviations): no cancellation as
  // in E[y^2] - E[y]^2 when the mean is large against the spread.
  group_allreduce(sum, group_lanes);
  A mean[TW], rstd[TW];
#pragma unroll
  for (int t = 0; t < TW; ++t) mean[t] = sum[t] / static_cast<A>(g.channels);
  A sq[TW];
#pragma unroll
  for (int t = 0; t < TW; ++t) sq[t] = A(0);
  for (int round = 0; round < rounds; ++round) {
    const IndexT cv = group_lane + static_cast<IndexT>(round) * group_lanes;
    if (!group_valid || cv >= channel_vecs) continue;
#pragma unroll
    for (int t = 0; t < TW; ++t) {
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const A dev = slot(round, t, v) - mean[t];
        sq[t] += dev * dev;
      }
    }
  }
  group_allreduce(sq, group_lanes);
#pragma unroll
  for (int t = 0; t < TW; ++t) rstd[t] = A(1) / sqrt(sq[t] / static_cast<A>(g.channels) + eps);

  for (int round = 0; round < rounds; ++round) {
    const IndexT cv = group_lane + static_cast<IndexT>(round) * group_lanes;
    if (!group_valid || cv >= channel_vecs) continue;
    const IndexT c0 = cv * VEC;
    A scale[VEC], shift[VEC];
    detail::load_vec<VEC>(norm_weight + c0, scale);
    detail::load_vec<VEC>(norm_bias + c0, shift);
#pragma unroll
    for (int t = 0; t < TW; ++t) {
      if (w0 + t >= g.width) break;
      A zv[VEC];
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        zv[v] = (slot(round, t, v) - mean[t]) * rstd[t] * scale[v] + shift[v];
      }
      detail::store_vec<VEC>(z + (row * g.width + w0 + t) * g.channels + c0, zv);
    }
  }
  if (group_valid && group_lane == 0) {
#pragma unroll
    for (int t = 0; t < TW; ++t) {
      if (w0 + t >= g.width) break;
      mean_out[row * g.width + w0 + t] = mean[t];
      rstd_out[row * g.width + w0 + t] = rstd[t];
    }
  }
}

// UniFormer's positional encodings: 3x3 (image) and 3x3x3 (video); others take the run-time-size
// kernel.
template <typename F>
cudaError_t dispatch_kernel_size(const ConvShape& s, F&& f) {
  if (s.kernel_d == 1 && s.kernel_h == 3 && s.kernel_w == 3) return f(KernelSize<1, 3, 3>{});
  if (s.kernel_d == 3 && s.kernel_h == 3 && s.kernel_w == 3) return f(KernelSize<3, 3, 3>{});
  return f(RuntimeKernelSize{});
}

int shared_bytes_optin(int device) {
  int bytes = 0;
  if (cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) !=
      cudaSuccess) {
    return -1;
  }
  return bytes;
}

// Shared memory one warp needs to stash y for LayerNorm: rounds x kTileW x VEC values per lane.
int64_t stash_bytes_per_warp(int64_t channels, int vec, size_t accum_bytes, int group_lanes) {
  const int64_t rounds = ceil_div(channels / vec, group_lanes);
  return rounds * kTileW * vec * kWarp * static_cast<int64_t>(accum_bytes);
}

struct PosEmbedArgs {
  const void *x, *weight, *bias, *norm_weight, *norm_bias;
  bool layer_norm;
  double eps;
  void *y, *z, *mean, *rstd;
};

template <typename Size, int VEC, typename T, typename IndexT>
cudaError_t launch(const PosEmbedArgs& a, const ConvShape& shape, cudaStream_t stream) {
  using A = Accum<T>;
  const int64_t channel_vecs = shape.channels / VEC;
  int group_lanes = 1;
  while (group_lanes < kWarp && group_lanes < channel_vecs) group_lanes *= 2;
  const int64_t groups =
      shape.batch * shape.depth * shape.height * ceil_div(shape.width, kTileW);

  int warps = kMaxWarps;
  int64_t shared_bytes = 0;
  auto kernel = pos_embed_norm_kernel<Size, VEC, T, IndexT>;
  if (a.layer_norm) {
    int device = 0;
    cudaError_t status = cudaGetDevice(&device);
    if (status != cudaSuccess) return status;
    const int64_t per_warp = stash_bytes_per_warp(shape.channels, VEC, sizeof(A), group_lanes);
    const int64_t limit = shared_bytes_optin(device);
    warps = static_cast<int>(std::min<int64_t>(kMaxWarps, limit / per_warp));
    if (warps < 1) return cudaErrorInvalidValue;  // more channels than pos_embed_norm_max_channels
    shared_bytes = warps * per_warp;
    if (shared_bytes > kDefaultSharedBytes) {
      status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(shared_bytes));
      if (status != cudaSuccess) return status;
    }
  }
  const int64_t groups_per_block = static_cast<int64_t>(warps) * (kWarp / group_lanes);
  const int64_t blocks = ceil_div(groups, groups_per_block);
  if (blocks > std::numeric_limits<int32_t>::max()) return cudaErrorInvalidValue;
  kernel UK_LAUNCH(static_cast<unsigned>(blocks), warps * kWarp, static_cast<size_t>(shared_bytes),
                   stream)(
      static_cast<const T*>(a.x), static_cast<const A*>(a.weight), static_cast<const A*>(a.bias),
      static_cast<const A*>(a.norm_weight), static_cast<const A*>(a.norm_bias), a.layer_norm,
      static_cast<A>(a.eps), static_cast<T*>(a.y), static_cast<T*>(a.z), static_cast<A*>(a.mean), static_cast<A*>(a.rstd),
      detail::make_geometry<IndexT>(shape), group_lanes, groups);
  return cudaGetLastError();
}

template <int VEC, typename T>
cudaError_t launch_vec(const PosEmbedArgs& a, const ConvShape& shape, cudaStream_t stream) {
  // As in depthwise_conv.cu: huge tensors and odd channel counts take the run-time-size kernel.
  if (detail::needs_int64_index(shape)) {
    return launch<RuntimeKernelSize, VEC, T, int64_t>(a, shape, stream);
  }
  if constexpr (VEC == 1) {
    return launch<RuntimeKernelSize, VEC, T, int32_t>(a, shape, stream);
  } else {
    return dispatch_kernel_size(
        shape, [&](auto size) { return launch<decltype(size), VEC, T, int32_t>(a, shape, stream); });
  }
}

}  // namespace

int64_t pos_embed_norm_max_channels(DType dtype, int device) {
  const int64_t limit = shared_bytes_optin(device);
  if (limit < 0) return -1;
  const size_t accum_bytes = dtype == DType::kFloat64 ? sizeof(double) : sizeof(float);
  int vec = 0;
  detail::dispatch_dtype(dtype, [&](auto tag) {
    vec = detail::kVecWidth<typename decltype(tag)::type>;
    return cudaSuccess;
  });
  // One warp per block, group_lanes = 32. Whole rounds of vec * 32 channels: for the vectorised
  // kernel that is exact, and the scalar one (vec 1) stashes no more for the same channels.
  const int64_t slots_per_lane = limit / (kWarp * static_cast<int64_t>(accum_bytes));
  return slots_per_lane / (kTileW * vec) * vec * kWarp;
}

cudaError_t launch_pos_embed_norm(DType dtype, const void* x, const void* weight, const void* bias,
                                  const void* norm_weight, const void* norm_bias, PosEmbedNorm norm,
                                  double eps, void* y, void* z, void* mean, void* rstd,
                                  const ConvShape& shape, cudaStream_t stream) {
  if (!detail::valid_shape(shape)) return cudaErrorInvalidValue;
  if (detail::numel(shape) == 0) return cudaSuccess;
  const PosEmbedArgs args{x, weight, bias, norm_weight, norm_bias, norm == PosEmbedNorm::kLayerNorm,
                          eps, y, z, mean, rstd};
  return detail::dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = Accum<T>;
    constexpr int kVec = detail::kVecWidth<T>;
    const size_t act = sizeof(T) * kVec, acc = sizeof(A) * kVec;
    const bool vectorised =
        shape.channels % kVec == 0 && detail::aligned_to(x, act) && detail::aligned_to(y, act) &&
        detail::aligned_to(z, act) && detail::aligned_to(weight, acc) &&
        detail::aligned_to(bias, acc) && detail::aligned_to(norm_weight, acc) &&
        detail::aligned_to(norm_bias, acc);
    return vectorised ? launch_vec<kVec, T>(args, shape, stream)
                      : launch_vec<1, T>(args, shape, stream);
  });
}

}  // namespace uniformer_kernels::cuda
