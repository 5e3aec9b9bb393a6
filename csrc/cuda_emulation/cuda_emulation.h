// Host emulation of the slice of CUDA that csrc/cuda/*.cu use, so g++ can compile those sources
// unchanged and run their kernels on the CPU (tests/test_cuda_emulation.py). The shims in include/
// (cuda_runtime.h, cuda_fp16.h, ...) stand in for the toolkit's headers and include this file.
//
// A launch runs the grid's blocks one after another (in a shuffled order when a schedule seed is
// set). A block's threads are fibers on one OS thread, switched cooperatively: a thread runs until
// it waits at __syncthreads or a warp shuffle, so both are real rendezvous of the block's (the
// warp's) threads. A thread that waits for one that exited, or for a barrier other threads never reach,
// is reported as a fault of the launch (cudaErrorLaunchFailure) instead of hanging.
//
// Memory is host memory: "device" pointers are CPU pointers, copies are memcpy, streams are
// ignored (everything runs synchronously, in call order).
#pragma once

#include <math.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <typeinfo>
#include <utility>

// ---- keywords ------------------------------------------------------------------------------------

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// One copy per kernel instantiation; blocks run one at a time, so that copy is the block's. It is
// not poisoned between blocks (GCC ignores section attributes in templates, so the emulator cannot
// find these variables): a block reads what the previous one left, zeros in the first.
#define __shared__ static
// __restrict__ is a GCC keyword already.

// `kernel UK_LAUNCH(grid, block, shared_bytes, stream)(args...)` in the sources is
// `kernel<<<grid, block, shared_bytes, stream>>>(args...)` under nvcc. Here
// `LaunchConfig(...)(args)` binds the arguments first (a call binds tighter than <<), then
// `kernel << bound` runs the launch.
#define UK_LAUNCH(...) << ::cuda_emulation::LaunchConfig(__VA_ARGS__)
// extern __shared__ memory: the block's dynamic shared memory, poisoned (0xff bytes: NaN) for
// every block.
#define UK_DYNAMIC_SHARED(type, name, alignment)                                        \
  static_assert((alignment) <= ::cuda_emulation::kDynamicSharedAlignment, "alignment"); \
  type* const name = static_cast<type*>(::cuda_emulation::dynamic_shared_memory())
// Test hook read by needs_int64_index (depthwise_tile.cuh): small shapes take the 64-bit path.
#define UK_TEST_FORCE_INT64_INDEX (::cuda_emulation::force_int64_index)

// ---- runtime types -------------------------------------------------------------------------------

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

struct CUstream_st;
using cudaStream_t = CUstream_st*;

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};

// Set by the scheduler before it resumes a thread's fiber.
extern uint3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;
constexpr int warpSize = 32;

const char* cudaGetErrorString(cudaError_t error);
cudaError_t cudaGetLastError();
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t stream = nullptr);

// ---- device functions ----------------------------------------------------------------------------

void __syncthreads();

template <typename T>
T atomicAdd(T* address, T value) {  // fibers never interleave inside a plain read-modify-write
  const T old = *address;
  *address = old + value;
  return old;
}

#define UK_EMULATION_MIN_MAX(T)                    \
  inline T min(T a, T b) { return b < a ? b : a; } \
  inline T max(T a, T b) { return a < b ? b : a; }
UK_EMULATION_MIN_MAX(int)
UK_EMULATION_MIN_MAX(unsigned)
UK_EMULATION_MIN_MAX(long)
UK_EMULATION_MIN_MAX(unsigned long)
UK_EMULATION_MIN_MAX(long long)
UK_EMULATION_MIN_MAX(unsigned long long)
UK_EMULATION_MIN_MAX(float)
UK_EMULATION_MIN_MAX(double)
#undef UK_EMULATION_MIN_MAX
using std::sqrt;  // the float overload, as CUDA's math API has it (not ::sqrt(double))

// ---- 16-bit floats -------------------------------------------------------------------------------

struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

namespace cuda_emulation {
inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
// v >> shift rounded to nearest, ties to even (shift in 1..31).
inline uint32_t shift_right_rne(uint32_t v, int shift) {
  const uint32_t kept = v >> shift, rest = v & ((1u << shift) - 1), half = 1u << (shift - 1);
  return kept + (rest > half || (rest == half && (kept & 1u)));
}
}  // namespace cuda_emulation

