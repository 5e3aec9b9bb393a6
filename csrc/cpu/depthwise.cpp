// The depthwise conv family's internal ops: their schemas, and the CPU backend.
//
// uniformer_kernels/ops/depthwise.py and ops/pos_embed_norm.py validate the arguments and call
// these through torch.ops.uniformer_kernels_C.
// - depthwise_conv_forward, depthwise_conv_backward_weight, pos_embed_norm_forward: the kernels'
//   own layouts, a channels-last 5-D (N, D, H, W, C) input and (KD, KH, KW, C) weights, which
//   ops/_depthwise_common.py prepares. Schemas only here: csrc/cuda implements them for CUDA.
// - depthwise_conv_cpu, depthwise_conv_backward_cpu, pos_embed_norm_cpu: the CPU backend, in the
//   ops' own layouts (x (N, C, [D,] H, W) in either memory format, weight (C, 1, [KD,] KH, KW)).
//   The relayouts happen here, in C++: at UniFormer's batch-1 stage-3/4 shapes the same relayouts
//   as PyTorch calls from Python took ~130 us against a ~40 us kernel.
// depthwise_conv_cpu, depthwise_conv_backward_cpu and pos_embed_norm_cpu also take bfloat16
// activations natively (weights and norm parameters converted to float here, mean and rstd float,
// weight and bias gradients summed in float and returned in the weight's dtype).
// The checks here are the last line of defence against an out-of-bounds access, not the
// user-facing validation.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <vector>

#include "cpu_isa.h"
#include "depthwise_kernels.h"

namespace uniformer_kernels {
namespace {

// The kernel build for the ISA chosen for this process (cpu_isa.h).
template <typename T, typename S>
DepthwiseKernels<T, S> kernels_for(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::avx512: return avx512::kernels<T, S>();
    case CpuIsa::avx2: return avx2::kernels<T, S>();
    default: return baseline::kernels<T, S>();
  }
}

template <typename T, typename S>
const DepthwiseKernels<T, S>& cpu_kernels() {
  static const DepthwiseKernels<T, S> chosen = kernels_for<T, S>(chosen_cpu_isa());
  return chosen;
}

// The kernels' (compute, storage) types for activations of one dtype.
template <typename T, typename S>
struct KernelTypes {
  using compute = T;
  using storage = S;
};

// f(KernelTypes<T, S>{}) for activations of dtype t: float, double, or bfloat16 (stored as its
// bits, computed in float).
template <typename F>
void dispatch_kernel_types(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: return f(KernelTypes<float, float>{});
    case at::kDouble: return f(KernelTypes<double, double>{});
    case at::kBFloat16: return f(KernelTypes<float, uint16_t>{});
    default: TORCH_CHECK(false, "uniformer_kernels: no CPU kernel for ", t);
  }
}

// A tensor's data as the kernels' storage type S (bfloat16 as its bits); the dtype is the caller's
// dispatch_kernel_types choice.
template <typename S>
const S* data_as(const at::Tensor& t) { return reinterpret_cast<const S*>(t.const_data_ptr()); }
template <typename S>
S* mutable_data_as(const at::Tensor& t) { return reinterpret_cast<S*>(t.mutable_data_ptr()); }

// The dtype of the kernels' weights, norm parameters and statistics for activations of dtype t.
at::ScalarType accumulation_type(at::ScalarType t) { return t == at::kBFloat16 ? at::kFloat : t; }

ConvShape conv_shape(const at::Tensor& x, at::IntArrayRef kernel_size) {
  TORCH_CHECK(x.dim() == 5 && x.is_contiguous(), "uniformer_kernels: expected a contiguous (N, D, H, W, C) input, got ",
              x.sizes());
  TORCH_CHECK(kernel_size.size() == 3, "uniformer_kernels: expected 3 kernel sizes, got ", kernel_size.size());
  for (int64_t k : kernel_size)
    TORCH_CHECK(k >= 1 && k <= 7 && k % 2 == 1, "uniformer_kernels: kernel sizes must be odd and <= 7, got ", kernel_size);
  return {x.size(0), x.size(1), x.size(2), x.size(3), x.size(4),
          kernel_size[0], kernel_size[1], kernel_size[2]};
}

