// The CPU attention kernel's row operations compiled for AVX2 + FMA: float rows hand-vectorised
// (attention_kernels_simd.h with 8-lane traits), double rows from the portable source. On other
// architectures this falls back to baseline.
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

struct Avx2Float {
  typedef __m256 vec;
  static constexpr int lanes = 8;
  static vec load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, vec v) { _mm256_storeu_ps(p, v); }
  static vec set1(float s) { return _mm256_set1_ps(s); }
  static vec zero() { return _mm256_setzero_ps(); }
  static vec add(vec a, vec b) { return _mm256_add_ps(a, b); }
  static vec sub(vec a, vec b) { return _mm256_sub_ps(a, b); }
  static vec mul(vec a, vec b) { return _mm256_mul_ps(a, b); }
  static vec fmadd(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
  static vec max(vec a, vec b) { return _mm256_max_ps(a, b); }
  static vec exponent(vec shifted) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(shifted), 23)); }
  static float lane_sum(vec v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  static float lane_max(vec v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
  }
};

#include "attention_kernels_simd.h"

}  // namespace

template <>
AttentionRowKernels<float> attention_row_kernels<float>() {
  return float_row_kernels<Avx2Float>();
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
