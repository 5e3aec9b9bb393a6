// Portable row operations of the CPU attention kernel (see attention_kernels.h). Included inside a
// namespace by attention_kernels_baseline.cpp and attention_kernels_avx2.cpp, after the standard
// headers it uses (<algorithm>, <cmath>).

template <typename T>
T exp2_minus_max_rows(T* row, int64_t len, T* sum) {
  const T max = *std::max_element(row, row + len);
  T total = 0;
  for (int64_t j = 0; j < len; ++j) total += row[j] = std::exp2(row[j] - max);
  *sum = total;
  return max;
}

template <typename T>
void exp2_minus_rows(T* row, int64_t len, T shift) {
  for (int64_t j = 0; j < len; ++j) row[j] = std::exp2(row[j] - shift);
}

template <typename T>
void softmax_backward_rows(const T* probs, T* grad_row, int64_t len) {
  T dot = 0;
  for (int64_t j = 0; j < len; ++j) dot += probs[j] * grad_row[j];
  for (int64_t j = 0; j < len; ++j) grad_row[j] = probs[j] * (grad_row[j] - dot);
}

// <x, y> over k entries, in 8 interleaved partial sums that the compiler keeps in one vector.
template <typename T>
T dot(const T* x, const T* y, int64_t k) {
  T partial[8] = {};
  int64_t l = 0;
  for (; l + 8 <= k; l += 8)
    for (int u = 0; u < 8; ++u) partial[u] += x[l + u] * y[l + u];
  T total = 0;
  for (; l < k; ++l) total += x[l] * y[l];
  for (int u = 0; u < 8; ++u) total += partial[u];
  return total;
}

// See AttentionRowKernels::small_gemm. A^T B: each entry is a dot product of two contiguous
// columns. A B and A B^T: column j of C accumulates A's columns scaled by op(B)'s entries, the
// inner loop running down a column of A so that it vectorises.
template <typename T>
void small_gemm_cols(char transa, char transb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
                     const T* b, int64_t ldb, T* __restrict__ c, int64_t ldc) {
  if (transa == 'T') {
    for (int64_t j = 0; j < n; ++j)
      for (int64_t i = 0; i < m; ++i) c[i + j * ldc] = alpha * dot(a + i * lda, b + j * ldb, k);
    return;
  }
  for (int64_t j = 0; j < n; ++j) {
    T* __restrict__ col = c + j * ldc;
    std::fill(col, col + m, T(0));
    for (int64_t l = 0; l < k; ++l) {
      const T factor = alpha * (transb == 'N' ? b[l + j * ldb] : b[j + l * ldb]);
      const T* __restrict__ a_col = a + l * lda;
      for (int64_t i = 0; i < m; ++i) col[i] += a_col[i] * factor;
    }
  }
}
