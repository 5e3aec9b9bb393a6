// Pieces shared by the depthwise conv kernels (depthwise_conv.cu, pos_embed_norm.cu): element
// conversions, aligned vector access, the register-tiled channels-last conv tile, and the host-side
// dispatch from run-time dtype / kernel size / index width to template arguments.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>

#include "depthwise_conv.h"

// `kernel UK_LAUNCH(grid, block, shared_bytes, stream)(args...)` is the <<<...>>> launch, and
// UK_DYNAMIC_SHARED declares the extern __shared__ array. The host emulation of these sources
// (csrc/cuda_emulation, for tests without a GPU) defines both before this point.
#ifndef UK_LAUNCH
#define UK_LAUNCH(...) <<<__VA_ARGS__>>>
#endif
#ifndef UK_DYNAMIC_SHARED
#define UK_DYNAMIC_SHARED(type, name, alignment) extern __shared__ __align__(alignment) type name[]
#endif

namespace uniformer_kernels::cuda::detail {

// ---- types ---------------------------------------------------------------------------------------

template <typename T>
struct AccumOf {
  using type = float;
};
template <>
struct AccumOf<double> {
  using type = double;
};
template <typename T>
using Accum = typename AccumOf<T>::type;

// Channels per thread: one 16-byte load of activations.
template <typename T>
constexpr int kVecWidth = 16 / static_cast<int>(sizeof(T));

// A compile-time kernel size, or KernelSize<0, 0, 0>: sizes read at run time (any odd size up to
// kMaxKernelSize), the fallback for shapes without a specialisation.
template <int KD, int KH, int KW>
struct KernelSize {
  static constexpr bool kRuntime = KD == 0;
  static constexpr int kd = KD, kh = KH, kw = KW;
};
using RuntimeKernelSize = KernelSize<0, 0, 0>;

// Sizes in the index type of the launch: int32_t when every offset fits, else int64_t.
template <typename IndexT>
struct Geometry {
  IndexT batch, depth, height, width, channels;
  int kd, kh, kw;
};

template <typename IndexT>
Geometry<IndexT> make_geometry(const ConvShape& s) {
  return {static_cast<IndexT>(s.batch), static_cast<IndexT>(s.depth),
          static_cast<IndexT>(s.height), static_cast<IndexT>(s.width),
          static_cast<IndexT>(s.channels), s.kernel_d, s.kernel_h, s.kernel_w};
}

// Minimum resident blocks per SM for a kernel's __launch_bounds__. 0 emits no .minnctapersm and
// leaves ptxas its own register target, which for the run-time-size kernels (their loops over
// run-time kernel sizes) spilled 16-152 bytes on sm_80 and sm_90 (CUDA 13.0, bench/gpu_static.py);
// 1 lets ptxas keep every value in registers, at some occupancy, which a fallback can pay.
template <typename Size>
constexpr int kMinBlocksPerSM = Size::kRuntime ? 1 : 0;

// ---- element access ------------------------------------------------------------------------------

__device__ __forceinline__ float to_accum(float v) { return v; }
__device__ __forceinline__ double to_accum(double v) { return v; }
__device__ __forceinline__ float to_accum(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_accum(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
struct RoundTo;
template <>
struct RoundTo<float> {
  __device__ __forceinline__ static float from(float v) { return v; }
};
template <>
struct RoundTo<double> {
  __device__ __forceinline__ static double from(double v) { return v; }
};
template <>
struct RoundTo<__half> {
  __device__ __forceinline__ static __half from(float v) { return __float2half_rn(v); }
};
template <>
struct RoundTo<__nv_bfloat16> {
  __device__ __forceinline__ static __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
};

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// N consecutive elements at p (aligned to N elements: the launcher checks) as accumulation values.
template <int N, typename T, typename A>
__device__ __forceinline__ void load_vec(const T* p, A (&out)[N]) {
  const Vec<T, N> raw = *reinterpret_cast<const Vec<T, N>*>(p);
#pragma unroll
  for (int v = 0; v < N; ++v) out[v] = to_accum(raw.v[v]);
}

template <int N, typename T, typename A>
__device__ __forceinline__ void store_vec(T* p, const A (&in)[N]) {
  Vec<T, N> raw;
#pragma unroll
  for (int v = 0; v < N; ++v) raw.v[v] = RoundTo<T>::from(in[v]);
  *reinterpret_cast<Vec<T, N>*>(p) = raw;
}

// ---- the conv tile -------------------------------------------------------------------------------

// The run-time-size fallback (any odd size up to kMaxKernelSize): a loop over the taps of each
// kernel row, the tap's weights loaded once and each output's input element from L1. A
// kMaxKernelSize-wide window of weights in registers, as the compile-time tile keeps, spilled.
// The taps are summed in the same order as there.
template <int VEC, int TW, typename T, typename IndexT>
__device__ __forceinline__ void accumulate_conv_tile_runtime(Accum<T> (&acc)[TW][VEC],
                                                             const T* __restrict__ x,
                                                             const Accum<T>* __restrict__ weight,
                                                             const Geometry<IndexT>& g, IndexT n,
                                                             int d, int h, int w0, IndexT c0) {
  using A = Accum<T>;
  for (int i = 0; i < g.kd; ++i) {
    const int di = d + i - g.kd / 2;
    if (di < 0 || di >= g.depth) continue;
    for (int j = 0; j < g.kh; ++j) {
      const int hj = h + j - g.kh / 2;
      if (hj < 0 || hj >= g.height) continue;
      const T* x_row = x + ((n * g.depth + di) * g.height + hj) * g.width * g.channels + c0;
      const A* w_row = weight + static_cast<IndexT>((i * g.kh + j) * g.kw) * g.channels + c0;
      for (int s = 0; s < g.kw; ++s) {
        A wv[VEC];
        load_vec<VEC>(w_row + static_cast<IndexT>(s) * g.channels, wv);
#pragma unroll
        for (int t = 0; t < TW; ++t) {
          const int wi = w0 + t + s - g.kw / 2;
          if (wi < 0 || wi >= g.width) continue;
          A xv[VEC];
          load_vec<VEC>(x_row + static_cast<IndexT>(wi) * g.channels, xv);
#pragma unroll
          for (int v = 0; v < VEC; ++v) acc[t][v] += wv[v] * xv[v];
        }
      }
    }
  }
}

// Adds to acc[t][v] the taps of output (n, d, h, w0 + t), channel c0 + v, for TW consecutive
// outputs along W and VEC consecutive channels, for a kernel size known at compile time. Each input
// element of a row segment is loaded once and feeds every output of the tile that needs it (the W
// halo is reused from registers, the kernel row's weights held in KW register slots); the rows
// above, below and across depth are shared between neighbouring threads through L1.
template <typename Size, int VEC, int TW, typename T, typename IndexT>
__device__ __forceinline__ void accumulate_conv_tile(Accum<T> (&acc)[TW][VEC],
                                                     const T* __restrict__ x,
                                                     const Accum<T>* __restrict__ weight,
                                                     const Geometry<IndexT>& g, IndexT n, int d,
                                                     int h, int w0, IndexT c0) {
  using A = Accum<T>;
  if constexpr (Size::kRuntime) {
    accumulate_conv_tile_runtime<VEC, TW, T, IndexT>(acc, x, weight, g, n, d, h, w0, c0);
  } else {
    constexpr int kd = Size::kd, kh = Size::kh, kw = Size::kw;
    for (int i = 0; i < kd; ++i) {
      const int di = d + i - kd / 2;
      if (di < 0 || di >= g.depth) continue;
      for (int j = 0; j < kh; ++j) {
        const int hj = h + j - kh / 2;
        if (hj < 0 || hj >= g.height) continue;
        const T* x_row = x + ((n * g.depth + di) * g.height + hj) * g.width * g.channels + c0;
        const A* w_row = weight + static_cast<IndexT>((i * kh + j) * kw) * g.channels + c0;
        A w_slot[kw][VEC];
#pragma unroll
        for (int s = 0; s < kw; ++s) load_vec<VEC>(w_row + static_cast<IndexT>(s) * g.channels, w_slot[s]);
        // Input position p of the tile (column w0 - kw / 2 + p) meets output t at tap p - t.
#pragma unroll
        for (int p = 0; p < TW + kw - 1; ++p) {
          const int wi = w0 - kw / 2 + p;
          if (wi < 0 || wi >= g.width) continue;
          A xv[VEC];
          load_vec<VEC>(x_row + static_cast<IndexT>(wi) * g.channels, xv);
#pragma unroll
          for (int t = 0; t < TW; ++t) {
            const int s = p - t;
            if (s >= 0 && s < kw) {
#pragma unroll
              for (int v = 0; v < VEC; ++v) acc[t][v] += w_slot[s][v] * xv[v];
            }
          }
        }
      }
    }
  }
}

// ---- host-side dispatch --------------------------------------------------------------------------

template <typename T>
struct TypeTag {
  using type = T;
};

template <typename F>
cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      return f(TypeTag<float>{});
    case DType::kFloat16:
      return f(TypeTag<__half>{});
    case DType::kBFloat16:
      return f(TypeTag<__nv_bfloat16>{});
    case DType::kFloat64:
      return f(TypeTag<double>{});
  }
  return cudaErrorInvalidValue;
}

inline bool valid_kernel_size(int k) { return k >= 1 && k <= kMaxKernelSize && k % 2 == 1; }

inline bool valid_shape(const ConvShape& s) {
  return s.batch >= 0 && s.depth >= 0 && s.height >= 0 && s.width >= 0 && s.channels >= 0 &&
         valid_kernel_size(s.kernel_d) && valid_kernel_size(s.kernel_h) &&
         valid_kernel_size(s.kernel_w);
}

inline int64_t numel(const ConvShape& s) {
  return s.batch * s.depth * s.height * s.width * s.channels;
}

// int32 offsets are cheaper (fewer registers, 32-bit multiplies) and suffice unless an offset
// into the activations can pass 2^31 - 1.
inline bool needs_int64_index(const ConvShape& s) {
#ifdef UK_TEST_FORCE_INT64_INDEX  // host emulation tests: the 64-bit path on small shapes
  if (UK_TEST_FORCE_INT64_INDEX) return true;
#endif
  return numel(s) > std::numeric_limits<int32_t>::max();
}

inline bool aligned_to(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace uniformer_kernels::cuda::detail
