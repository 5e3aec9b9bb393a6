// The CPU attention kernel's row operations compiled for AVX2 + FMA: float rows hand-vectorised,
// two 8-lane vectors per step so that two exp polynomials' dependency chains overlap; double rows
// from the portable source. On other architectures this falls back to baseline.
#include <algorithm>
#include <cmath>

#include "attention_kernels.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#pragma GCC target("avx2,fma")
namespace uniformer_kernels {
namespace avx2 {
#include "attention_kernels_impl.h"

namespace {

static_assert(kRowPad == 16, "a step is two 8-lane vectors");

inline float lane_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

inline float lane_max(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

// 2^x for x <= ~0 (scores minus their row max or log2-sum-exp2), ~3 ulp: x = n + r with n = round(x)
// and |r| <= 1/2 (exact), a degree-5 polynomial for 2^r (a relative-error minimax fit, 9e-8),
// 2^n built in the exponent bits. n is rounded by adding 1.5 * 2^23 + 127, which also leaves
// n + 127 in the low bits of the sum, ready to shift into an exponent. Inputs below -126
// (2^x < 1.2e-38) are clamped there: probabilities that small are 0 to every float consumer.
// NaN stays NaN.
inline __m256 exp2_nonpositive(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-126.0f), x);  // max_ps returns its second operand for NaN
  const __m256 shifter = _mm256_set1_ps(12582912.0f + 127.0f);
  const __m256 shifted = _mm256_add_ps(x, shifter);
  const __m256 r = _mm256_sub_ps(x, _mm256_sub_ps(shifted, shifter));
  __m256 p = _mm256_set1_ps(1.3264671434e-3f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(9.6714999527e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.5507335812e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(2.4022242427e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(6.9314700365e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i two_n = _mm256_slli_epi32(_mm256_castps_si256(shifted), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
}

float exp2_minus_max_row(float* row, int64_t len, float* sum) {
  __m256 max0 = _mm256_loadu_ps(row), max1 = _mm256_loadu_ps(row + 8);
  for (int64_t j = kRowPad; j < len; j += kRowPad) {
    max0 = _mm256_max_ps(max0, _mm256_loadu_ps(row + j));
    max1 = _mm256_max_ps(max1, _mm256_loadu_ps(row + j + 8));
  }
  const float max = lane_max(_mm256_max_ps(max0, max1));
  const __m256 shift = _mm256_set1_ps(max);
  __m256 sum0 = _mm256_setzero_ps(), sum1 = _mm256_setzero_ps();
  for (int64_t j = 0; j < len; j += kRowPad) {
    const __m256 e0 = exp2_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(row + j), shift));
    const __m256 e1 = exp2_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(row + j + 8), shift));
    _mm256_storeu_ps(row + j, e0);
    _mm256_storeu_ps(row + j + 8, e1);
    sum0 = _mm256_add_ps(sum0, e0);
    sum1 = _mm256_add_ps(sum1, e1);
  }
  *sum = lane_sum(_mm256_add_ps(sum0, sum1));
  return max;
}

void exp2_minus_row(float* row, int64_t len, float shift_by) {
  const __m256 shift = _mm256_set1_ps(shift_by);
  for (int64_t j = 0; j < len; j += kRowPad) {
    const __m256 e0 = exp2_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(row + j), shift));
    const __m256 e1 = exp2_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(row + j + 8), shift));
    _mm256_storeu_ps(row + j, e0);
    _mm256_storeu_ps(row + j + 8, e1);
  }
}

void softmax_backward_row(const float* probs, float* grad_row, int64_t len) {
  __m256 dot0 = _mm256_setzero_ps(), dot1 = _mm256_setzero_ps();
  for (int64_t j = 0; j < len; j += kRowPad) {
    dot0 = _mm256_fmadd_ps(_mm256_loadu_ps(probs + j), _mm256_loadu_ps(grad_row + j), dot0);
    dot1 = _mm256_fmadd_ps(_mm256_loadu_ps(probs + j + 8), _mm256_loadu_ps(grad_row + j + 8), dot1);
  }
  const __m256 dot = _mm256_set1_ps(lane_sum(_mm256_add_ps(dot0, dot1)));
  for (int64_t j = 0; j < len; j += 8) {
    const __m256 g = _mm256_sub_ps(_mm256_loadu_ps(grad_row + j), dot);
    _mm256_storeu_ps(grad_row + j, _mm256_mul_ps(_mm256_loadu_ps(probs + j), g));
  }
}

}  // namespace

template <>
AttentionRowKernels<float> attention_row_kernels<float>() {
  return {&exp2_minus_max_row, &exp2_minus_row, &softmax_backward_row, &small_gemm_cols<float>};
}

template <>
AttentionRowKernels<double> attention_row_kernels<double>() {
  return {&exp2_minus_max_rows<double>, &exp2_minus_rows<double>, &softmax_backward_rows<double>, &small_gemm_cols<double>};
}

}  // namespace avx2
}  // namespace uniformer_kernels
#else
namespace uniformer_kernels {
namespace avx2 {
template <typename T>
AttentionRowKernels<T> attention_row_kernels() {
  return baseline::attention_row_kernels<T>();
}
template AttentionRowKernels<float> attention_row_kernels<float>();
template AttentionRowKernels<double> attention_row_kernels<double>();
}  // namespace avx2
}  // namespace uniformer_kernels
#endif
