// The AVX-512 build's kernel source, with its traits (16-float vectors, blocking for 32 registers),
// compiled for whatever ISA the compiling machine has, and exported with C linkage for
// tests/test_cpu_isa.py (ctypes). GCC and Clang lower the 64-byte vector types to the ISA's
// narrower registers, so every line of depthwise_kernels_impl.h as the AVX-512 build instantiates
// it (channel tails of 8, 4 and 1 lanes after full 16-lane vectors, output blocks of 16, weight
// gradient blocks of 8) runs and is checked on machines without AVX-512. What it cannot check is
// the AVX-512 code generation itself.
#include <cstdint>

#include "depthwise_kernels.h"

#pragma GCC diagnostic ignored "-Wpsabi"

namespace uniformer_kernels {
namespace avx512_traits {
template <typename T, typename S = T>
DepthwiseKernels<T, S> kernels();  // as depthwise_kernels.h declares it for the real ISA builds
#define UK_VECTOR_BYTES 64
#define UK_VECTOR_REGISTERS 32
#include "depthwise_kernels_impl.h"
}  // namespace avx512_traits
}  // namespace uniformer_kernels

namespace {

using uniformer_kernels::ConvShape;

// sizes: N, D, H, W, C, KD, KH, KW.
ConvShape shape_of(const int64_t* sizes) {
  return {sizes[0], sizes[1], sizes[2], sizes[3], sizes[4], sizes[5], sizes[6], sizes[7]};
}

// T: the compute type, S: the activations' storage (uint16_t: bfloat16 bits).
template <typename T, typename S = T>
void forward(const void* x, const void* w, const void* b, int residual, void* y, const int64_t* sizes,
             void* row_buffer) {
  const ConvShape s = shape_of(sizes);
  uniformer_kernels::avx512_traits::kernels<T, S>().forward(
      static_cast<const S*>(x), static_cast<const T*>(w), static_cast<const T*>(b), residual != 0,
      static_cast<S*>(y), s, 0, s.rows(), static_cast<S*>(row_buffer));
}

template <typename T, typename S = T>
void weight_grad(const void* grad_y, const void* x, void* grad_w, void* grad_b, const int64_t* sizes) {
  const ConvShape s = shape_of(sizes);
  uniformer_kernels::avx512_traits::kernels<T, S>().weight_grad(
      static_cast<const S*>(grad_y), static_cast<const S*>(x), static_cast<T*>(grad_w), static_cast<T*>(grad_b), s,
      0, s.rows());
}

template <typename T, typename S = T>
void pos_embed_norm(const void* x, const void* w, const void* b, const void* norm_w, const void* norm_b,
                    int layer_norm, double eps, void* y, void* z, void* mean, void* rstd, const int64_t* sizes) {
  const ConvShape s = shape_of(sizes);
  uniformer_kernels::avx512_traits::kernels<T, S>().pos_embed_norm(
      static_cast<const S*>(x), static_cast<const T*>(w), static_cast<const T*>(b), static_cast<const T*>(norm_w),
      static_cast<const T*>(norm_b), layer_norm != 0, static_cast<T>(eps), static_cast<S*>(y), static_cast<S*>(z),
      static_cast<T*>(mean), static_cast<T*>(rstd), s, 0, s.rows());
}

}  // namespace

// double_precision: 0 for float, 1 for double.
extern "C" {

void uk_wide_forward(int double_precision, const void* x, const void* w, const void* b, int residual, void* y,
                     const int64_t* sizes, void* row_buffer) {
  if (double_precision) forward<double>(x, w, b, residual, y, sizes, row_buffer);
  else forward<float>(x, w, b, residual, y, sizes, row_buffer);
}

void uk_wide_weight_grad(int double_precision, const void* grad_y, const void* x, void* grad_w, void* grad_b,
                         const int64_t* sizes) {
  if (double_precision) weight_grad<double>(grad_y, x, grad_w, grad_b, sizes);
  else weight_grad<float>(grad_y, x, grad_w, grad_b, sizes);
}

void uk_wide_pos_embed_norm(int double_precision, const void* x, const void* w, const void* b, const void* norm_w,
                            const void* norm_b, int layer_norm, double eps, void* y, void* z, void* mean,
                            void* rstd, const int64_t* sizes) {
  if (double_precision) pos_embed_norm<double>(x, w, b, norm_w, norm_b, layer_norm, eps, y, z, mean, rstd, sizes);
  else pos_embed_norm<float>(x, w, b, norm_w, norm_b, layer_norm, eps, y, z, mean, rstd, sizes);
}

// bfloat16 activations (uint16_t bits), float weights, norm parameters and statistics.
void uk_wide_forward_bf16(const void* x, const void* w, const void* b, int residual, void* y, const int64_t* sizes,
                          void* row_buffer) {
  forward<float, uint16_t>(x, w, b, residual, y, sizes, row_buffer);
}

void uk_wide_weight_grad_bf16(const void* grad_y, const void* x, void* grad_w, void* grad_b, const int64_t* sizes) {
  weight_grad<float, uint16_t>(grad_y, x, grad_w, grad_b, sizes);
}

void uk_wide_pos_embed_norm_bf16(const void* x, const void* w, const void* b, const void* norm_w, const void* norm_b,
                                 int layer_norm, double eps, void* y, void* z, void* mean, void* rstd,
                                 const int64_t* sizes) {
  pos_embed_norm<float, uint16_t>(x, w, b, norm_w, norm_b, layer_norm, eps, y, z, mean, rstd, sizes);
}

}  // extern "C"
