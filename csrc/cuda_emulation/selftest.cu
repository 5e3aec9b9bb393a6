// Kernels that check the emulator itself (tests/test_cuda_emulation.py): each gives a known result
// only if the emulated primitive really works, so a broken emulator cannot let the depthwise and
// pos_embed_norm tests pass vacuously. Each extern "C" function launches one and returns
// cudaGetLastError().
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace {

constexpr int kMaxThreads = 1024;

template <bool kBarrier>
__device__ void maybe_syncthreads() {
  if (kBarrier) __syncthreads();
}

// out[b] = sum of in[b * n : (b + 1) * n] by a tree in shared memory (n a power of two). Without
// the barriers a thread reads partial sums its neighbours have not written yet.
template <bool kBarrier, bool kDynamicShared>
__global__ void tree_sum_kernel(const int* in, int* out) {
  __shared__ int static_stage[kMaxThreads];
  UK_DYNAMIC_SHARED(int, dynamic_stage, 16);
  int* stage = kDynamicShared ? dynamic_stage : static_stage;
  const int t = threadIdx.x, n = blockDim.x;
  stage[t] = in[blockIdx.x * n + t];
  maybe_syncthreads<kBarrier>();
  for (int stride = n / 2; stride > 0; stride /= 2) {
    if (t < stride) stage[t] += stage[t + stride];
    maybe_syncthreads<kBarrier>();
  }
  if (t == 0) out[blockIdx.x] = stage[0];
}

// out[t] = in[t ^ lane_mask] within each segment of `width` lanes (or in[t] where that lane lies in
// a later segment), and total[t] = the butterfly sum over the warp.
template <typename T>
__global__ void shuffle_kernel(const T* in, T* out, T* total, int lane_mask, int width) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  out[t] = __shfl_xor_sync(0xffffffffu, in[t], lane_mask, width);
  T sum = in[t];
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  total[t] = sum;
}

// out[linear id] = linear id from the built-in indices; *count = threads run (by atomicAdd).
__global__ void index_kernel(int64_t* out, int* count) {
  const int64_t block = (static_cast<int64_t>(blockIdx.z) * gridDim.y + blockIdx.y) * gridDim.x +
                        blockIdx.x;
  const int64_t thread = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
  const int64_t id = block * blockDim.x * blockDim.y * blockDim.z + thread;
  out[id] = id;
  atomicAdd(count, 1);
}

// Broken on purpose: thread 0 leaves before a barrier that waits for it.
__global__ void exit_before_barrier_kernel() {
  if (threadIdx.x == 0) return;
  __syncthreads();
}

// Broken on purpose: lane 5 leaves before a full-warp shuffle.
__global__ void exit_before_shuffle_kernel(float* out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

// Broken on purpose: half of warp 0 waits at __syncthreads while the other half shuffles.
__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
  }
}

__global__ void empty_kernel() {}

}  // namespace

extern "C" {

// n threads per block (a power of two), `blocks` blocks.
int uk_emu_selftest_tree_sum(const int* in, int* out, int blocks, int n, int barrier,
                             int dynamic_shared) {
  const size_t shared = dynamic_shared ? n * sizeof(int) : 0;
  using Kernel = void (*)(const int*, int*);
  const Kernel kernels[2][2] = {{tree_sum_kernel<false, false>, tree_sum_kernel<false, true>},
                                {tree_sum_kernel<true, false>, tree_sum_kernel<true, true>}};
  kernels[barrier != 0][dynamic_shared != 0] UK_LAUNCH(blocks, n, shared)(in, out);
  return cudaGetLastError();
}

int uk_emu_selftest_shuffle_float(const float* in, float* out, float* total, int threads,
                                  int lane_mask, int width) {
  shuffle_kernel<float> UK_LAUNCH(1, threads)(in, out, total, lane_mask, width);
  return cudaGetLastError();
}

int uk_emu_selftest_shuffle_double(const double* in, double* out, double* total, int threads,
                                   int lane_mask, int width) {
  shuffle_kernel<double> UK_LAUNCH(1, threads)(in, out, total, lane_mask, width);
  return cudaGetLastError();
}

// grid and block as (x, y, z).
int uk_emu_selftest_indices(int64_t* out, int* count, const unsigned* grid, const unsigned* block) {
  index_kernel UK_LAUNCH(dim3(grid[0], grid[1], grid[2]), dim3(block[0], block[1], block[2]))(out,
                                                                                           count);
  return cudaGetLastError();
}

// which: 0 exit before a barrier, 1 exit before a shuffle, 2 barrier against shuffle, 3 a warp and
// a half (48 threads) shuffling with a full mask.
int uk_emu_selftest_broken(int which, float* out) {
  if (which == 0) exit_before_barrier_kernel UK_LAUNCH(1, 64)();
  if (which == 1) exit_before_shuffle_kernel UK_LAUNCH(1, 32)(out);
  if (which == 2) divergent_barrier_kernel UK_LAUNCH(1, 32)(out);
  if (which == 3) shuffle_kernel<float> UK_LAUNCH(1, 48)(out, out + 64, out + 128, 1, 32);
  return cudaGetLastError();
}

// An empty kernel with this configuration; opt_in_bytes >= 0 first raises its dynamic shared
// memory limit as cudaFuncSetAttribute does.
int uk_emu_selftest_launch_config(const unsigned* grid, const unsigned* block, size_t shared_bytes,
                                  int opt_in_bytes) {
  if (opt_in_bytes >= 0) {
    const cudaError_t status = cudaFuncSetAttribute(
        empty_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, opt_in_bytes);
    if (status != cudaSuccess) return cudaGetLastError();  // the same error, now cleared
  }
  empty_kernel UK_LAUNCH(dim3(grid[0], grid[1], grid[2]), dim3(block[0], block[1], block[2]),
                         shared_bytes)();
  return cudaGetLastError();
}

// The emulated conversions, elementwise on raw bits.
void uk_emu_float_to_half(const float* in, uint16_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = __float2half_rn(in[i]).bits;
}
void uk_emu_half_to_float(const uint16_t* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = __half2float(__half{in[i]});
}
void uk_emu_float_to_bfloat16(const float* in, uint16_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = __float2bfloat16_rn(in[i]).bits;
}
void uk_emu_bfloat16_to_float(const uint16_t* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = __bfloat162float(__nv_bfloat16{in[i]});
}

}  // extern "C"