void check_param(const at::Tensor& p, const at::Tensor& x, at::IntArrayRef sizes, const char* name) {
  TORCH_CHECK(p.sizes() == sizes && p.is_contiguous() && p.device() == x.device(),
              "uniformer_kernels: ", name, " must be contiguous with shape ", sizes, " on ", x.device(), ", got ",
              p.sizes(), " on ", p.device());
  const at::ScalarType acc = accumulation_type(x.scalar_type());
  TORCH_CHECK(p.scalar_type() == acc, "uniformer_kernels: ", name, " must be ", acc,
              " (the accumulation dtype), got ", p.scalar_type());
}

void check_cpu_dtype(const at::Tensor& x) {
  const at::ScalarType t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kBFloat16,
              "uniformer_kernels: the CPU kernels take float32, float64 or bfloat16 (ops/ converts float16 inputs), "
              "got ", t);
}

// Rows per task: enough work per task (~32K multiply-adds) to amortise scheduling.
int64_t grain_rows(const ConvShape& s) {
  const int64_t work_per_row = s.width * s.channels * s.kernel_d * s.kernel_h * s.kernel_w;
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_row));
}

// Whether the forward streams its output past the caches (see DepthwiseKernels::forward): when input
// and output together exceed the last-level cache share a core can count on, the output's first rows
// are evicted before anyone reads them anyway, and skipping their read-for-ownership is a third of
// the traffic. Measured (1 thread, 8x64x56x56 3x3, streaming and prefetch together): 1.3x.
constexpr int64_t kStreamBytes = int64_t(8) << 20;

bool stream_output(const at::Tensor& x) { return 2 * static_cast<int64_t>(x.nbytes()) >= kStreamBytes; }

// y5 = the forward on x5 (all (N, D, H, W, C) contiguous, weight (KD, KH, KW, C)).
void run_forward(const at::Tensor& x5, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                 bool residual, const at::Tensor& y5) {
  const ConvShape s = conv_shape(x5, weight.sizes().slice(0, 3));
  const bool stream = stream_output(x5);
  dispatch_kernel_types(x5.scalar_type(), [&](auto types) {
    using T = typename decltype(types)::compute;
    using S = typename decltype(types)::storage;
    const auto& k = cpu_kernels<T, S>();
    const T* b = bias ? data_as<T>(*bias) : nullptr;
    at::parallel_for(0, s.rows(), grain_rows(s), [&](int64_t begin, int64_t end) {
      std::vector<S> row_buffer(stream ? s.width * s.channels : 0);
      k.forward(data_as<S>(x5), data_as<T>(weight), b, residual, mutable_data_as<S>(y5), s, begin, end,
                stream ? row_buffer.data() : nullptr);
    });
  });
}

// ---- Between the ops' layouts and the kernels' -----------------------------------------------------

// The (N, D, H, W, C) view of an (N, C, [D,] H, W) tensor.
at::Tensor channels_last_5d_view(const at::Tensor& x) {
  return (x.dim() == 4 ? x.unsqueeze(2) : x).permute({0, 2, 3, 4, 1});
}

// The memory format the ops return (ops/_depthwise_common.memory_format_of): channels-last when x
// is, and is not also plain contiguous.
at::MemoryFormat output_format(const at::Tensor& x) {
  const auto channels_last = x.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d;
  return x.is_contiguous(channels_last) && !x.is_contiguous() ? channels_last : at::MemoryFormat::Contiguous;
}

void check_op_layout_args(const at::Tensor& x, const at::Tensor& weight) {
  check_cpu_dtype(x);
  TORCH_CHECK((x.dim() == 4 || x.dim() == 5) && weight.dim() == x.dim() && weight.size(0) == x.size(1) &&
                  weight.size(1) == 1 && weight.scalar_type() == x.scalar_type(),
              "uniformer_kernels: expected x (N, C, [D,] H, W) and a depthwise weight (C, 1, [KD,] KH, KW) of its "
              "dtype, got ", x.sizes(), " and ", weight.sizes());
}