// As cvt.rn.f16.f32: round to nearest even, subnormal halves kept, overflow to inf, NaN -> 0x7fff.
inline __half __float2half_rn(float f) {
  using namespace cuda_emulation;
  const uint32_t u = float_bits(f), sign = (u >> 16) & 0x8000u, mag = u & 0x7fffffffu;
  const int exponent = static_cast<int>(mag >> 23);
  uint32_t h;
  if (mag > 0x7f800000u) {
    h = 0x7fffu;
  } else if (exponent >= 113) {  // a normal half, or past the largest one (inf)
    const uint32_t rounded = shift_right_rne(mag - (112u << 23), 13);
    h = rounded < 0x7c00u ? rounded : 0x7c00u;
  } else if (exponent >= 102) {  // a subnormal half, in units of 2^-24: m * 2^(exponent - 126)
    h = shift_right_rne((mag & 0x7fffffu) | 0x800000u, 126 - exponent);
  } else {  // below half the smallest subnormal
    h = 0;
  }
  return {static_cast<uint16_t>(sign | h)};
}

inline float __half2float(__half h) {
  using namespace cuda_emulation;
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  const uint32_t exponent = (h.bits >> 10) & 0x1fu, mantissa = h.bits & 0x3ffu;
  if (exponent == 0x1f) return bits_float(sign | 0x7f800000u | (mantissa << 13));
  if (exponent != 0) return bits_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
  const float magnitude = static_cast<float>(mantissa) * 0x1p-24f;  // zero or subnormal: exact
  return sign ? -magnitude : magnitude;
}

// As cvt.rn.bf16.f32: round to nearest even, overflow to inf, NaN -> 0x7fff.
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  using namespace cuda_emulation;
  const uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {0x7fffu};
  return {static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}

inline float __bfloat162float(__nv_bfloat16 b) {
  return cuda_emulation::bits_float(static_cast<uint32_t>(b.bits) << 16);
}

// ---- emulator interface --------------------------------------------------------------------------

namespace cuda_emulation {

constexpr size_t kDynamicSharedAlignment = 128;

extern bool force_int64_index;

void* dynamic_shared_memory();

// Copies `bytes` of `value` to the lanes of `mask`, waits for them, and returns (in `out`) the
// value of lane `source_lane(lane)`; reports a fault if a lane of the mask exited or does not exist.
void warp_exchange(unsigned mask, const void* value, void* out, size_t bytes,
                   int (*source_lane)(int lane, int arg, int width), int arg, int width);

// Runs thread_body once per thread of every block of the grid. `kernel` identifies the kernel (for
// cudaFuncSetAttribute's limits) and `signature` names it in the launch log.
cudaError_t launch(const void* kernel, const char* signature, dim3 grid, dim3 block,
                   size_t shared_bytes, const std::function<void()>& thread_body);

cudaError_t set_max_dynamic_shared_bytes(const void* kernel, int bytes);

const char* demangled(const std::type_info& type);

// The <<<...>>> configuration, then the bound arguments, then `kernel << launch` runs it.
template <typename... Args>
struct BoundLaunch {
  dim3 grid, block;
  size_t shared_bytes;
  std::tuple<Args...> args;
};

struct LaunchConfig {
  dim3 grid, block;
  size_t shared_bytes;
  LaunchConfig(dim3 g, dim3 b, size_t shared = 0, cudaStream_t = nullptr)
      : grid(g), block(b), shared_bytes(shared) {}
  template <typename... Args>
  BoundLaunch<std::decay_t<Args>...> operator()(Args&&... args) const {
    return {grid, block, shared_bytes, {std::forward<Args>(args)...}};
  }
};

template <typename... Params, typename... Args>
void operator<<(void (*kernel)(Params...), const BoundLaunch<Args...>& bound) {
  using Kernel = void (*)(Params...);
  // The kernel's own parameter types, converted once as the launch would; each thread copies them.
  const auto params = std::apply(
      [](const auto&... a) { return std::tuple<std::decay_t<Params>...>(a...); }, bound.args);
  launch(reinterpret_cast<const void*>(kernel), demangled(typeid(Kernel)), bound.grid, bound.block,
         bound.shared_bytes, [&] { std::apply(kernel, params); });
}

inline int lane_xor(int lane, int lane_mask, int width) {
  const int source = lane ^ lane_mask;  // a later segment of `width` lanes gives back the own value
  return source / width > lane / width ? lane : source;
}

}  // namespace cuda_emulation

template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize) {
  static_assert(sizeof(T) <= 8, "shuffles move at most 64 bits");
  T out;
  cuda_emulation::warp_exchange(mask, &var, &out, sizeof(T), cuda_emulation::lane_xor, lane_mask,
                                width);
  return out;
}

template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  return cuda_emulation::set_max_dynamic_shared_bytes(reinterpret_cast<const void*>(kernel), value);
}
