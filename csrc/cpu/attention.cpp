// Op 4's CPU kernel: attention on the packed qkv, one (sequence, head) per task.
//
// uniformer_kernels/ops/attention.py validates the arguments and calls these through
// torch.ops.uniformer_kernels_C for float32/float64 inputs (16-bit inputs and sequences over 512
// tokens take the flash kernel there). A task runs three steps on one head of one sequence:
//   scores = scale * q k^T          BLAS gemm, read straight out of qkv (row stride = qkv's)
//   probs  = softmax(scores)        in place, in a per-thread L x L buffer that stays in L2
//   out    = probs v                BLAS gemm, written straight into out (row stride = out's)
// (the forward divides out's rows by the softmax sums rather than normalising the L x L matrix;
// sequences of up to 16 tokens use plain loops instead of BLAS, see TaskGemm).
// Eager PyTorch runs the same three steps on every head at once: its score matrix (6 MB at
// UniFormer-S stage 3, batch 8) leaves the cache between steps, and q, k, v and out go through
// permute copies. The backward recomputes probs from the saved log-sum-exp the same way. Window
// attention gathers a window's rows (padding tokens = the qkv bias) into per-thread buffers and
// scatters the results, instead of the reference's padded and partitioned copies of the grid.
//
// The gemm is the BLAS that torch links (MKL on x86 wheels), looked up as a weak symbol so that a
// torch without it still loads this library: available_cpu_attention() says whether it was found.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

#include "attention_kernels.h"
#include "cpu_isa.h"

