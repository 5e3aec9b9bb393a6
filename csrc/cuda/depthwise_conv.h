// Launch functions of the CUDA depthwise conv kernels (depthwise_conv.cu) on raw pointers.
//
// Layout is channels-last throughout: activations (N, D, H, W, C) contiguous, weights (KD, KH, KW, C)
// contiguous; a 2D conv is D = KD = 1. Every kernel size is odd and at most 7, padding is K / 2 per
// dimension, stride 1. Weights, biases and weight gradients are in the accumulation type: float for
// float32 / float16 / bfloat16 activations, double for float64 ones.
//
// No torch types here, so the kernels compile with plain nvcc; the binding
// (depthwise_binding.cpp) turns tensors into these arguments. Each function enqueues its work on
// `stream` and returns the launch status (cudaErrorInvalidValue for a shape the kernels cannot take).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace uniformer_kernels::cuda {

enum class DType { kFloat32, kFloat16, kBFloat16, kFloat64 };

struct ConvShape {
  int64_t batch, depth, height, width, channels;
  int kernel_d, kernel_h, kernel_w;
};

// Largest kernel size per dimension the kernels take.
constexpr int kMaxKernelSize = 7;

// y = bias + conv(x, weight) (+ x when residual). bias may be null. The input gradient of the conv
// is this same call on grad_y with the weight flipped in every spatial dimension.
cudaError_t launch_depthwise_conv_forward(DType dtype, const void* x, const void* weight,
                                          const void* bias, bool residual, void* y,
                                          const ConvShape& shape, cudaStream_t stream);

// Elements (of the accumulation type) of the scratch buffer that the deterministic weight-gradient
// reduction needs: per-chunk partial sums of grad_weight and grad_bias.
int64_t depthwise_conv_backward_weight_workspace_elems(const ConvShape& shape);

// grad_weight (KD, KH, KW, C) and grad_bias (C,) from grad_y and x, both (N, D, H, W, C).
// Deterministic: every partial sum is added in a fixed order (per-chunk partials in `workspace`,
// then a second pass), so results are bitwise equal run to run; the chunking depends on the shape
// only, not on the GPU.
cudaError_t launch_depthwise_conv_backward_weight_deterministic(
    DType dtype, const void* grad_y, const void* x, void* workspace, void* grad_weight,
    void* grad_bias, const ConvShape& shape, cudaStream_t stream);

// Same result with atomics: no workspace and no second pass, but the summation order (so the last
// bits) varies from run to run.
cudaError_t launch_depthwise_conv_backward_weight_atomic(DType dtype, const void* grad_y,
                                                         const void* x, void* grad_weight,
                                                         void* grad_bias, const ConvShape& shape,
                                                         cudaStream_t stream);

}  // namespace uniformer_kernels::cuda
