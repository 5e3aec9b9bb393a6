// Row operations of the CPU attention kernel (attention.cpp), on one row of a task's L x L score
// matrix (no torch types).
//
// They exist three times, compiled from one template source (attention_kernels_impl.h): for the
// baseline ISA and, in attention_kernels_avx2.cpp and _avx512.cpp, for AVX2 + FMA and AVX-512 with
// float versions hand-vectorised once over vector traits (attention_kernels_simd.h); attention.cpp
// runs the build cpu_isa.h chooses once per process. The float exp there is the softmax's cost: the
// generic vector code GCC makes of it is latency-bound on the polynomial and 2x slower.
//
// Score rows are in log2 units (the gemm's alpha folds log2(e) into the scale), so the softmax takes
// powers of 2: no multiply by log2(e) and an exact range reduction in the vector code.
//
// Rows are padded to len, a multiple of kRowPad, so that no vector loop has a scalar tail: a score
// row's padding holds kPadScore (its power of 2 comes out as 0 to float precision, and no gemm reads
// it), a gradient row's padding any finite value.
#pragma once

#include <cstdint>

namespace uniformer_kernels {

constexpr int64_t kRowPad = 16;
constexpr float kPadScore = -1e30f;

template <typename T>
struct AttentionRowKernels {
  // row <- 2^(row - max(row)); returns the max, and the sum of the powers in *sum.
  T (*exp2_minus_max)(T* row, int64_t len, T* sum);
  // row <- 2^(row - shift): the probabilities again, from the scores and their log2-sum-exp2.
  void (*exp2_minus)(T* row, int64_t len, T shift);
  // grad_row <- probs * (grad_row - <probs, grad_row>): the scores' gradient from the
  // probabilities'.
  void (*softmax_backward)(const T* probs, T* grad_row, int64_t len);
  // C (m x n, column-major) = alpha op(A) op(B) as BLAS computes it (op = 'N' or 'T'; not A^T B^T),
  // for operands so small that a BLAS call's overhead outweighs its arithmetic.
  void (*small_gemm)(char transa, char transb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
                     const T* b, int64_t ldb, T* c, int64_t ldc);
};

// Whether torch links the BLAS gemm (sgemm_, dgemm_) that attention.cpp calls.
bool available_cpu_attention();

namespace baseline {
template <typename T>
AttentionRowKernels<T> attention_row_kernels();
}
namespace avx2 {
template <typename T>
AttentionRowKernels<T> attention_row_kernels();
}
namespace avx512 {
template <typename T>
AttentionRowKernels<T> attention_row_kernels();
}

}  // namespace uniformer_kernels
