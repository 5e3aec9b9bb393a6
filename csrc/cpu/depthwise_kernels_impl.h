// The depthwise conv family's CPU kernels, written once over GCC/Clang vector types and compiled
// once per ISA level: the including file opens the namespace (baseline, avx2 or avx512), sets
// `#pragma GCC target` for the wider ISAs, and defines the two facts the code below is
// parameterised by (nothing else differs between the builds):
//   UK_VECTOR_BYTES      bytes of the widest vector: 32 (baseline: split into SSE halves; avx2) or
//                        64 (avx512: 16 floats in one zmm);
//   UK_VECTOR_REGISTERS  vector registers the register blocking may fill: 16 (xmm/ymm) or 32 (zmm).
// This header therefore includes nothing and calls no library function (an inline library function
// instantiated here would be compiled for the wider ISA and could be picked by the linker for
// baseline callers too).
//
// Scheme (channels-last, a row = one output (n, d, h)): the (KD x KH) taps that stay inside the
// input give up to 49 input rows; each is swept along W. Away from the W borders, a block of OWB
// outputs for one vector of channels is accumulated in registers: for every input row, its KW
// weight vectors are loaded once and each input vector once, then used for every output of the
// block it touches. Border outputs take a bounds-checked path. Channels left over after the last
// full vector run the same code on vectors of half, then a quarter of the width, down to 16 bytes,
// then on scalars: UniFormer's channel counts are multiples of 8, so an AVX-512 float tail
// (56 = 3 x 16 + 8) is one 8-lane ymm, which costs what a masked zmm would and needs no mask.
//
// Every kernel takes its activations (x, y, z, grad_y) in a storage type S: T itself,
// or bfloat16 for T = float, S = uint16_t holding the top half of a float's bits. A bfloat16
// vector is widened in registers on load (zero-extend each lane to 32 bits, shift left 16) and
// rounded to nearest even on store; weights, bias and accumulation stay float, so bfloat16 input
// costs no widening copy and gives what float kernels on widened input, rounded once, give.

// (The including file provides namespace uniformer_kernels::<isa> { ... }.)

#if !defined(UK_VECTOR_BYTES) || !defined(UK_VECTOR_REGISTERS)
#error "define UK_VECTOR_BYTES and UK_VECTOR_REGISTERS before including depthwise_kernels_impl.h"
#endif

template <typename T, int Bytes>
struct VecOf {
  typedef T type __attribute__((vector_size(Bytes)));
};

template <typename T>
struct VecTraits {
  typedef typename VecOf<T, UK_VECTOR_BYTES>::type vec;  // the widest vector of T
  static constexpr int lanes = UK_VECTOR_BYTES / sizeof(T);
};

// One type for "a vector of channels" and "one channel", so the loops below serve both.
template <typename V, typename T>
struct Lanes {
  static constexpr int value = sizeof(V) / sizeof(T);
};

