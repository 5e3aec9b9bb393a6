// Entry points of the depthwise conv family's CPU kernels (no torch types).
//
// The kernels exist three times, compiled from one template source (depthwise_kernels_impl.h) that
// only the vector width and register count parameterise: for the baseline x86-64 ISA, with
// AVX2+FMA (depthwise_kernels_avx2.cpp) and with AVX-512 (depthwise_kernels_avx512.cpp).
// depthwise.cpp runs the build cpu_isa.h chooses once per process.
//
// Layout: activations are channels-last 5-D (N, D, H, W, C) contiguous, 2-D convs having D = 1;
// weights are (KD, KH, KW, C) so that a vector load over channels is contiguous. Every kernel works
// on a range of output rows, a row being one (n, d, h): W * C values. The caller splits rows
// across threads.
#pragma once

#include <cstdint>

namespace uniformer_kernels {

struct ConvShape {
  int64_t batch, depth, height, width, channels;
  int64_t kernel_d, kernel_h, kernel_w;  // odd, <= 7
  int64_t rows() const { return batch * depth * height; }
};

// The kernels of one ISA level, as function pointers (instantiated for float and double).
template <typename T>
struct DepthwiseKernels {
  // y[row] = bias + depthwise_conv(x)[row] (+ x[row] when residual), for rows [begin, end).
  // row_buffer: nullptr, or W * C values of scratch through which rows are streamed to y with
  // non-temporal stores (for outputs that will not stay in cache anyway).
  void (*forward)(const T* x, const T* weight, const T* bias, bool residual, T* y,
                  const ConvShape& shape, int64_t begin, int64_t end, T* row_buffer);
  // Adds this row range's contribution to grad_weight (KD, KH, KW, C) and grad_bias (C).
  void (*weight_grad)(const T* grad_y, const T* x, T* grad_weight, T* grad_bias,
                      const ConvShape& shape, int64_t begin, int64_t end);
  // y = x + conv(x) as forward(residual) and z = norm(y) per pixel in the same pass over a row:
  // LayerNorm over C (mean and rstd written per pixel) when layer_norm, else z = y * scale + shift.
  void (*pos_embed_norm)(const T* x, const T* weight, const T* bias, const T* norm_weight,
                         const T* norm_bias, bool layer_norm, T eps, T* y, T* z, T* mean, T* rstd,
                         const ConvShape& shape, int64_t begin, int64_t end);
};

// The kernels on bfloat16 activations (x, y, z, grad_y as uint16_t bits), with float weights,
// bias, norm parameters, mean and rstd, weight and bias gradients, and float accumulation: as
// DepthwiseKernels<float>'s on the widened input, each bfloat16 output rounded once (nearest even).
struct DepthwiseKernelsBf16 {
  void (*forward)(const uint16_t* x, const float* weight, const float* bias, bool residual, uint16_t* y,
                  const ConvShape& shape, int64_t begin, int64_t end, uint16_t* row_buffer);
  void (*weight_grad)(const uint16_t* grad_y, const uint16_t* x, float* grad_weight, float* grad_bias,
                      const ConvShape& shape, int64_t begin, int64_t end);
  void (*pos_embed_norm)(const uint16_t* x, const float* weight, const float* bias, const float* norm_weight,
                         const float* norm_bias, bool layer_norm, float eps, uint16_t* y, uint16_t* z,
                         float* mean, float* rstd, const ConvShape& shape, int64_t begin, int64_t end);
};

namespace baseline {
template <typename T>
DepthwiseKernels<T> kernels();
DepthwiseKernelsBf16 kernels_bf16();
}
namespace avx2 {
template <typename T>
DepthwiseKernels<T> kernels();
DepthwiseKernelsBf16 kernels_bf16();
}
namespace avx512 {
template <typename T>
DepthwiseKernels<T> kernels();
DepthwiseKernelsBf16 kernels_bf16();
}

}  // namespace uniformer_kernels
