// The CPU attention kernel's row operations for the baseline ISA (any x86-64 or other CPU).
#include <algorithm>
#include <cmath>

#include "attention_kernels.h"

namespace uniformer_kernels {
namespace baseline {
#include "attention_kernels_impl.h"

template <typename T>
AttentionRowKernels<T> attention_row_kernels() {
  return {&exp2_minus_max_rows<T>, &exp2_minus_rows<T>, &softmax_backward_rows<T>, &small_gemm_cols<T>};
}

template AttentionRowKernels<float> attention_row_kernels<float>();
template AttentionRowKernels<double> attention_row_kernels<double>();
}  // namespace baseline
}  // namespace uniformer_kernels
