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

// The kernels of one ISA level, as function pointers. T is the compute type (weights, bias, norm
// parameters, statistics, gradients of the weights, accumulation) and S the activations' storage:
// <float>, <double>, or <float, uint16_t> for bfloat16 activations (x, y, z, grad_y as their bits),
// which compute as <float> on the widened input and round each output once (nearest even).
template <typename T, typename S = T>
struct DepthwiseKernels {
  // y[row] = bias + depthwise_conv(x)[row] (+ x[row] when residual), for rows [begin, end).
  // row_buffer: nullptr, or W * C values of scratch through which rows are streamed to y with
  // non-temporal stores (for outputs that will not stay in cache anyway).
  void (*forward)(const S* x, const T* weight, const T* bias, bool residual, S* y,
                  const ConvShape& shape, int64_t begin, int64_t end, S* row_buffer);
  // Adds this row range's contribution to grad_weight (KD, KH, KW, C) and grad_bias (C).
  void (*weight_grad)(const S* grad_y, const S* x, T* grad_weight, T* grad_bias,
                      const ConvShape& shape, int64_t begin, int64_t end);
  // y = x + conv(x) as forward(residual) and z = norm(y) per pixel in the same pass over a row:
  // LayerNorm over C (mean and rstd written per pixel) when layer_norm, else z = y * scale + shift.
  void (*pos_embed_norm)(const S* x, const T* weight, const T* bias, const T* norm_weight,
                         const T* norm_bias, bool layer_norm, T eps, S* y, S* z, T* mean, T* rstd,
                         const ConvShape& shape, int64_t begin, int64_t end);
};

// Each ISA namespace defines kernels<T, S>() for <float>, <double> and <float, uint16_t>.
namespace baseline {
template <typename T, typename S = T>
DepthwiseKernels<T, S> kernels();
}
namespace avx2 {
template <typename T, typename S = T>
DepthwiseKernels<T, S> kernels();
}
namespace avx512 {
template <typename T, typename S = T>
DepthwiseKernels<T, S> kernels();
}

}  // namespace uniformer_kernels
