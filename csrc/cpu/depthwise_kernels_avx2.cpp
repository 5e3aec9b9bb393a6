// The depthwise conv family's CPU kernels compiled for AVX2 + FMA, chosen at run time when the CPU
// has both. Everything defined after the pragma is compiled for that ISA, so only the kernel header
// (which includes nothing) comes after it. On other architectures this falls back to baseline.
#include "depthwise_kernels.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#pragma GCC target("avx2,fma")
namespace uniformer_kernels {
namespace avx2 {
#define UK_VECTOR_BYTES 32
#define UK_VECTOR_REGISTERS 16
#include "depthwise_kernels_impl.h"
}  // namespace avx2
}  // namespace uniformer_kernels
#else
namespace uniformer_kernels {
namespace avx2 {
template <typename T, typename S>
DepthwiseKernels<T, S> kernels() {
  return baseline::kernels<T, S>();
}
template DepthwiseKernels<float> kernels<float>();
template DepthwiseKernels<double> kernels<double>();
template DepthwiseKernels<float, uint16_t> kernels<float, uint16_t>();
}  // namespace avx2
}  // namespace uniformer_kernels
#endif