// (KD, KH, KW) of a (C, 1, [KD,] KH, KW) weight, KD = 1 for a 2-D one.
std::vector<int64_t> kernel_size_3d(const at::Tensor& weight) {
  return {weight.dim() == 5 ? weight.size(2) : 1, weight.size(-2), weight.size(-1)};
}

// (C, 1, [KD,] KH, KW) -> (KD, KH, KW, C) in the accumulation dtype (a bfloat16 weight widened to
// float), with a plain loop: at::'s strided copy of these few thousand values costs more in thread
// start-up than the transpose itself. With flipped, the kernel is also reversed in every dim (the
// input gradient's kernel): the flat tap index reversed.
at::Tensor weight_taps_last(const at::Tensor& weight, bool flipped = false) {
  const at::Tensor w = weight.contiguous();
  const int64_t channels = w.size(0), taps = w.numel() / channels;
  std::vector<int64_t> sizes = kernel_size_3d(w);
  sizes.push_back(channels);
  at::Tensor taps_last = at::empty(sizes, w.options().dtype(accumulation_type(w.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, w.scalar_type(), "weight_taps_last", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = w.data_ptr<scalar_t>();
    acc_t* dst = taps_last.data_ptr<acc_t>();
    for (int64_t c = 0; c < channels; ++c)
      for (int64_t t = 0; t < taps; ++t) dst[(flipped ? taps - 1 - t : t) * channels + c] = src[c * taps + t];
  });
  return taps_last;
}

// (KD, KH, KW, C) -> like's (C, 1, [KD,] KH, KW), the inverse of weight_taps_last.
at::Tensor weight_from_taps_last(const at::Tensor& taps_last, const at::Tensor& like) {
  const at::Tensor src_tensor = taps_last.contiguous();
  const int64_t channels = like.size(0), taps = like.numel() / channels;
  at::Tensor w = at::empty(like.sizes(), src_tensor.options());
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "weight_from_taps_last", [&] {
    const scalar_t* src = src_tensor.data_ptr<scalar_t>();
    scalar_t* dst = w.data_ptr<scalar_t>();
    for (int64_t c = 0; c < channels; ++c)
      for (int64_t t = 0; t < taps; ++t) dst[c * taps + t] = src[t * channels + c];
  });
  return w;
}

// An output in x's memory format and where the kernel writes it: its own (N, D, H, W, C) view when
// that is contiguous, else a scratch tensor that finish() copies over.
struct OpLayoutOutput {
  at::Tensor out, out5, scratch5;

  explicit OpLayoutOutput(const at::Tensor& x)
      : out(at::empty_like(x, output_format(x))), out5(channels_last_5d_view(out)) {
    if (!out5.is_contiguous()) scratch5 = at::empty(out5.sizes(), out5.options());
  }
  const at::Tensor& kernel_target() const { return scratch5.defined() ? scratch5 : out5; }
  at::Tensor finish() {
    if (scratch5.defined()) out5.copy_(scratch5);
    return out;
  }
};

at::Tensor depthwise_conv_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              bool residual) {
  check_op_layout_args(x, weight);
  const at::Tensor x5 = channels_last_5d_view(x).contiguous();
  const at::Tensor taps_last = weight_taps_last(weight);
  std::optional<at::Tensor> bias_c;
  if (bias) {
    bias_c = bias->contiguous().to(accumulation_type(x.scalar_type()));
    check_param(*bias_c, x5, {x5.size(4)}, "bias");
  }
  OpLayoutOutput y(x);
  run_forward(x5, taps_last, bias_c, residual, y.kernel_target());
  return y.finish();
}