extern "C" {
// Fortran BLAS, LP64 (32-bit ints); column-major.
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

namespace uniformer_kernels {
namespace {

// C (m x n) = alpha * op(A) op(B), column-major like BLAS. The row-major matrices below are
// column-major transposes, which is how each call site reads.
void gemm(char transa, char transb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float* c, int64_t ldc) {
  const int mi = m, ni = n, ki = k, ldai = lda, ldbi = ldb, ldci = ldc;
  const float beta = 0;
  sgemm_(&transa, &transb, &mi, &ni, &ki, &alpha, a, &ldai, b, &ldbi, &beta, c, &ldci);
}

void gemm(char transa, char transb, int64_t m, int64_t n, int64_t k, double alpha, const double* a, int64_t lda,
          const double* b, int64_t ldb, double* c, int64_t ldc) {
  const int mi = m, ni = n, ki = k, ldai = lda, ldbi = ldb, ldci = ldc;
  const double beta = 0;
  dgemm_(&transa, &transb, &mi, &ni, &ki, &alpha, a, &ldai, b, &ldbi, &beta, c, &ldci);
}

// A task's gemm: BLAS, or up to kSmallSeqLen tokens the row kernels' small_gemm, where a BLAS call's
// overhead outweighs the arithmetic. 16 measured best on an AMD EPYC: at L = 4 (video temporal
// attention, batch 8) the forward takes half the BLAS path's time; at L = 26 BLAS is faster.
constexpr int64_t kSmallSeqLen = 16;

template <typename T>
struct TaskGemm {
  const AttentionRowKernels<T>& kernels;
  bool small;

  void operator()(char transa, char transb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
                  const T* b, int64_t ldb, T* c, int64_t ldc) const {
    if (small)
      kernels.small_gemm(transa, transb, m, n, k, alpha, a, lda, b, ldb, c, ldc);
    else
      gemm(transa, transb, m, n, k, alpha, a, lda, b, ldb, c, ldc);
  }
};

// A (seq_len x head_dim) block: the rows of one head of one sequence, row stride ld.
template <typename T>
struct HeadRows {
  T* data;
  int64_t ld;
};

// The geometry shared by qkv, out, grad_out and grad_qkv, all 4-D (S1, S2, N, X) with a dense last
// dim. Global and split attention: sequence s = s1 * S2 + s2 is the (N x X) block at (s1, s2).
// Window attention (window > 0): S1 = 1, S2 = B images of a grid_h x grid_w token grid, cut into
// window x window tiles after padding the grid right and bottom; sequence s is tile s % (rows * cols)
// of image s / (rows * cols), its tokens in row-major order within the tile.
struct Sequences {
  int64_t outer, inner, seq_len, heads, head_dim;
  int64_t window, grid_h, grid_w, rows, cols;

  bool windowed() const { return window > 0; }
  int64_t count() const { return windowed() ? inner * rows * cols : outer * inner; }
};

template <typename T>
HeadRows<T> head_rows(const at::Tensor& t, const Sequences& g, int64_t seq, int64_t channel_offset) {
  const int64_t s1 = seq / g.inner, s2 = seq % g.inner;
  T* base = t.data_ptr<T>() + s1 * t.stride(0) + s2 * t.stride(1) + channel_offset;
  return {base, t.stride(2)};
}

// Window mode: the grid token of row i of sequence seq (its image in *image), or -1 for padding.
int64_t window_token(const Sequences& g, int64_t seq, int64_t i, int64_t* image) {
  const int64_t tiles = g.rows * g.cols, tile = seq % tiles;
  *image = seq / tiles;
  const int64_t y = tile / g.cols * g.window + i / g.window, x = tile % g.cols * g.window + i % g.window;
  return y < g.grid_h && x < g.grid_w ? y * g.grid_w + x : -1;
}

// Window mode: a window's rows are not one strided block (and its padding tokens exist nowhere), so
// its operands are gathered into a (seq_len x head_dim) buffer: channels [offset, offset + head_dim)
// of each token, padding rows taken from fill (the qkv bias) or zero when fill is null.
template <typename T>
HeadRows<T> gather_window(const at::Tensor& t, const Sequences& g, int64_t seq, int64_t offset, const T* fill,
                          T* buffer) {
  for (int64_t i = 0; i < g.seq_len; ++i) {
    int64_t image;
    const int64_t token = window_token(g, seq, i, &image);
    T* row = buffer + i * g.head_dim;
    if (token >= 0) {
      const T* src = t.data_ptr<T>() + image * t.stride(1) + token * t.stride(2) + offset;
      std::copy(src, src + g.head_dim, row);
    } else if (fill) {
      std::copy(fill + offset, fill + offset + g.head_dim, row);
    } else {
      std::fill(row, row + g.head_dim, T(0));
    }
  }
  return {buffer, g.head_dim};
}

// The inverse: the window's real rows into t, padding rows added into padding_sum (the gradient of
// the qkv bias, at the same offset) when given, else dropped (cropped queries).
template <typename T>
void scatter_window(const T* buffer, const Sequences& g, int64_t seq, const at::Tensor& t, int64_t offset,
                    T* padding_sum) {
  for (int64_t i = 0; i < g.seq_len; ++i) {
    int64_t image;
    const int64_t token = window_token(g, seq, i, &image);
    const T* row = buffer + i * g.head_dim;
    if (token >= 0) {
      std::copy(row, row + g.head_dim, t.data_ptr<T>() + image * t.stride(1) + token * t.stride(2) + offset);
    } else if (padding_sum) {
      for (int64_t d = 0; d < g.head_dim; ++d) padding_sum[offset + d] += row[d];
    }
  }
}

// A task's operand: a strided block of t or, in window mode, the window's rows in slot (gathered
// from t for what the task reads; scattered back by the caller for what it writes).
template <typename T>
HeadRows<T> read_rows(const at::Tensor& t, const Sequences& g, int64_t seq, int64_t offset, const T* fill,
                      T* slot) {
  return g.windowed() ? gather_window(t, g, seq, offset, fill, slot) : head_rows<T>(t, g, seq, offset);
}

template <typename T>
HeadRows<T> write_rows(const at::Tensor& t, const Sequences& g, int64_t seq, int64_t offset, T* slot) {
  return g.windowed() ? HeadRows<T>{slot, g.head_dim} : head_rows<T>(t, g, seq, offset);
}

Sequences check_qkv(const at::Tensor& qkv, int64_t num_heads, int64_t window, int64_t grid_h, int64_t grid_w) {
  TORCH_CHECK(qkv.dim() == 4 && qkv.stride(3) == 1, "uniformer_kernels: expected a (S1, S2, L, 3C) qkv with a dense "
              "last dim, got sizes ", qkv.sizes(), " strides ", qkv.strides());
  TORCH_CHECK(qkv.scalar_type() == at::kFloat || qkv.scalar_type() == at::kDouble,
              "uniformer_kernels: the CPU attention kernel takes float32 or float64, got ", qkv.scalar_type());
  TORCH_CHECK(num_heads > 0 && qkv.size(3) % (3 * num_heads) == 0, "uniformer_kernels: last dim ", qkv.size(3),
              " is not 3 * heads * head_dim for ", num_heads, " heads");
  Sequences g{qkv.size(0), qkv.size(1), qkv.size(2), num_heads, qkv.size(3) / (3 * num_heads), 0, 0, 0, 0, 0};
  if (window > 0) {
    TORCH_CHECK(qkv.size(0) == 1 && grid_h > 0 && grid_w > 0 && qkv.size(2) == grid_h * grid_w,
                "uniformer_kernels: window attention expects a (1, B, ", grid_h, " * ", grid_w, ", 3C) qkv, got ",
                qkv.sizes());
    g.window = window;
    g.grid_h = grid_h;
    g.grid_w = grid_w;
    g.rows = (grid_h + window - 1) / window;
    g.cols = (grid_w + window - 1) / window;
    g.seq_len = window * window;
  }
  TORCH_CHECK(g.seq_len <= std::numeric_limits<int>::max() / std::max<int64_t>(1, g.seq_len),
              "uniformer_kernels: sequence length ", g.seq_len, " too long for a 32-bit BLAS");
  return g;
}

void check_like(const at::Tensor& t, const at::Tensor& qkv, int64_t last_dim, const char* name) {
  TORCH_CHECK(t.dim() == 4 && t.stride(3) == 1 && t.sizes().slice(0, 3) == qkv.sizes().slice(0, 3) &&
                  t.size(3) == last_dim && t.scalar_type() == qkv.scalar_type(),
              "uniformer_kernels: ", name, " must be (S1, S2, L, ", last_dim, ") with a dense last dim and qkv's "
              "dtype, got sizes ", t.sizes(), " strides ", t.strides(), " dtype ", t.scalar_type());
}

void check_rows(const at::Tensor& t, const Sequences& g, const at::Tensor& qkv, const char* name) {
  TORCH_CHECK(t.is_contiguous() && t.sizes() == at::IntArrayRef({g.count(), g.heads, g.seq_len}) &&
                  t.scalar_type() == qkv.scalar_type(),
              "uniformer_kernels: ", name, " must be contiguous (", g.count(), ", ", g.heads, ", ", g.seq_len,
              ") of qkv's dtype, got ", t.sizes(), " ", t.scalar_type());
}

// A task's L x L score matrices live in a per-chunk buffer of rows padded to a multiple of kRowPad
// (160 KB per matrix at L = 196: it stays in L2). The gemms write the first len entries of each row;
// set_padding sets the rest, which the row operations read. The scores are scale * q k^T in log2
// units (see attention_kernels.h); lse stays in natural units, like the other backends'.
constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

int64_t padded_row(int64_t len) { return (len + kRowPad - 1) / kRowPad * kRowPad; }

template <typename T>
void set_padding(T* rows, int64_t len, int64_t ld, T value) {
  for (int64_t i = 0; i < len; ++i) std::fill(rows + i * ld + len, rows + (i + 1) * ld, value);
}

// The row operations' build for the ISA chosen for this process (cpu_isa.h).
template <typename T>
AttentionRowKernels<T> row_kernels_for(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::avx512: return avx512::attention_row_kernels<T>();
    case CpuIsa::avx2: return avx2::attention_row_kernels<T>();
    default: return baseline::attention_row_kernels<T>();
  }
}

template <typename T>
const AttentionRowKernels<T>& row_kernels() {
  static const AttentionRowKernels<T> chosen = row_kernels_for<T>(chosen_cpu_isa());
  return chosen;
}

// The bias, if any, as a pointer (window padding tokens take its values), checked against qkv.
template <typename T>
const T* bias_data(const std::optional<at::Tensor>& bias, const at::Tensor& qkv) {
  if (!bias) return nullptr;
  TORCH_CHECK(bias->is_contiguous() && bias->dim() == 1 && bias->size(0) == qkv.size(3) &&
                  bias->scalar_type() == qkv.scalar_type(),
              "uniformer_kernels: qkv_bias must be a contiguous (", qkv.size(3), ",) tensor of qkv's dtype, got ",
              bias->sizes(), " ", bias->scalar_type());
  return bias->data_ptr<T>();
}

void cpu_attention_forward(const at::Tensor& qkv, const std::optional<at::Tensor>& qkv_bias, const at::Tensor& out,
                           const at::Tensor& lse, const at::Tensor& cls_probs, int64_t num_heads, double scale,
                           int64_t window, int64_t grid_h, int64_t grid_w) {
  TORCH_CHECK(sgemm_ != nullptr && dgemm_ != nullptr, "uniformer_kernels: torch links no BLAS sgemm_");
  const Sequences g = check_qkv(qkv, num_heads, window, grid_h, grid_w);
  const int64_t channels = g.heads * g.head_dim, len = g.seq_len, ld = padded_row(len);
  check_like(out, qkv, channels, "out");
  check_rows(lse, g, qkv, "lse");
  const bool with_cls = cls_probs.numel() > 0;
  if (with_cls) check_rows(cls_probs, g, qkv, "cls_probs");
  AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "cpu_attention_forward", [&] {
    const auto& rows = row_kernels<scalar_t>();
    const scalar_t* bias = bias_data<scalar_t>(qkv_bias, qkv);
    at::parallel_for(0, g.count() * g.heads, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> scores(len * ld), inv_sums(len);
      const TaskGemm<scalar_t> task_gemm{rows, len <= kSmallSeqLen};
      std::vector<scalar_t> window_rows(g.windowed() ? 4 * len * g.head_dim : 0);  // q, k, v, out
      auto slot = [&](int64_t n) { return g.windowed() ? window_rows.data() + n * len * g.head_dim : nullptr; };
      scalar_t* exps = scores.data();
      for (int64_t task = begin; task < end; ++task) {
        const int64_t seq = task / g.heads, q_off = task % g.heads * g.head_dim;
        const int64_t k_off = channels + q_off, v_off = 2 * channels + q_off;
        const auto q = read_rows(qkv, g, seq, q_off, bias, slot(0));
        const auto k = read_rows(qkv, g, seq, k_off, bias, slot(1));
        const auto v = read_rows(qkv, g, seq, v_off, bias, slot(2));
        const auto o = write_rows(out, g, seq, q_off, slot(3));
        // scores (query-major, L x L, log2 units) = scale log2(e) q k^T, i.e. column-major k q^T
        task_gemm('T', 'N', len, len, g.head_dim, scalar_t(scale * kLog2e), k.data, k.ld, q.data, q.ld, exps, ld);
        set_padding(exps, len, ld, scalar_t(kPadScore));
        scalar_t* task_lse = lse.data_ptr<scalar_t>() + task * len;
        for (int64_t i = 0; i < len; ++i) {
          scalar_t sum;
          const scalar_t max = rows.exp2_minus_max(exps + i * ld, ld, &sum);
          task_lse[i] = max * scalar_t(kLn2) + std::log(sum);
          inv_sums[i] = scalar_t(1) / sum;
        }
        // out (L x D) = softmax(scores) v: column-major v^T exps^T, then each row divided by its sum
        // (L x D divisions instead of L x L)
        task_gemm('N', 'N', g.head_dim, len, len, scalar_t(1), v.data, v.ld, exps, ld, o.data, o.ld);
        for (int64_t i = 0; i < len; ++i)
          for (int64_t d = 0; d < g.head_dim; ++d) o.data[i * o.ld + d] *= inv_sums[i];
        if (g.windowed()) scatter_window<scalar_t>(o.data, g, seq, out, q_off, nullptr);
        if (with_cls) {
          scalar_t* task_cls = cls_probs.data_ptr<scalar_t>() + task * len;
          for (int64_t j = 0; j < len; ++j) task_cls[j] = exps[j] * inv_sums[0];
        }
      }
    });
  });
}

