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

// exp(x) for x <= ~0 (scores minus their row max or log-sum-exp), ~2 ulp: x = n ln2 + r with
// |r| <= ln2 / 2, a degree-6 polynomial for exp(r) (Cephes expf's coefficients), 2^n built in the
// exponent bits. Inputs below -87 (exp < 1.7e-38) are clamped there: probabilities that small are 0
// to every float consumer. NaN stays NaN.
inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-87.0f), x);  // max_ps returns its second operand for NaN
  const __m256 t = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(-0.5f));
  const __m256i n = _mm256_cvttps_epi32(t);  // round(x / ln2), x <= 0
  const __m256 nf = _mm256_cvtepi32_ps(n);
  __m256 r = _mm256_fnmadd_ps(nf, _mm256_set1_ps(0.693359375f), x);  // ln2 in two parts
  r = _mm256_fnmadd_ps(nf, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
}

float exp_minus_max_row(float* row, int64_t len, float* sum) {
  __m256 max0 = _mm256_loadu_ps(row), max1 = _mm256_loadu_ps(row + 8);
  for (int64_t j = kRowPad; j < len; j += kRowPad) {
    max0 = _mm256_max_ps(max0, _mm256_loadu_ps(row + j));
    max1 = _mm256_max_ps(max1, _mm256_loadu_ps(row + j + 8));
  }
  const float max = lane_max(_mm256_max_ps(max0, max1));
  const __m256 shift = _mm256_set1_ps(max);
  __m256 sum0 = _mm256_setzero_ps(), sum1 = _mm256_setzero_ps();
  for (int64_t j = 0; j < len; j += kRowPad) {
    const __m256 e0 = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(row + j), shift));
    const __m256 e1 = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(row + j + 8), shift));
    _mm256_storeu_ps(row + j, e0);
    _mm256_storeu_ps(row + j + 8, e1);
    sum0 = _mm256_add_ps(sum0, e0);
    sum1 = _mm256_add_ps(sum1, e1);
  }
  *sum = lane_sum(_mm256_add_ps(sum0, sum1));
  return max;
}

void exp_minus_lse_row(float* row, int64_t len, float lse) {
  const __m256 shift = _mm256_set1_ps(lse);
  for (int64_t j = 0; j < len; j += kRowPad) {
    const __m256 e0 = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(row + j), shift));
    const __m256 e1 = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(row + j + 8), shift));
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
  return {&exp_minus_max_row, &exp_minus_lse_row, &softmax_backward_row};
}

template <>
AttentionRowKernels<double> attention_row_kernels<double>() {
  return {&exp_minus_max_rows<double>, &exp_minus_lse_rows<double>, &softmax_backward_rows<double>};
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