// (grad_weight (KD, KH, KW, C), grad_bias) from grad_y and x, both (N, D, H, W, C) contiguous.
// Rows are split into a fixed number of chunks, each summing into its own buffer, and the buffers
// are added in chunk order: the result depends on the thread count, never on thread timing.
std::tuple<at::Tensor, at::Tensor> run_weight_grad(const at::Tensor& grad_y, const at::Tensor& x,
                                                   at::IntArrayRef kernel_size) {
  const ConvShape s = conv_shape(x, kernel_size);
  TORCH_CHECK(grad_y.sizes() == x.sizes() && grad_y.is_contiguous() && grad_y.scalar_type() == x.scalar_type(),
              "uniformer_kernels: grad_y must be contiguous and match x (", x.sizes(), ", ", x.scalar_type(),
              "), got ", grad_y.sizes(), ", ", grad_y.scalar_type());
  const int64_t rows = s.rows();
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows));
  const int64_t rows_per_chunk = (rows + chunks - 1) / chunks;
  const int64_t taps = s.kernel_d * s.kernel_h * s.kernel_w;
  const auto acc_options = x.options().dtype(accumulation_type(x.scalar_type()));
  at::Tensor partial_w = at::zeros({chunks, taps * s.channels}, acc_options);
  at::Tensor partial_b = at::zeros({chunks, s.channels}, acc_options);
  dispatch_kernel_types(x.scalar_type(), [&](auto types) {
    using T = typename decltype(types)::compute;
    using S = typename decltype(types)::storage;
    const auto& k = cpu_kernels<T, S>();
    at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
      for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
        const int64_t begin = chunk * rows_per_chunk, end = std::min(rows, begin + rows_per_chunk);
        if (begin >= end) continue;
        k.weight_grad(data_as<S>(grad_y), data_as<S>(x), mutable_data_as<T>(partial_w[chunk]),
                      mutable_data_as<T>(partial_b[chunk]), s, begin, end);
      }
    });
  });
  at::Tensor grad_w = partial_w[0].clone();
  at::Tensor grad_b = partial_b[0].clone();
  for (int64_t chunk = 1; chunk < chunks; ++chunk) {
    grad_w += partial_w[chunk];
    grad_b += partial_b[chunk];
  }
  return {grad_w.view({s.kernel_d, s.kernel_h, s.kernel_w, s.channels}), grad_b};
}

// The CPU backend's backward in the ops' own layouts: (grad_x in x's memory format, grad_weight
// (C, 1, k...), grad_bias (C,)), an entry whose output_mask is false being empty. grad_x is the
// forward conv of grad_y with the flipped kernel (stride 1, padding k//2), plus grad_y for residual.
std::tuple<at::Tensor, at::Tensor, at::Tensor> depthwise_conv_backward_cpu(const at::Tensor& grad_y,
                                                                           const at::Tensor& x,
                                                                           const at::Tensor& weight, bool residual,
                                                                           std::array<bool, 3> output_mask) {
  check_op_layout_args(x, weight);
  TORCH_CHECK(grad_y.sizes() == x.sizes() && grad_y.scalar_type() == x.scalar_type(),
              "uniformer_kernels: grad_y must match x (", x.sizes(), ", ", x.scalar_type(), "), got ", grad_y.sizes(),
              ", ", grad_y.scalar_type());
  const auto [need_x, need_weight, need_bias] = output_mask;
  const at::Tensor grad_y5 = channels_last_5d_view(grad_y).contiguous();
  at::Tensor grad_x = at::empty({0}, x.options()), grad_weight = grad_x.clone(), grad_bias = grad_x.clone();
  if (need_x) {
    OpLayoutOutput out(x);
    run_forward(grad_y5, weight_taps_last(weight, /*flipped=*/true), std::nullopt, residual, out.kernel_target());
    grad_x = out.finish();
  }
  if (need_weight || need_bias) {
    const at::Tensor x5 = channels_last_5d_view(x).contiguous();
    auto [grad_w_taps_last, grad_b] = run_weight_grad(grad_y5, x5, kernel_size_3d(weight));
    if (need_weight) grad_weight = weight_from_taps_last(grad_w_taps_last, weight).to(weight.scalar_type());
    if (need_bias) grad_bias = grad_b.to(weight.scalar_type());
  }
  return {grad_x, grad_weight, grad_bias};
}