// grad_qkv gets dq, dk, dv; grad_cls_probs (empty when not needed) is the gradient of the class
// token's probability row, which joins the softmax backward of query 0. grad_bias (empty without a
// bias) gets the gradient that reaches the window padding tokens. Tasks are split into a fixed
// number of chunks, each summing its padding gradient into its own row, added in chunk order: the
// result depends on the thread count, never on thread timing.
void cpu_attention_backward(const at::Tensor& grad_out, const at::Tensor& grad_cls_probs, const at::Tensor& qkv,
                            const std::optional<at::Tensor>& qkv_bias, const at::Tensor& lse,
                            const at::Tensor& grad_qkv, const at::Tensor& grad_bias, int64_t num_heads, double scale,
                            int64_t window, int64_t grid_h, int64_t grid_w) {
  TORCH_CHECK(sgemm_ != nullptr && dgemm_ != nullptr, "uniformer_kernels: torch links no BLAS sgemm_");
  const Sequences g = check_qkv(qkv, num_heads, window, grid_h, grid_w);
  const int64_t channels = g.heads * g.head_dim, len = g.seq_len, ld = padded_row(len);
  check_like(grad_out, qkv, channels, "grad_out");
  check_like(grad_qkv, qkv, 3 * channels, "grad_qkv");
  check_rows(lse, g, qkv, "lse");
  const bool with_cls = grad_cls_probs.numel() > 0;
  if (with_cls) check_rows(grad_cls_probs, g, qkv, "grad_cls_probs");
  const bool with_bias_grad = g.windowed() && qkv_bias.has_value();
  if (with_bias_grad)
    TORCH_CHECK(grad_bias.is_contiguous() && grad_bias.sizes() == qkv_bias->sizes() &&
                    grad_bias.scalar_type() == qkv.scalar_type(),
                "uniformer_kernels: grad_bias must be contiguous like qkv_bias, got ", grad_bias.sizes());
  const int64_t tasks = g.count() * g.heads;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tasks));
  const int64_t tasks_per_chunk = (tasks + chunks - 1) / chunks;
  at::Tensor partial_bias = at::zeros({with_bias_grad ? chunks : 0, 3 * channels}, qkv.options());
  AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "cpu_attention_backward", [&] {
    const auto& rows = row_kernels<scalar_t>();
    const scalar_t* bias = bias_data<scalar_t>(qkv_bias, qkv);
    at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
      std::vector<scalar_t> scores(2 * len * ld);
      const TaskGemm<scalar_t> task_gemm{rows, len <= kSmallSeqLen};
      std::vector<scalar_t> window_rows(g.windowed() ? 7 * len * g.head_dim : 0);  // q, k, v, grad o, q, k, v
      auto slot = [&](int64_t n) { return g.windowed() ? window_rows.data() + n * len * g.head_dim : nullptr; };
      scalar_t* probs = scores.data();
      scalar_t* grad_scores = probs + len * ld;
      for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
        scalar_t* padding_grad = with_bias_grad ? partial_bias[chunk].data_ptr<scalar_t>() : nullptr;
        for (int64_t task = chunk * tasks_per_chunk; task < std::min(tasks, (chunk + 1) * tasks_per_chunk); ++task) {
          const int64_t seq = task / g.heads, q_off = task % g.heads * g.head_dim;
          const int64_t k_off = channels + q_off, v_off = 2 * channels + q_off;
          const auto q = read_rows(qkv, g, seq, q_off, bias, slot(0));
          const auto k = read_rows(qkv, g, seq, k_off, bias, slot(1));
          const auto v = read_rows(qkv, g, seq, v_off, bias, slot(2));
          const auto grad_o = read_rows<scalar_t>(grad_out, g, seq, q_off, nullptr, slot(3));
          const auto grad_q = write_rows(grad_qkv, g, seq, q_off, slot(4));
          const auto grad_k = write_rows(grad_qkv, g, seq, k_off, slot(5));
          const auto grad_v = write_rows(grad_qkv, g, seq, v_off, slot(6));
          task_gemm('T', 'N', len, len, g.head_dim, scalar_t(scale * kLog2e), k.data, k.ld, q.data, q.ld, probs, ld);
          set_padding(probs, len, ld, scalar_t(kPadScore));
          const scalar_t* task_lse = lse.data_ptr<scalar_t>() + task * len;
          for (int64_t i = 0; i < len; ++i) rows.exp2_minus(probs + i * ld, ld, task_lse[i] * scalar_t(kLog2e));
          // dv (L x D) = probs^T grad_o, i.e. column-major grad_o^T probs
          task_gemm('N', 'T', g.head_dim, len, len, scalar_t(1), grad_o.data, grad_o.ld, probs, ld, grad_v.data,
               grad_v.ld);
          // grad_probs (L x L) = grad_o v^T, i.e. column-major v grad_o^T
          task_gemm('T', 'N', len, len, g.head_dim, scalar_t(1), v.data, v.ld, grad_o.data, grad_o.ld, grad_scores, ld);
          set_padding(grad_scores, len, ld, scalar_t(0));
          if (with_cls) {  // the class token's probability row is probs' row 0
            const scalar_t* grad_cls = grad_cls_probs.data_ptr<scalar_t>() + task * len;
            for (int64_t j = 0; j < len; ++j) grad_scores[j] += grad_cls[j];
          }
          for (int64_t i = 0; i < len; ++i) rows.softmax_backward(probs + i * ld, grad_scores + i * ld, ld);
          // dq (L x D) = scale * grad_scores k, i.e. column-major k^T grad_scores^T
          task_gemm('N', 'N', g.head_dim, len, len, scalar_t(scale), k.data, k.ld, grad_scores, ld, grad_q.data,
               grad_q.ld);
          // dk (L x D) = scale * grad_scores^T q, i.e. column-major q^T grad_scores
          task_gemm('N', 'T', g.head_dim, len, len, scalar_t(scale), q.data, q.ld, grad_scores, ld, grad_k.data,
               grad_k.ld);
          if (g.windowed()) {
            scatter_window<scalar_t>(grad_q.data, g, seq, grad_qkv, q_off, padding_grad);
            scatter_window<scalar_t>(grad_k.data, g, seq, grad_qkv, k_off, padding_grad);
            scatter_window<scalar_t>(grad_v.data, g, seq, grad_qkv, v_off, padding_grad);
          }
        }
      }
    });
  });
  if (with_bias_grad) grad_bias.copy_(partial_bias.sum(0));
}

}  // namespace

bool available_cpu_attention() { return sgemm_ != nullptr && dgemm_ != nullptr; }

TORCH_LIBRARY_FRAGMENT(uniformer_kernels_C, m) {
  m.def("attention_forward(Tensor qkv, Tensor? qkv_bias, Tensor(a!) out, Tensor(b!) lse, Tensor(c!) cls_probs,"
        " int num_heads, float scale, int window_size, int grid_h, int grid_w) -> ()");
  m.def("attention_backward(Tensor grad_out, Tensor grad_cls_probs, Tensor qkv, Tensor? qkv_bias, Tensor lse,"
        " Tensor(a!) grad_qkv, Tensor(b!) grad_bias, int num_heads, float scale, int window_size, int grid_h,"
        " int grid_w) -> ()");
}

TORCH_LIBRARY_IMPL(uniformer_kernels_C, CPU, m) {
  m.impl("attention_forward", &cpu_attention_forward);
  m.impl("attention_backward", &cpu_attention_backward);
}

}  // namespace uniformer_kernels
