// CUDA implementations of the depthwise conv ops (schemas: TORCH_LIBRARY(uniformer_kernels_C) in
// csrc/cpu/depthwise.cpp). Only tensors -> pointers, sizes and the current stream here; the kernels
// are plain CUDA C++ in depthwise_conv.cu and pos_embed_norm.cu.
//
// The Python ops validate arguments before calling these; the checks below are the cheap ones that
// keep a bad direct call from reading or writing out of bounds.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "depthwise_conv.h"
#include "pos_embed_norm.h"

namespace uniformer_kernels {
namespace {

using cuda::ConvShape;
using cuda::DType;

DType kernel_dtype(const at::Tensor& x, const char* op) {
  switch (x.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kDouble:
      return DType::kFloat64;
    default:
      TORCH_CHECK(false, op, ": x must be float32, float16, bfloat16 or float64, got ",
                  x.scalar_type());
  }
}

// Weights, biases, norm parameters and weight gradients: float32, or float64 for float64 x.
at::ScalarType accum_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_activation(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 5, op, ": ", name, " must be 5-D (N, D, H, W, C), got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (N, D, H, W, C)");
}

void check_like(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  check_activation(t, op, name);
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), ", x on ",
              x.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " is ", t.scalar_type(),
              ", x is ", x.scalar_type());
  TORCH_CHECK(t.sizes() == x.sizes(), op, ": ", name, " has shape ", t.sizes(), ", x has ",
              x.sizes());
}