template <typename V, typename T>
inline V load(const T* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V, typename T>
inline void store(T* p, V v) {
  __builtin_memcpy(p, &v, sizeof(V));
}

// An activation vector (or scalar) of T lanes from storage S: a plain load when S is T, else bfloat16
// bits widened to float (zero-extend, shift left 16: exact).
template <typename V, typename T, typename S>
inline V load_act(const S* p) {
  if constexpr (sizeof(S) == sizeof(T)) {
    return load<V>(p);
  } else {
    static_assert(sizeof(T) == 4 && sizeof(S) == 2, "16-bit storage is bfloat16 of float");
    constexpr int L = Lanes<V, T>::value;
    V v;
    // (Bit vectors through VecOf: GCC 12 drops a vector_size that depends on a template parameter
    // from a typedef inside a function.)
    if constexpr (L == 1) {
      const uint32_t bits = uint32_t(*p) << 16;
      __builtin_memcpy(&v, &bits, sizeof(V));
    } else {
      typedef typename VecOf<uint16_t, 2 * L>::type Bits16;
      typedef typename VecOf<uint32_t, 4 * L>::type Bits32;
      const Bits32 bits = __builtin_convertvector(load<Bits16>(p), Bits32) << 16;
      __builtin_memcpy(&v, &bits, sizeof(V));
    }
    return v;
  }
}

// Stores an activation vector (or scalar) to storage S: a plain store when S is T, else rounded to
// the nearest bfloat16, ties to even (add 0x7FFF plus the lowest kept bit, keep the top half), as
// PyTorch's float -> bfloat16 conversion does; a NaN stays a (quiet) NaN rather than rounding into
// infinity.
template <typename V, typename T, typename S>
inline void store_act(S* p, V v) {
  if constexpr (sizeof(S) == sizeof(T)) {
    store<V>(p, v);
  } else {
    constexpr int L = Lanes<V, T>::value;
    if constexpr (L == 1) {
      uint32_t bits;
      __builtin_memcpy(&bits, &v, sizeof(V));
      const bool is_nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
      *p = uint16_t(is_nan ? (bits >> 16) | 0x40u : (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
    } else {
      typedef typename VecOf<uint16_t, 2 * L>::type Bits16;
      typedef typename VecOf<uint32_t, 4 * L>::type Bits32;
      Bits32 bits;
      __builtin_memcpy(&bits, &v, sizeof(V));
      const Bits32 rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
      const Bits32 is_nan = (Bits32)((bits & 0x7FFFFFFFu) > 0x7F800000u);  // all ones where NaN
      Bits32 out = (rounded & ~is_nan) | (((bits >> 16) | 0x40u) & is_nan);
      store<Bits16>(p, __builtin_convertvector(out, Bits16));
    }
  }
}

template <typename V, typename T>
inline V splat(T s) {
  return V{} + s;  // a scalar in a vector expression is broadcast; for V == T this is s
}

// Fully unrolls a loop with a compile-time trip count, so that arrays indexed by its counter
// (accumulators, weights) live in registers. The count must cover the longest such loop (a block's
// OWB + KW - 1 inputs: 22 with 32 registers). With "unroll 16" that loop was unrolled only
// partly, and GCC 12's -O2 code for the scalar-tail blocks of 16 outputs summed wrongly (at -O0 it
// was right; tests/test_cpu_isa.py found it).
constexpr int kMaxUnroll = 32;
#define UK_UNROLL _Pragma("GCC unroll 32")

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// The input rows one output row reads: pointers to the first pixel of each in-range (kd, kh) tap
// row, with the matching weight row (KW x C). S: the input's storage type.
template <typename S, typename T>
struct TapRows {
  const S* input[49];
  const T* weight[49];
  int64_t tap_index[49];  // kd * KH + kh, for the weight gradient
  int count = 0;

  TapRows(const S* x, const T* w, const ConvShape& s, int64_t row) {
    const int64_t h = row % s.height;
    const int64_t d = (row / s.height) % s.depth;
    const int64_t n = row / (s.height * s.depth);
    for (int64_t kd = 0; kd < s.kernel_d; ++kd) {
      const int64_t in_d = d + kd - s.kernel_d / 2;
      if (in_d < 0 || in_d >= s.depth) continue;
      for (int64_t kh = 0; kh < s.kernel_h; ++kh) {
        const int64_t in_h = h + kh - s.kernel_h / 2;
        if (in_h < 0 || in_h >= s.height) continue;
        input[count] = x + ((n * s.depth + in_d) * s.height + in_h) * s.width * s.channels;
        weight[count] = w + (kd * s.kernel_h + kh) * s.kernel_w * s.channels;
        tap_index[count] = kd * s.kernel_h + kh;
        ++count;
      }
    }
  }
};

// ---- forward ------------------------------------------------------------------------------------

// OWB consecutive interior outputs [ow0, ow0 + OWB) of channels [c, c + lanes): every tap in range.
template <typename V, typename T, int KW, int OWB, typename S>
inline void forward_block(const TapRows<S, T>& taps, const T* bias, const S* residual_row, S* y_row,
                          int64_t ow0, int64_t c, int64_t C) {
  static_assert(OWB + KW - 1 <= kMaxUnroll, "UK_UNROLL must unroll the input loop fully");
  V acc[OWB];
  const V init = bias ? load<V>(bias + c) : splat<V, T>(0);
  UK_UNROLL for (int o = 0; o < OWB; ++o)
    acc[o] = residual_row ? init + load_act<V, T>(residual_row + (ow0 + o) * C + c) : init;
  for (int r = 0; r < taps.count; ++r) {
    const S* in = taps.input[r] + (ow0 - KW / 2) * C + c;
    V w[KW];
    UK_UNROLL for (int k = 0; k < KW; ++k) w[k] = load<V>(taps.weight[r] + k * C + c);
    UK_UNROLL for (int t = 0; t < OWB + KW - 1; ++t) {
      const V v = load_act<V, T>(in + t * C);
      UK_UNROLL for (int o = 0; o < OWB; ++o) {
        const int k = t - o;
        if (k >= 0 && k < KW) acc[o] += v * w[k];
      }
    }
  }
  UK_UNROLL for (int o = 0; o < OWB; ++o) store_act<V, T>(y_row + (ow0 + o) * C + c, acc[o]);
}

// One output near a W border: taps falling outside the input are skipped.
template <typename V, typename T, int KW, typename S>
inline void forward_border(const TapRows<S, T>& taps, const T* bias, const S* residual_row, S* y_row,
                           int64_t ow, int64_t c, int64_t C, int64_t W) {
  V acc = bias ? load<V>(bias + c) : splat<V, T>(0);
  if (residual_row) acc += load_act<V, T>(residual_row + ow * C + c);
  const int64_t k_begin = max64(0, KW / 2 - ow), k_end = min64(KW, W - ow + KW / 2);
  for (int r = 0; r < taps.count; ++r)
    for (int64_t k = k_begin; k < k_end; ++k)
      acc += load_act<V, T>(taps.input[r] + (ow + k - KW / 2) * C + c) * load<V>(taps.weight[r] + k * C + c);
  store_act<V, T>(y_row + ow * C + c, acc);
}

// Runs a per-channel-vector kernel on the channels [c, C) left after the full vectors: a vector of
// Bytes / 2 bytes if that many remain, then a quarter, ... down to 16 bytes, then one channel at a
// time on scalars. Advances c to C.
template <typename T, int Bytes, typename Kernel>
inline void over_channel_tail(int64_t& c, int64_t C, Kernel&& kernel) {
  if constexpr (Bytes / 2 >= 16 && Bytes / 2 / int(sizeof(T)) >= 2) {
    typedef typename VecOf<T, Bytes / 2>::type Half;
    constexpr int L = Bytes / 2 / sizeof(T);
    if (c + L <= C) {
      kernel(Half{}, c);
      c += L;
    }
    over_channel_tail<T, Bytes / 2>(c, C, kernel);
  } else {
    for (; c < C; ++c) kernel(T{}, c);
  }
}

// Runs a per-channel-vector kernel over all channels: full vectors, then the tail as above.
template <typename T, typename Kernel>
inline void over_channels(int64_t C, Kernel&& kernel) {
  typedef typename VecTraits<T>::vec V;
  constexpr int L = VecTraits<T>::lanes;
  int64_t c = 0;
  for (; c + L <= C; c += L) kernel(V{}, c);
  over_channel_tail<T, UK_VECTOR_BYTES>(c, C, kernel);
}

// Register blocking: the largest power-of-2 block of outputs whose accumulators, with the KW
// weight vectors, one input vector and one spare, fit the register file (16: KW 3/5 -> 8, KW 7 -> 4;
// 32 zmm: 16 for every KW).
constexpr int output_block(int kw) {
  int block = 1;
  while (2 * block + kw + 2 <= UK_VECTOR_REGISTERS && block < 16) block *= 2;
  return block;
}

// Blocks of B outputs of the interior [ow, interior_end), B halving from OWB down to 2, each size
// used while it fits, so any remainder is covered by at most one block of each smaller size; the
// last outputs singly.
template <int N>
struct BlockSize {
  static constexpr int value = N;
};

template <int B, typename Block>
inline void over_output_blocks(int64_t& ow, int64_t interior_end, Block&& block) {
  if constexpr (B >= 2) {
    for (; ow + B <= interior_end; ow += B) block(BlockSize<B>{}, ow);
    over_output_blocks<B / 2>(ow, interior_end, block);
  } else {
    for (; ow < interior_end; ++ow) block(BlockSize<1>{}, ow);
  }
}

// One output row. The W loop is outside the channel loop so that the few input pixels a block of
// outputs reads (OWB + KW - 1 per tap row, all channels) stay in L1 while every channel uses them.
template <typename T, int KW, typename S>
void forward_row(const S* x, const T* weight, const T* bias, bool residual, S* y_row,
                 const ConvShape& s, int64_t row) {
  constexpr int OWB = output_block(KW);
  const TapRows<S, T> taps(x, weight, s, row);
  const int64_t C = s.channels, W = s.width;
  const S* residual_row = residual ? x + row * W * C : nullptr;
  auto border = [&](int64_t ow) {
    over_channels<T>(C, [&](auto lane_type, int64_t c) {
      forward_border<decltype(lane_type), T, KW>(taps, bias, residual_row, y_row, ow, c, C, W);
    });
  };
  // Interior outputs have every tap inside the row; when the row is narrower than the kernel,
  // every output is a border one.
  const int64_t interior_begin = min64(KW / 2, W), interior_end = max64(W - KW / 2, interior_begin);
  for (int64_t ow = 0; ow < interior_begin; ++ow) border(ow);
  int64_t ow = interior_begin;
  // The input row the next output row reads first (its last tap row, h + KH/2 + 1), fetched from
  // memory while this row computes; the flat next row stands in for it at image/depth edges.
  const int64_t ahead = row + s.kernel_h / 2 + 1;
  const S* prefetch_row = ahead < s.rows() ? x + ahead * W * C : nullptr;
  // (56 = 2 + 6 x 8 + 4 + 2 for KW 5 with 16 registers, 2 + 3 x 16 + 4 + 2 with 32.)
  over_output_blocks<OWB>(ow, interior_end, [&](auto block_size, int64_t ow0) {
    constexpr int B = decltype(block_size)::value;
    if (prefetch_row && B > 1)
      for (int64_t i = ow0 * C; i < (ow0 + B) * C; i += 64 / sizeof(S)) __builtin_prefetch(prefetch_row + i);
    over_channels<T>(C, [&](auto lane_type, int64_t c) {
      forward_block<decltype(lane_type), T, KW, B>(taps, bias, residual_row, y_row, ow0, c, C);
    });
  });
  for (; ow < W; ++ow) border(ow);
}

// Copies a row from the L1-resident buffer it was computed in to memory with non-temporal stores:
// the output lines are written whole, without first being read for ownership (a third of a
// memory-bound conv's traffic) and without evicting the input rows still to be read.
template <typename T>
inline void stream_row(T* dst, const T* src, int64_t n) {
  int64_t i = 0;
#if defined(__x86_64__)
  typedef T vec16 __attribute__((vector_size(16)));
  typedef long long int64x2 __attribute__((vector_size(16)));
  constexpr int L = 16 / sizeof(T);
  for (; i < n && reinterpret_cast<uintptr_t>(dst + i) % 16 != 0; ++i) dst[i] = src[i];
  for (; i + L <= n; i += L) {
    if constexpr (sizeof(T) == 2)  // bfloat16 bits
      __builtin_ia32_movntdq(reinterpret_cast<int64x2*>(dst + i), load<int64x2, T>(src + i));
    else if constexpr (sizeof(T) == 4)
      __builtin_ia32_movntps(reinterpret_cast<float*>(dst + i), load<vec16, T>(src + i));
    else
      __builtin_ia32_movntpd(reinterpret_cast<double*>(dst + i), load<vec16, T>(src + i));
  }
#endif
  for (; i < n; ++i) dst[i] = src[i];
}

// row_buffer (W * C values) or nullptr: with a buffer, each row is computed there and streamed out
// (outputs too large to stay in cache); without, computed in place.
template <typename T, int KW, typename S>
void forward_rows(const S* x, const T* weight, const T* bias, bool residual, S* y,
                  const ConvShape& s, int64_t begin, int64_t end, S* row_buffer) {
  const int64_t row_size = s.width * s.channels;
  for (int64_t row = begin; row < end; ++row) {
    if (row_buffer == nullptr) {
      forward_row<T, KW>(x, weight, bias, residual, y + row * row_size, s, row);
      continue;
    }
    forward_row<T, KW>(x, weight, bias, residual, row_buffer, s, row);
    stream_row<S>(y + row * row_size, row_buffer, row_size);
  }
#if defined(__x86_64__)
  if (row_buffer != nullptr) __builtin_ia32_sfence();  // order the streamed rows before the join
#endif
}

// ---- weight gradient ----------------------------------------------------------------------------

// grad_w[tap row, k, c] += sum over ow of grad_y[ow, c] * x_tap_row[ow + k - KW/2, c], for one tap
// row and one channel vector. Interior outputs in blocks of OWB keep KW sums and OWB grad vectors in
// registers; each input vector is loaded once per block.
template <typename V, typename T, int KW, typename S>
inline void weight_grad_tap_row(const S* grad_y_row, const S* in_row, T* grad_w_row, int64_t c,
                                int64_t C, int64_t W) {
  constexpr int OWB = UK_VECTOR_REGISTERS >= 32 ? 8 : 4;  // KW sums + OWB grads + 1 input
  static_assert(OWB + KW - 1 <= kMaxUnroll, "UK_UNROLL must unroll the input loop fully");
  V sum[KW];
  for (int k = 0; k < KW; ++k) sum[k] = splat<V, T>(0);
  const int64_t interior_begin = KW / 2, interior_end = max64(W - KW / 2, interior_begin);
  auto border = [&](int64_t ow) {
    const V g = load_act<V, T>(grad_y_row + ow * C + c);
    for (int k = 0; k < KW; ++k) {
      const int64_t iw = ow + k - KW / 2;
      if (iw >= 0 && iw < W) sum[k] += g * load_act<V, T>(in_row + iw * C + c);
    }
  };
  for (int64_t ow = 0; ow < min64(interior_begin, W); ++ow) border(ow);
  int64_t ow = interior_begin;
  for (; ow + OWB <= interior_end; ow += OWB) {
    V g[OWB];
    for (int o = 0; o < OWB; ++o) g[o] = load_act<V, T>(grad_y_row + (ow + o) * C + c);
    const S* in = in_row + (ow - KW / 2) * C + c;
    UK_UNROLL for (int t = 0; t < OWB + KW - 1; ++t) {
      const V v = load_act<V, T>(in + t * C);
      UK_UNROLL for (int o = 0; o < OWB; ++o) {
        const int k = t - o;
        if (k >= 0 && k < KW) sum[k] += g[o] * v;
      }
    }
  }
  for (; ow < W; ++ow) border(ow);  // the interior remainder and the right border
  for (int k = 0; k < KW; ++k) store<V>(grad_w_row + k * C + c, load<V>(grad_w_row + k * C + c) + sum[k]);
}

template <typename V, typename T, typename S>
inline void bias_grad_row(const S* grad_y_row, T* grad_bias, int64_t c, int64_t C, int64_t W) {
  V sum = splat<V, T>(0);
  for (int64_t ow = 0; ow < W; ++ow) sum += load_act<V, T>(grad_y_row + ow * C + c);
  store<V>(grad_bias + c, load<V>(grad_bias + c) + sum);
}

template <typename T, int KW, typename S>
void weight_grad_rows(const S* grad_y, const S* x, T* grad_weight, T* grad_bias,
                      const ConvShape& s, int64_t begin, int64_t end) {
  const int64_t C = s.channels, W = s.width;
  for (int64_t row = begin; row < end; ++row) {
    const TapRows<S, T> taps(x, grad_weight, s, row);
    const S* grad_y_row = grad_y + row * W * C;
    for (int r = 0; r < taps.count; ++r) {
      T* grad_w_row = grad_weight + taps.tap_index[r] * KW * C;
      over_channels<T>(C, [&](auto lane_type, int64_t c) {
        weight_grad_tap_row<decltype(lane_type), T, KW, S>(grad_y_row, taps.input[r], grad_w_row, c, C, W);
      });
    }
    over_channels<T>(C, [&](auto lane_type, int64_t c) {
      bias_grad_row<decltype(lane_type), T, S>(grad_y_row, grad_bias, c, C, W);
    });
  }
}

// ---- positional encoding + norm -----------------------------------------------------------------

template <typename V, typename T>
inline T horizontal_sum(V v) {
  T total = 0;
  for (int i = 0; i < Lanes<V, T>::value; ++i) total += reinterpret_cast<const T*>(&v)[i];
  return total;
}

// z = norm(y) for one pixel's C channels, y just written (in L1; a bfloat16 y is read back rounded,
// as the unfused y -> norm would read it).
template <typename T, typename S>
inline void norm_pixel(const S* y, const T* norm_weight, const T* norm_bias, bool layer_norm, T eps,
                       S* z, T* mean_out, T* rstd_out, int64_t C) {
  typedef typename VecTraits<T>::vec V;
  constexpr int L = VecTraits<T>::lanes;
  if (!layer_norm) {
    over_channels<T>(C, [&](auto lane_type, int64_t c) {
      typedef decltype(lane_type) Any;
      store_act<Any, T>(z + c, load_act<Any, T>(y + c) * load<Any>(norm_weight + c) + load<Any>(norm_bias + c));
    });
    return;
  }
  // Two passes over the (cached) pixel: the mean, then the centred variance, which does not lose
  // precision to cancellation the way E[y^2] - E[y]^2 does. Full vectors accumulate in one vector,
  // the tail's into the scalar.
  V vsum = splat<V, T>(0);
  T sum = 0;
  int64_t c = 0;
  for (; c + L <= C; c += L) vsum += load_act<V, T>(y + c);
  over_channel_tail<T, UK_VECTOR_BYTES>(c, C, [&](auto lane_type, int64_t i) {
    typedef decltype(lane_type) Tail;
    sum += horizontal_sum<Tail, T>(load_act<Tail, T>(y + i));
  });
  const T mean = (sum + horizontal_sum<V, T>(vsum)) / C;
  V vsq = splat<V, T>(0);
  T sq = 0;
  for (c = 0; c + L <= C; c += L) {
    const V d = load_act<V, T>(y + c) - mean;
    vsq += d * d;
  }
  over_channel_tail<T, UK_VECTOR_BYTES>(c, C, [&](auto lane_type, int64_t i) {
    typedef decltype(lane_type) Tail;
    const Tail d = load_act<Tail, T>(y + i) - mean;
    sq += horizontal_sum<Tail, T>(d * d);
  });
  const T rstd = T(1) / __builtin_sqrt((sq + horizontal_sum<V, T>(vsq)) / C + eps);
  over_channels<T>(C, [&](auto lane_type, int64_t i) {
    typedef decltype(lane_type) Any;
    store_act<Any, T>(z + i, (load_act<Any, T>(y + i) - mean) * rstd * load<Any>(norm_weight + i) + load<Any>(norm_bias + i));
  });
  *mean_out = mean;
  *rstd_out = rstd;
}

template <typename T, int KW, typename S>
void pos_embed_norm_rows(const S* x, const T* weight, const T* bias, const T* norm_weight,
                         const T* norm_bias, bool layer_norm, T eps, S* y, S* z, T* mean, T* rstd,
                         const ConvShape& s, int64_t begin, int64_t end) {
  const int64_t C = s.channels, W = s.width;
  for (int64_t row = begin; row < end; ++row) {
    forward_row<T, KW>(x, weight, bias, /*residual=*/true, y + row * W * C, s, row);
    for (int64_t ow = 0; ow < W; ++ow) {
      const int64_t pixel = row * W + ow;
      norm_pixel<T, S>(y + pixel * C, norm_weight, norm_bias, layer_norm, eps, z + pixel * C,
                    layer_norm ? mean + pixel : nullptr, layer_norm ? rstd + pixel : nullptr, C);
    }
  }
}

// ---- dispatch on KW (the only size the inner loops unroll on) -----------------------------------

template <typename T, typename S = T>
void forward_dispatch(const S* x, const T* weight, const T* bias, bool residual, S* y,
                      const ConvShape& s, int64_t begin, int64_t end, S* row_buffer) {
  switch (s.kernel_w) {
    case 1: return forward_rows<T, 1, S>(x, weight, bias, residual, y, s, begin, end, row_buffer);
    case 3: return forward_rows<T, 3, S>(x, weight, bias, residual, y, s, begin, end, row_buffer);
    case 5: return forward_rows<T, 5, S>(x, weight, bias, residual, y, s, begin, end, row_buffer);
    default: return forward_rows<T, 7, S>(x, weight, bias, residual, y, s, begin, end, row_buffer);
  }
}

template <typename T, typename S = T>
void weight_grad_dispatch(const S* grad_y, const S* x, T* grad_weight, T* grad_bias,
                          const ConvShape& s, int64_t begin, int64_t end) {
  switch (s.kernel_w) {
    case 1: return weight_grad_rows<T, 1, S>(grad_y, x, grad_weight, grad_bias, s, begin, end);
    case 3: return weight_grad_rows<T, 3, S>(grad_y, x, grad_weight, grad_bias, s, begin, end);
    case 5: return weight_grad_rows<T, 5, S>(grad_y, x, grad_weight, grad_bias, s, begin, end);
    default: return weight_grad_rows<T, 7, S>(grad_y, x, grad_weight, grad_bias, s, begin, end);
  }
}

template <typename T, typename S = T>
void pos_embed_norm_dispatch(const S* x, const T* weight, const T* bias, const T* norm_weight,
                             const T* norm_bias, bool layer_norm, T eps, S* y, S* z, T* mean,
                             T* rstd, const ConvShape& s, int64_t begin, int64_t end) {
  switch (s.kernel_w) {
    case 1: return pos_embed_norm_rows<T, 1, S>(x, weight, bias, norm_weight, norm_bias, layer_norm, eps, y, z, mean, rstd, s, begin, end);
    case 3: return pos_embed_norm_rows<T, 3, S>(x, weight, bias, norm_weight, norm_bias, layer_norm, eps, y, z, mean, rstd, s, begin, end);
    case 5: return pos_embed_norm_rows<T, 5, S>(x, weight, bias, norm_weight, norm_bias, layer_norm, eps, y, z, mean, rstd, s, begin, end);
    default: return pos_embed_norm_rows<T, 7, S>(x, weight, bias, norm_weight, norm_bias, layer_norm, eps, y, z, mean, rstd, s, begin, end);
  }
}

template <typename T, typename S>
DepthwiseKernels<T, S> kernels() {
  return {&forward_dispatch<T, S>, &weight_grad_dispatch<T, S>, &pos_embed_norm_dispatch<T, S>};
}

template DepthwiseKernels<float> kernels<float>();
template DepthwiseKernels<double> kernels<double>();
template DepthwiseKernels<float, uint16_t> kernels<float, uint16_t>();
