// The depthwise conv family's CPU kernels compiled for AVX-512 (F, BW, VL) + FMA, chosen at run
// time when the CPU has them and the OS saves zmm state (cpu_isa.cpp): 16 floats or 8 doubles a
// vector and blocks of up to 16 outputs in the 32 zmm registers; the source is the AVX2 build's,
// with wider traits. Everything defined after the pragma is compiled for that ISA, so only the
// kernel header (which includes nothing) comes after it. On other architectures this falls back to
// baseline.
#include "depthwise_kernels.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vl")
namespace uniformer_kernels {
namespace avx512 {
#define UK_VECTOR_BYTES 64
#define UK_VECTOR_REGISTERS 32
#include "depthwise_kernels_impl.h"
}  // namespace avx512
}  // namespace uniformer_kernels
#else
namespace uniformer_kernels {
namespace avx512 {
template <typename T, typename S>
DepthwiseKernels<T, S> kernels() {
  return baseline::kernels<T, S>();
}
template DepthwiseKernels<float> kernels<float>();
template DepthwiseKernels<double> kernels<double>();
template DepthwiseKernels<float, uint16_t> kernels<float, uint16_t>();
}  // namespace avx512
}  // namespace uniformer_kernels
#endif
