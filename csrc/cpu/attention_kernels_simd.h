// The CPU attention kernel's float row operations, hand-vectorised once over a vector-traits type
// and compiled per ISA: attention_kernels_avx2.cpp instantiates them with 8-lane __m256 traits,
// attention_kernels_avx512.cpp with 16-lane __m512 ones (the traits are the only difference).
// Included inside the ISA's namespace after `#pragma GCC target` and <immintrin.h>.
//
// A step covers kRowPad floats (rows are padded to it, so there is no scalar tail): two 8-lane
// vectors with AVX2, so that two exp polynomials' dependency chains overlap, one 16-lane vector
// with AVX-512. The float exp is the softmax's cost: the generic vector code GCC makes of std::exp2
// is latency-bound on the polynomial and 2x slower.
//
// Traits V provide: vec, lanes, load, store, set1, zero, add, sub, mul, fmadd (a * b + c), max
// (max(a, b), b when either is NaN, as vmaxps does), lane_sum, lane_max, and exponent(shifted):
// the float whose bits are shifted's low bits moved into the exponent field (shifted << 23).

template <typename V>
constexpr int vectors_per_step() {
  static_assert(kRowPad % V::lanes == 0, "a step is whole vectors");
  return kRowPad / V::lanes;
}

// 2^x for x <= ~0 (scores minus their row max or log2-sum-exp2), ~3 ulp: x = n + r with n = round(x)
// and |r| <= 1/2 (exact), a degree-5 polynomial for 2^r (a relative-error minimax fit, 9e-8),
// 2^n built in the exponent bits. n is rounded by adding 1.5 * 2^23 + 127, which also leaves
// n + 127 in the low bits of the sum, ready to shift into an exponent. Inputs below -126
// (2^x < 1.2e-38) are clamped there: probabilities that small are 0 to every float consumer.
// NaN stays NaN.
template <typename V>
inline typename V::vec exp2_nonpositive(typename V::vec x) {
  x = V::max(V::set1(-126.0f), x);
  const auto shifter = V::set1(12582912.0f + 127.0f);
  const auto shifted = V::add(x, shifter);
  const auto r = V::sub(x, V::sub(shifted, shifter));
  auto p = V::set1(1.3264671434e-3f);
  p = V::fmadd(p, r, V::set1(9.6714999527e-3f));
  p = V::fmadd(p, r, V::set1(5.5507335812e-2f));
  p = V::fmadd(p, r, V::set1(2.4022242427e-1f));
  p = V::fmadd(p, r, V::set1(6.9314700365e-1f));
  p = V::fmadd(p, r, V::set1(1.0f));
  return V::mul(p, V::exponent(shifted));
}

template <typename V>
float exp2_minus_max_row(float* row, int64_t len, float* sum) {
  constexpr int S = vectors_per_step<V>();
  typename V::vec max[S], total[S];
  for (int u = 0; u < S; ++u) max[u] = V::load(row + u * V::lanes);
  for (int64_t j = kRowPad; j < len; j += kRowPad)
    for (int u = 0; u < S; ++u) max[u] = V::max(max[u], V::load(row + j + u * V::lanes));
  for (int u = 1; u < S; ++u) max[0] = V::max(max[0], max[u]);
  const float row_max = V::lane_max(max[0]);
  const auto shift = V::set1(row_max);
  for (int u = 0; u < S; ++u) total[u] = V::zero();
  for (int64_t j = 0; j < len; j += kRowPad)
    for (int u = 0; u < S; ++u) {
      float* at = row + j + u * V::lanes;
      const auto e = exp2_nonpositive<V>(V::sub(V::load(at), shift));
      V::store(at, e);
      total[u] = V::add(total[u], e);
    }
  for (int u = 1; u < S; ++u) total[0] = V::add(total[0], total[u]);
  *sum = V::lane_sum(total[0]);
  return row_max;
}

template <typename V>
void exp2_minus_row(float* row, int64_t len, float shift_by) {
  const auto shift = V::set1(shift_by);
  for (int64_t j = 0; j < len; j += V::lanes) V::store(row + j, exp2_nonpositive<V>(V::sub(V::load(row + j), shift)));
}

template <typename V>
void softmax_backward_row(const float* probs, float* grad_row, int64_t len) {
  constexpr int S = vectors_per_step<V>();
  typename V::vec dot[S];
  for (int u = 0; u < S; ++u) dot[u] = V::zero();
  for (int64_t j = 0; j < len; j += kRowPad)
    for (int u = 0; u < S; ++u) {
      const int64_t at = j + u * V::lanes;
      dot[u] = V::fmadd(V::load(probs + at), V::load(grad_row + at), dot[u]);
    }
  for (int u = 1; u < S; ++u) dot[0] = V::add(dot[0], dot[u]);
  const auto total = V::set1(V::lane_sum(dot[0]));
  for (int64_t j = 0; j < len; j += V::lanes)
    V::store(grad_row + j, V::mul(V::load(probs + j), V::sub(V::load(grad_row + j), total)));
}

template <typename V>
AttentionRowKernels<float> float_row_kernels() {
  return {&exp2_minus_max_row<V>, &exp2_minus_row<V>, &softmax_backward_row<V>, &small_gemm_cols<float>};
}
