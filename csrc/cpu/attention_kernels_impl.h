// Portable row operations of the CPU attention kernel (see attention_kernels.h). Included inside a
// namespace by attention_kernels_baseline.cpp and attention_kernels_avx2.cpp, after the standard
// headers it uses (<algorithm>, <cmath>).

template <typename T>
T exp_minus_max_rows(T* row, int64_t len, T* sum) {
  const T max = *std::max_element(row, row + len);
  T total = 0;
  for (int64_t j = 0; j < len; ++j) total += row[j] = std::exp(row[j] - max);
  *sum = total;
  return max;
}

template <typename T>
void exp_minus_lse_rows(T* row, int64_t len, T lse) {
  for (int64_t j = 0; j < len; ++j) row[j] = std::exp(row[j] - lse);
}

template <typename T>
void softmax_backward_rows(const T* probs, T* grad_row, int64_t len) {
  T dot = 0;
  for (int64_t j = 0; j < len; ++j) dot += probs[j] * grad_row[j];
  for (int64_t j = 0; j < len; ++j) grad_row[j] = probs[j] * (grad_row[j] - dot);
}