void check_param(const at::Tensor& t, const at::Tensor& x, at::IntArrayRef shape, const char* op,
                 const char* name) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), ", x on ",
              x.device());
  TORCH_CHECK(t.scalar_type() == accum_type(x), op, ": ", name, " must be ", accum_type(x),
              " for ", x.scalar_type(), " x, got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

void check_kernel_size(at::IntArrayRef kernel_size, const char* op) {
  TORCH_CHECK(kernel_size.size() == 3, op, ": kernel size must be [KD, KH, KW], got ",
              kernel_size);
  for (int64_t k : kernel_size) {
    TORCH_CHECK(k >= 1 && k <= cuda::kMaxKernelSize && k % 2 == 1, op,
                ": every kernel size must be odd and at most ", cuda::kMaxKernelSize, ", got ",
                kernel_size);
  }
}

// x (N, D, H, W, C) and a checked [KD, KH, KW].
ConvShape conv_shape(const at::Tensor& x, at::IntArrayRef kernel_size) {
  return {x.size(0),
          x.size(1),
          x.size(2),
          x.size(3),
          x.size(4),
          static_cast<int>(kernel_size[0]),
          static_cast<int>(kernel_size[1]),
          static_cast<int>(kernel_size[2])};
}

// The weight (KD, KH, KW, C): its kernel size, checked, and its shape against x's channels.
at::IntArrayRef checked_weight_kernel_size(const at::Tensor& weight, const at::Tensor& x,
                                           const char* op) {
  TORCH_CHECK(weight.dim() == 4, op, ": weight must be (KD, KH, KW, C), got shape ",
              weight.sizes());
  const at::IntArrayRef kernel_size = weight.sizes().slice(0, 3);
  check_kernel_size(kernel_size, op);
  check_param(weight, x, {kernel_size[0], kernel_size[1], kernel_size[2], x.size(4)}, op,
              "weight");
  return kernel_size;
}

void check_launch(cudaError_t status, const char* op) {
  TORCH_CHECK(status == cudaSuccess, op, ": CUDA kernel launch failed: ",
              cudaGetErrorString(status));
}

at::Tensor depthwise_conv_forward_cuda(const at::Tensor& x, const at::Tensor& weight,
                                       const std::optional<at::Tensor>& bias, bool residual) {
  constexpr const char* op = "depthwise_conv_forward (cuda)";
  check_activation(x, op, "x");
  const DType dtype = kernel_dtype(x, op);
  const at::IntArrayRef kernel_size = checked_weight_kernel_size(weight, x, op);
  if (bias.has_value()) check_param(*bias, x, {x.size(4)}, op, "bias");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty(x.sizes(), x.options());
  check_launch(cuda::launch_depthwise_conv_forward(
                   dtype, x.const_data_ptr(), weight.const_data_ptr(),
                   bias.has_value() ? bias->const_data_ptr() : nullptr, residual,
                   y.mutable_data_ptr(), conv_shape(x, kernel_size),
                   c10::cuda::getCurrentCUDAStream(x.device().index()).stream()),
               op);
  return y;
}

std::tuple<at::Tensor, at::Tensor> depthwise_conv_backward_weight_cuda(const at::Tensor& grad_y,
                                                                       const at::Tensor& x,
                                                                       at::IntArrayRef kernel_size,
                                                                       bool deterministic) {
  constexpr const char* op = "depthwise_conv_backward_weight (cuda)";
  check_activation(x, op, "x");
  check_like(grad_y, x, op, "grad_y");
  const DType dtype = kernel_dtype(x, op);
  check_kernel_size(kernel_size, op);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto accum = x.options().dtype(accum_type(x));
  const int64_t channels = x.size(4);
  at::Tensor grad_weight =
      at::empty({kernel_size[0], kernel_size[1], kernel_size[2], channels}, accum);
  at::Tensor grad_bias = at::empty({channels}, accum);
  const ConvShape shape = conv_shape(x, kernel_size);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  cudaError_t status;
  if (deterministic) {
    // From the caching allocator, so the partial sums cost no cudaMalloc after the first call.
    at::Tensor workspace =
        at::empty({cuda::depthwise_conv_backward_weight_workspace_elems(shape)}, accum);
    status = cuda::launch_depthwise_conv_backward_weight_deterministic(
        dtype, grad_y.const_data_ptr(), x.const_data_ptr(), workspace.mutable_data_ptr(),
        grad_weight.mutable_data_ptr(), grad_bias.mutable_data_ptr(), shape, stream);
  } else {
    status = cuda::launch_depthwise_conv_backward_weight_atomic(
        dtype, grad_y.const_data_ptr(), x.const_data_ptr(), grad_weight.mutable_data_ptr(),
        grad_bias.mutable_data_ptr(), shape, stream);
  }
  check_launch(status, op);
  return {grad_weight, grad_bias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pos_embed_norm_forward_cuda(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& norm_weight, const at::Tensor& norm_bias, int64_t norm, double eps) {
  constexpr const char* op = "pos_embed_norm_forward (cuda)";
  check_activation(x, op, "x");
  const DType dtype = kernel_dtype(x, op);
  const at::IntArrayRef kernel_size = checked_weight_kernel_size(weight, x, op);
  const int64_t channels = x.size(4);
  check_param(bias, x, {channels}, op, "bias");
  check_param(norm_weight, x, {channels}, op, "norm_weight");
  check_param(norm_bias, x, {channels}, op, "norm_bias");
  TORCH_CHECK(norm == 0 || norm == 1, op, ": norm must be 0 (layernorm) or 1 (affine), got ", norm);
  const bool layer_norm = norm == 0;
  const c10::cuda::CUDAGuard guard(x.device());
  if (layer_norm) {
    const int64_t max_channels = cuda::pos_embed_norm_max_channels(dtype, x.device().index());
    TORCH_CHECK(max_channels >= 0, op, ": cannot query the shared memory of ", x.device());
    TORCH_CHECK(channels <= max_channels, op, ": the LayerNorm kernel takes at most ",
                max_channels, " channels of ", x.scalar_type(), " on this GPU, got ", channels);
  }
  at::Tensor y = at::empty(x.sizes(), x.options());
  at::Tensor z = at::empty(x.sizes(), x.options());
  const int64_t stats = layer_norm ? x.numel() / std::max<int64_t>(channels, 1) : 0;
  // In the accumulation dtype, as the other backends and the op's fake implementation return them.
  at::Tensor mean = at::empty({stats}, x.options().dtype(accum_type(x)));
  at::Tensor rstd = at::empty({stats}, x.options().dtype(accum_type(x)));
  check_launch(
      cuda::launch_pos_embed_norm(
          dtype, x.const_data_ptr(), weight.const_data_ptr(), bias.const_data_ptr(),
          norm_weight.const_data_ptr(), norm_bias.const_data_ptr(),
          layer_norm ? cuda::PosEmbedNorm::kLayerNorm : cuda::PosEmbedNorm::kAffine, eps,
          y.mutable_data_ptr(), z.mutable_data_ptr(), mean.mutable_data_ptr(),
          rstd.mutable_data_ptr(), conv_shape(x, kernel_size),
          c10::cuda::getCurrentCUDAStream(x.device().index()).stream()),
      op);
  return {y, z, mean, rstd};
}

}  // namespace

TORCH_LIBRARY_IMPL(uniformer_kernels_C, CUDA, m) {
  m.impl("depthwise_conv_forward", &depthwise_conv_forward_cuda);
  m.impl("depthwise_conv_backward_weight", &depthwise_conv_backward_weight_cuda);
  m.impl("pos_embed_norm_forward", &pos_embed_norm_forward_cuda);
}

}  // namespace uniformer_kernels
