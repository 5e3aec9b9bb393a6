// The CPU attention kernel's row operations compiled for AVX-512 (F, BW, VL): float rows
// hand-vectorised (attention_kernels_simd.h with 16-lane traits), double rows from the portable
// source. On other
// architectures this falls back to baseline.
#include <algorithm>
#include <cmath>

#include "attention_kernels.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// GCC 12's AVX-512 intrinsics pass _mm512_undefined_*() through as the masked-off operand, which
// its own -Wmaybe-uninitialized flags once inlined (a false positive: the mask is all ones).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vl")
namespace uniformer_kernels {
namespace avx512 {
#include "attention_kernels_impl.h"

namespace {

struct Avx512Float {
  typedef __m512 vec;
  static constexpr int lanes = 16;
  static vec load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, vec v) { _mm512_storeu_ps(p, v); }
  static vec set1(float s) { return _mm512_set1_ps(s); }
  static vec zero() { return _mm512_setzero_ps(); }
  static vec add(vec a, vec b) { return _mm512_add_ps(a, b); }
  static vec sub(vec a, vec b) { return _mm512_sub_ps(a, b); }
  static vec mul(vec a, vec b) { return _mm512_mul_ps(a, b); }
  static vec fmadd(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
  static vec max(vec a, vec b) { return _mm512_max_ps(a, b); }
  static vec exponent(vec shifted) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_castps_si512(shifted), 23)); }
  // Reduced as in the AVX2 build from the sum (max) of the two 256-bit halves.
  static void halves(vec v, __m256* lo, __m256* hi) {
    __builtin_memcpy(lo, &v, sizeof(__m256));
    __builtin_memcpy(hi, reinterpret_cast<const char*>(&v) + sizeof(__m256), sizeof(__m256));
  }
  static float lane_sum(vec v) {
    __m256 lo, hi;
    halves(v, &lo, &hi);
    const __m256 h = _mm256_add_ps(lo, hi);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  static float lane_max(vec v) {
    __m256 lo, hi;
    halves(v, &lo, &hi);
    const __m256 h = _mm256_max_ps(lo, hi);
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
  }
};

#include "attention_kernels_simd.h"

}  // namespace

template <>
AttentionRowKernels<float> attention_row_kernels<float>() {
  return float_row_kernels<Avx512Float>();
}

template <>
AttentionRowKernels<double> attention_row_kernels<double>() {
  return {&exp2_minus_max_rows<double>, &exp2_minus_rows<double>, &softmax_backward_rows<double>, &small_gemm_cols<double>};
}

}  // namespace avx512
}  // namespace uniformer_kernels
#else
namespace uniformer_kernels {
namespace avx512 {
template <typename T>
AttentionRowKernels<T> attention_row_kernels() {
  return baseline::attention_row_kernels<T>();
}
template AttentionRowKernels<float> attention_row_kernels<float>();
template AttentionRowKernels<double> attention_row_kernels<double>();
}  // namespace avx512
}  // namespace uniformer_kernels
#endif