// y5, z5 = the pos_embed_norm forward on x5 (all (N, D, H, W, C) contiguous); returns (mean, rstd).
std::tuple<at::Tensor, at::Tensor> run_pos_embed_norm(const at::Tensor& x5, const at::Tensor& weight,
                                                      const at::Tensor& bias, const at::Tensor& norm_weight,
                                                      const at::Tensor& norm_bias, int64_t norm, double eps,
                                                      const at::Tensor& y5, const at::Tensor& z5) {
  TORCH_CHECK(norm == 0 || norm == 1, "uniformer_kernels: norm must be 0 (layernorm) or 1 (affine), got ", norm);
  const ConvShape s = conv_shape(x5, weight.sizes().slice(0, 3));
  check_param(weight, x5, {s.kernel_d, s.kernel_h, s.kernel_w, s.channels}, "weight");
  check_param(bias, x5, {s.channels}, "bias");
  check_param(norm_weight, x5, {s.channels}, "norm_weight");
  check_param(norm_bias, x5, {s.channels}, "norm_bias");
  const bool layer_norm = norm == 0;
  const int64_t pixels = layer_norm ? s.rows() * s.width : 0;
  const auto stat_options = x5.options().dtype(accumulation_type(x5.scalar_type()));
  at::Tensor mean = at::empty({pixels}, stat_options), rstd = at::empty({pixels}, stat_options);
  dispatch_kernel_types(x5.scalar_type(), [&](auto types) {
    using T = typename decltype(types)::compute;
    using S = typename decltype(types)::storage;
    const auto& k = cpu_kernels<T, S>();
    at::parallel_for(0, s.rows(), grain_rows(s), [&](int64_t begin, int64_t end) {
      k.pos_embed_norm(data_as<S>(x5), data_as<T>(weight), data_as<T>(bias), data_as<T>(norm_weight),
                       data_as<T>(norm_bias), layer_norm, static_cast<T>(eps), mutable_data_as<S>(y5),
                       mutable_data_as<S>(z5), mutable_data_as<T>(mean), mutable_data_as<T>(rstd), s, begin, end);
    });
  });
  return {mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pos_embed_norm_cpu(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& norm_weight,
    const at::Tensor& norm_bias, int64_t norm, double eps) {
  check_op_layout_args(x, weight);
  const at::Tensor x5 = channels_last_5d_view(x).contiguous();
  const at::ScalarType acc = accumulation_type(x.scalar_type());
  OpLayoutOutput y(x), z(x);
  auto [mean, rstd] = run_pos_embed_norm(x5, weight_taps_last(weight), bias.contiguous().to(acc),
                                         norm_weight.contiguous().to(acc), norm_bias.contiguous().to(acc), norm, eps,
                                         y.kernel_target(), z.kernel_target());
  return {y.finish(), z.finish(), mean, rstd};
}

}  // namespace

TORCH_LIBRARY(uniformer_kernels_C, m) {
  m.def("depthwise_conv_forward(Tensor x, Tensor weight, Tensor? bias, bool residual) -> Tensor");
  m.def("depthwise_conv_backward_weight(Tensor grad_y, Tensor x, int[] kernel_size, bool deterministic)"
        " -> (Tensor, Tensor)");
  m.def("pos_embed_norm_forward(Tensor x, Tensor weight, Tensor bias, Tensor norm_weight, Tensor norm_bias,"
        " int norm, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  // The CPU backend, in the ops' own layouts (x (N, C, [D,] H, W), weight (C, 1, k...)).
  m.def("depthwise_conv_cpu(Tensor x, Tensor weight, Tensor? bias, bool residual) -> Tensor");
  m.def("depthwise_conv_backward_cpu(Tensor grad_y, Tensor x, Tensor weight, bool residual, bool[3] output_mask)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("pos_embed_norm_cpu(Tensor x, Tensor weight, Tensor bias, Tensor norm_weight, Tensor norm_bias,"
        " int norm, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(uniformer_kernels_C, CPU, m) {
  m.impl("depthwise_conv_cpu", &depthwise_conv_cpu);
  m.impl("depthwise_conv_backward_cpu", &depthwise_conv_backward_cpu);
  m.impl("pos_embed_norm_cpu", &pos_embed_norm_cpu);
}

}  // namespace uniformer_kernels
