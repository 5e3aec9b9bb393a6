// The launch functions of csrc/cuda on flat C arguments, for the tests to call through ctypes in
// the host emulation build. sizes = (N, D, H, W, C), kernel = (KD, KH, KW); dtype is DType's value
// (0 float32, 1 float16, 2 bfloat16, 3 float64). Each returns the launch's cudaError_t.
#include <cstdint>

#include "depthwise_conv.h"
#include "pos_embed_norm.h"

namespace {

using uniformer_kernels::cuda::ConvShape;
using uniformer_kernels::cuda::DType;

ConvShape conv_shape(const int64_t* sizes, const int* kernel) {
  return {sizes[0], sizes[1], sizes[2], sizes[3], sizes[4], kernel[0], kernel[1], kernel[2]};
}

}  // namespace

extern "C" {

int uk_emu_depthwise_conv_forward(int dtype, const void* x, const void* weight, const void* bias,
                                  int residual, void* y, const int64_t* sizes, const int* kernel) {
  return uniformer_kernels::cuda::launch_depthwise_conv_forward(
      static_cast<DType>(dtype), x, weight, bias, residual != 0, y, conv_shape(sizes, kernel),
      nullptr);
}

int64_t uk_emu_depthwise_conv_backward_weight_workspace_elems(const int64_t* sizes,
                                                              const int* kernel) {
  return uniformer_kernels::cuda::depthwise_conv_backward_weight_workspace_elems(
      conv_shape(sizes, kernel));
}

int uk_emu_depthwise_conv_backward_weight_deterministic(int dtype, const void* grad_y,
                                                        const void* x, void* workspace,
                                                        void* grad_weight, void* grad_bias,
                                                        const int64_t* sizes, const int* kernel) {
  return uniformer_kernels::cuda::launch_depthwise_conv_backward_weight_deterministic(
      static_cast<DType>(dtype), grad_y, x, workspace, grad_weight, grad_bias,
      conv_shape(sizes, kernel), nullptr);
}

int uk_emu_depthwise_conv_backward_weight_atomic(int dtype, const void* grad_y, const void* x,
                                                 void* grad_weight, void* grad_bias,
                                                 const int64_t* sizes, const int* kernel) {
  return uniformer_kernels::cuda::launch_depthwise_conv_backward_weight_atomic(
      static_cast<DType>(dtype), grad_y, x, grad_weight, grad_bias, conv_shape(sizes, kernel),
      nullptr);
}

int64_t uk_emu_pos_embed_norm_max_channels(int dtype) {
  return uniformer_kernels::cuda::pos_embed_norm_max_channels(static_cast<DType>(dtype), 0);
}

int uk_emu_pos_embed_norm(int dtype, const void* x, const void* weight, const void* bias,
                          const void* norm_weight, const void* norm_bias, int layer_norm,
                          double eps, void* y, void* z, void* mean, void* rstd,
                          const int64_t* sizes, const int* kernel) {
  using uniformer_kernels::cuda::PosEmbedNorm;
  return uniformer_kernels::cuda::launch_pos_embed_norm(
      static_cast<DType>(dtype), x, weight, bias, norm_weight, norm_bias,
      layer_norm != 0 ? PosEmbedNorm::kLayerNorm : PosEmbedNorm::kAffine, eps, y, z, mean, rstd,
      conv_shape(sizes, kernel), nullptr);
}

}  // extern "C"
