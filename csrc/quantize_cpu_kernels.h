// The CPU loops of quantize_cpu.cpp. This file is included twice by quantize_cpu.cpp, inside two namespaces: once
// compiled for the baseline ISA and, on x86-64 with GCC, once more under `#pragma GCC target("avx2,f16c")` (chosen
// at run time, AP_AVX2 == 1). No include guard and no #include here: everything it needs is included before.
//
// Geometry (see quantize_common.h's Layout): element i of the logical, contiguous tensor is in run i / R and group
// (i / R) % G. R is 1 (channel groups) or a multiple of the last dimension. Two ways through the tensor:
//
// * runs (R >= kMinRun): a run has one group, so its loops take a scalar (lo, inv) or (scale, lo). When every group is
//   one run (A == 1: per row, per (batch, head)) and a run fits in L2, quantize reads each run from memory once: its
//   statistics, the group's finalisation and its codes in one visit (the second read hits the cache).
// * columns (R < kMinRun: channel groups, R == 1, or a few adjacent channels per group, R == chunk; or groups shared
//   across rows with a short period G * R <= kMaxColsPeriod, e.g. [B, N, H, D] runs of D folded per head): the tensor is A
//   rows of P = G * R columns, and each loop takes per-element parameters from an "expanded" array (the group's value
//   repeated R times, then the whole period repeated to cover one chunk past its end), so no loop ever divides or
//   wraps around. Before, a [1024, 128, 4] channel-sharing layout went line by line (4 elements a line) and was
//   ~40x slower than copying it.
//
// Packed codes are "flat" when the last dimension is a multiple of the codes per byte (always at 8 bits): the packed
// tensor is then one stream and element i's code is in byte i / per, so the loops can ignore line boundaries.
// Otherwise every line is padded and the loops go line by line.
//
// NOTE: measured on this repo's 2-core machines (tools/results/kernels-*.json): the AVX2+F16C copy is what makes the
// float16 paths fast, and its hand-written 8-wide loops are what make the fp32/bf16 code loops fast (GCC 12 left the
// scalar code loop unvectorised: 7.5 ms for a per-row [4096, 768] fp32 quantize, against 0.4 ms to copy it).
// FMA is deliberately not used and the file is compiled with -ffp-contract=off, so both copies give identical,
// reference-exact codes: every 8-wide operation below is the IEEE operation its scalar twin in quantize_common.h
// performs (min/max/compare with the same NaN rules, truncation of a value already clamped to [0, L]).

// Elements processed per inner chunk (converted inputs, codes, uniforms live on the stack).
constexpr int64_t kChunk = 1024;
// Runs shorter than this use the columns path.
constexpr int64_t kMinRun = 64;
// Runs up to this many elements are quantized in one visit when every group is one run (fp32: 256 KiB, in L2).
constexpr int64_t kFuseMax = 1 << 16;
// Runs longer than this are split for the statistics pass (parallelism inside a run).
constexpr int64_t kSplit = 1 << 16;
// Groups shared across rows (A > 1) whose period G * R is at most this go down the columns path even with long runs:
// per-run statistics of e.g. [8, 128, 4, 64] (64-element runs folded into 4 heads) cost more than the reduction.
constexpr int64_t kMaxColsPeriod = 4096;

inline bool columns_path(const Layout& L) {
  return L.R < kMinRun || (L.A > 1 && L.G * L.R <= kMaxColsPeriod);
}

// ---------------------------------------------------------------------------------------------------------------------
// Conversions to and from fp32 (exact in; round-to-nearest-even out, as torch's .to(dtype)).

template <typename T>
inline const float* as_float(const T* x, int64_t n, float* __restrict buf) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const uint16_t* __restrict s = reinterpret_cast<const uint16_t*>(x);
    for (int64_t k = 0; k < n; ++k) {
      const uint32_t b = static_cast<uint32_t>(s[k]) << 16;
      std::memcpy(buf + k, &b, sizeof(float));
    }
    return buf;
  } else {
#if AP_AVX2
    const uint16_t* s = reinterpret_cast<const uint16_t*>(x);
    int64_t k = 0;
    for (; k + 8 <= n; k += 8) {
      _mm256_storeu_ps(buf + k, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + k))));
    }
    for (; k < n; ++k) buf[k] = _cvtsh_ss(s[k]);
#else
    for (int64_t k = 0; k < n; ++k) buf[k] = static_cast<float>(x[k]);
#endif
    return buf;
  }
}

inline uint16_t bf16_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(float));
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(v != v ? 0x7FC0u : rounded);  // c10::BFloat16's NaN
}

template <typename T>
inline void store_one(T* out, float v) {
  if constexpr (std::is_same_v<T, float>) {
    *out = v;
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    *reinterpret_cast<uint16_t*>(out) = bf16_bits(v);
  } else {
#if AP_AVX2
    *reinterpret_cast<uint16_t*>(out) = _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT);
#else
    *out = static_cast<c10::Half>(v);
#endif
  }
}

template <typename T>
inline float load_one(const T* x) {
  if constexpr (std::is_same_v<T, float>) {
    return *x;
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const uint32_t b = static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(x)) << 16;
    float f;
    std::memcpy(&f, &b, sizeof(float));
    return f;
  } else {
#if AP_AVX2
    return _cvtsh_ss(*reinterpret_cast<const uint16_t*>(x));
#else
    return static_cast<float>(*x);
#endif
  }
}

#if AP_AVX2
template <typename T>
inline __m256 load8(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_loadu_ps(p);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  } else {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
}

// NAN: v may hold NaN (bf16 needs its NaN pattern then); false when the caller knows it cannot.
template <typename T, bool NAN_POSSIBLE = true>
inline void store8(T* p, __m256 v) {
  if constexpr (std::is_same_v<T, float>) {
    _mm256_storeu_ps(p, v);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
    if constexpr (NAN_POSSIBLE) {
      const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
      r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(nan));
    }
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
  } else {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
}
#endif

// ---------------------------------------------------------------------------------------------------------------------
// Statistics.

struct Stat {
  float lo = INFINITY;
  float hi = -INFINITY;
  bool nan = false;
  void merge(float l, float h, bool n) {
    lo = l < lo ? l : lo;
    hi = h > hi ? h : hi;
    nan = nan || n;
  }
  void merge(const Stat& s) { merge(s.lo, s.hi, s.nan); }
};

// min / max / any-NaN of n contiguous elements. NaN never enters lo/hi (comparisons with NaN are false).
template <typename T>
inline void reduce_span(const T* x, int64_t n, Stat& out) {
  int64_t i = 0;
#if AP_AVX2
  if (n >= 16) {
    // Two independent accumulator sets in registers, folded at the end with vector min/max (the order of a min/max
    // reduction does not change its value; only which of -0.0/+0.0 is kept, which no code or value depends on).
    __m256 lo0 = _mm256_set1_ps(INFINITY), lo1 = lo0;
    __m256 hi0 = _mm256_set1_ps(-INFINITY), hi1 = hi0;
    __m256 nan0 = _mm256_setzero_ps(), nan1 = nan0;
    for (; i + 16 <= n; i += 16) {
      const __m256 v0 = load8(x + i), v1 = load8(x + i + 8);
      lo0 = _mm256_min_ps(v0, lo0);  // v < lo ? v : lo
      lo1 = _mm256_min_ps(v1, lo1);
      hi0 = _mm256_max_ps(v0, hi0);  // v > hi ? v : hi
      hi1 = _mm256_max_ps(v1, hi1);
      nan0 = _mm256_or_ps(nan0, _mm256_cmp_ps(v0, v0, _CMP_UNORD_Q));
      nan1 = _mm256_or_ps(nan1, _mm256_cmp_ps(v1, v1, _CMP_UNORD_Q));
    }
    lo0 = _mm256_min_ps(lo0, lo1);
    hi0 = _mm256_max_ps(hi0, hi1);
    __m128 l = _mm_min_ps(_mm256_castps256_ps128(lo0), _mm256_extractf128_ps(lo0, 1));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(hi0), _mm256_extractf128_ps(hi0, 1));
    l = _mm_min_ps(l, _mm_movehl_ps(l, l));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    l = _mm_min_ss(l, _mm_shuffle_ps(l, l, 1));
    h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
    out.merge(_mm_cvtss_f32(l), _mm_cvtss_f32(h), _mm256_movemask_ps(_mm256_or_ps(nan0, nan1)) != 0);
  }
#endif
  float lo = INFINITY, hi = -INFINITY;
  bool nan = false;
  for (; i < n; ++i) {
    const float v = load_one(x + i);
    lo = v < lo ? v : lo;
    hi = v > hi ? v : hi;
    nan = nan || v != v;
  }
  out.merge(lo, hi, nan);
}

// Element-wise min/max/NaN of n contiguous elements into per-column accumulators (the columns path). `nan` holds
// a non-zero bit pattern once a NaN was seen.
template <typename T>
inline void reduce_cols(const T* x, int64_t n, float* __restrict lo, float* __restrict hi, uint32_t* __restrict nan) {
  int64_t k = 0;
#if AP_AVX2
  for (; k + 8 <= n; k += 8) {
    const __m256 v = load8(x + k);
    _mm256_storeu_ps(lo + k, _mm256_min_ps(v, _mm256_loadu_ps(lo + k)));
    _mm256_storeu_ps(hi + k, _mm256_max_ps(v, _mm256_loadu_ps(hi + k)));
    const __m256i z = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(nan + k));
    const __m256i isnan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(nan + k), _mm256_or_si256(z, isnan));
  }
#endif
  for (; k < n; ++k) {
    const float v = load_one(x + k);
    lo[k] = v < lo[k] ? v : lo[k];
    hi[k] = v > hi[k] ? v : hi[k];
    nan[k] |= v != v ? 1u : 0u;
  }
}

// Per-group statistics, runs path: one Stat per (run, piece of <= kSplit elements), merged per group.
template <typename T>
void stats_runs(const T* x, const Layout& L, std::vector<Stat>& out) {
  const int64_t nruns = L.A * L.G;
  const int64_t pieces = divup(L.R, kSplit);
  std::vector<Stat> part(static_cast<size_t>(nruns * pieces));
  const int64_t grain = std::max<int64_t>(1, kGrain / std::min(L.R, kSplit));
  at::parallel_for(0, nruns * pieces, grain, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t j = u / pieces, p = u % pieces;
      const int64_t s = p * kSplit, e = std::min(L.R, s + kSplit);
      Stat st;
      reduce_span(x + j * L.R + s, e - s, st);
      part[u] = st;
    }
  });
  out.assign(static_cast<size_t>(L.G), Stat{});
  at::parallel_for(0, L.G, 1024, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      for (int64_t a = 0; a < L.A; ++a) {
        for (int64_t p = 0; p < pieces; ++p) out[g].merge(part[(a * L.G + g) * pieces + p]);
      }
    }
  });
}

// Per-group statistics, columns path: x as A rows of P = G * R columns. Tasks own bands of rows; each accumulates
// per column over a "super row" of m consecutive rows (so that a task's inner loop is >= ~256 elements long even for
// P == 4), folds the columns into groups, and the bands are merged at the end.
template <typename T>
void stats_cols(const T* x, const Layout& L, std::vector<Stat>& out) {
  const int64_t P = L.G * L.R;
  const int64_t m = std::max<int64_t>(1, std::min<int64_t>(L.A, 256 / P));
  const int64_t W = m * P;
  const int64_t supers = L.A / m;  // full super rows; the rest (< m rows) is folded in with width P
  const int64_t want = std::min<int64_t>(divup(L.numel, kGrain), 4 * at::get_num_threads());
  const int64_t bands = std::max<int64_t>(1, std::min<int64_t>(supers, want));
  std::vector<Stat> part(static_cast<size_t>(bands * L.G));
  at::parallel_for(0, bands, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> lo(static_cast<size_t>(W)), hi(static_cast<size_t>(W));
    std::vector<uint32_t> nan(static_cast<size_t>(W));
    for (int64_t b = b0; b < b1; ++b) {
      std::fill(lo.begin(), lo.end(), INFINITY);
      std::fill(hi.begin(), hi.end(), -INFINITY);
      std::fill(nan.begin(), nan.end(), 0u);
      const int64_t s0 = supers * b / bands, s1 = supers * (b + 1) / bands;
      for (int64_t s = s0; s < s1; ++s) reduce_cols(x + s * W, W, lo.data(), hi.data(), nan.data());
      if (b == bands - 1) {
        for (int64_t a = supers * m; a < L.A; ++a) reduce_cols(x + a * P, P, lo.data(), hi.data(), nan.data());
      }
      Stat* p = part.data() + b * L.G;
      for (int64_t g = 0; g < L.G; ++g) p[g] = Stat{};
      for (int64_t c = 0; c < W; ++c) p[(c % P) / L.R].merge(lo[c], hi[c], nan[c] != 0u);
    }
  });
  out.assign(static_cast<size_t>(L.G), Stat{});
  for (int64_t b = 0; b < bands; ++b) {
    for (int64_t g = 0; g < L.G; ++g) out[g].merge(part[b * L.G + g]);
  }
}

// ---------------------------------------------------------------------------------------------------------------------
// Codes.

// Philox4x32-10 words of counters {0, 0, q, q >> 32} (q = q0 .. q0 + n - 1) under key `seed`: the same numbers as
// at::Philox4_32(seed, q, 0) drawn four times, written as a plain loop over independent quads so that GCC vectorises
// it (the engine object is scalar and branchy: stochastic quantize was ~6 ns per element with it).
inline void philox_quads(uint64_t seed, uint64_t q0, int64_t n, uint32_t* __restrict out) {
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t q = q0 + static_cast<uint64_t>(i);
    uint32_t c0 = 0, c1 = 0, c2 = static_cast<uint32_t>(q), c3 = static_cast<uint32_t>(q >> 32);
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int r = 0; r < 10; ++r) {
      const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
      const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
      c1 = static_cast<uint32_t>(p1);
      c3 = static_cast<uint32_t>(p0);
      c0 = n0;
      c2 = n2;
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    out[4 * i] = c0;
    out[4 * i + 1] = c1;
    out[4 * i + 2] = c2;
    out[4 * i + 3] = c3;
  }
}

// u for elements [i0, i0 + n), n <= kChunk: element i uses word i % 4 of Philox4x32-10(seed, subsequence i / 4).
inline void fill_uniforms(uint64_t seed, int64_t i0, int64_t n, float* __restrict u) {
  alignas(64) uint32_t words[kChunk + 8];
  const int64_t q0 = i0 / 4;
  const int64_t nq = (i0 + n + 3) / 4 - q0;
  philox_quads(seed, static_cast<uint64_t>(q0), nq, words);
  const uint32_t* __restrict w = words + (i0 - 4 * q0);
  for (int64_t k = 0; k < n; ++k) u[k] = uniform_of(w[k]);
}

// Codes of n elements. ARR: lo/inv are per-element arrays (columns path), else lo[0]/inv[0] hold for all. `u` holds
// the uniforms (stochastic) or is null (nearest: + 0.5). ZR says where the zero-preserving rule can apply: kZeroNone
// (no low end in play is 0: the rule's bound is 0 and its max a no-op), kZeroAll (every low end is 0) or kZeroSome.
constexpr int kZeroNone = 0, kZeroSome = 1, kZeroAll = 2;

template <typename T, bool ARR, int ZR>
inline void codes_span(const T* x, int64_t n, const float* __restrict lo, const float* __restrict inv,
                       const float* __restrict u, float levels, uint8_t* __restrict c) {
  int64_t k = 0;
#if AP_AVX2
  {
    const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.f), half = _mm256_set1_ps(0.5f);
    const __m256 lv = _mm256_set1_ps(levels);
    const auto one8 = [&](int64_t at) {
      const __m256 v = load8(x + at);
      const __m256 l = ARR ? _mm256_loadu_ps(lo + at) : _mm256_set1_ps(lo[0]);
      const __m256 s = ARR ? _mm256_loadu_ps(inv + at) : _mm256_set1_ps(inv[0]);
      const __m256 r = u != nullptr ? _mm256_loadu_ps(u + at) : half;
      __m256 t = _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(v, l), s), r);
      t = _mm256_max_ps(t, zero);  // t > 0 ? t : 0 (NaN -> 0)
      t = _mm256_min_ps(t, lv);    // t < L ? t : L
      if constexpr (ZR == kZeroAll) {
        t = _mm256_max_ps(t, _mm256_and_ps(_mm256_cmp_ps(v, l, _CMP_GT_OQ), one));
      } else if constexpr (ZR == kZeroSome) {
        const __m256 gt = _mm256_cmp_ps(v, l, _CMP_GT_OQ);
        const __m256 lz = _mm256_cmp_ps(l, zero, _CMP_EQ_OQ);
        t = _mm256_max_ps(t, _mm256_and_ps(_mm256_and_ps(gt, lz), one));
      }
      return _mm256_cvttps_epi32(t);
    };
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (; k + 32 <= n; k += 32) {
      const __m256i ab = _mm256_packs_epi32(one8(k), one8(k + 8));
      const __m256i cd = _mm256_packs_epi32(one8(k + 16), one8(k + 24));
      const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(ab, cd), order);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + k), bytes);
    }
  }
#endif
  for (; k < n; ++k) {
    c[k] = code_of(load_one(x + k), ARR ? lo[k] : lo[0], ARR ? inv[k] : inv[0], u != nullptr ? u[k] : 0.5f, levels);
  }
}

// kZeroNone / kZeroSome / kZeroAll for the low ends lo[0, n).
inline int zero_rule(const float* lo, int64_t n) {
  int64_t zeros = 0;
  for (int64_t g = 0; g < n; ++g) zeros += lo[g] == 0.f ? 1 : 0;
  return zeros == 0 ? kZeroNone : zeros == n ? kZeroAll : kZeroSome;
}

template <int BITS>
inline void pack(const uint8_t* __restrict c, int64_t n, uint8_t* __restrict out) {
  constexpr int per = 8 / BITS;
  const int64_t full = n / per;
  for (int64_t j = 0; j < full; ++j) {
    uint32_t b = 0;
    for (int k = 0; k < per; ++k) b |= static_cast<uint32_t>(c[j * per + k]) << (k * BITS);
    out[j] = static_cast<uint8_t>(b);
  }
  if (full * per < n) {
    uint32_t b = 0;
    for (int64_t k = 0; full * per + k < n; ++k) b |= static_cast<uint32_t>(c[full * per + k]) << (k * BITS);
    out[full] = static_cast<uint8_t>(b);
  }
}

// Codes of the n <= kChunk elements starting at logical index i0, written packed at `out` (i0 is a multiple of the
// codes per byte, or the start of a line).
template <typename T, int BITS, bool STOCH, bool ARR>
inline void code_segment(const T* x, int64_t i0, int64_t n, const float* lo, const float* inv, int zr, uint64_t seed,
                         uint8_t* out) {
  constexpr float levels = static_cast<float>((1 << BITS) - 1);
  alignas(64) float ub[kChunk];
  alignas(64) uint8_t cb[kChunk];
  if constexpr (STOCH) fill_uniforms(seed, i0, n, ub);
  const float* u = STOCH ? ub : nullptr;
  uint8_t* c = BITS == 8 ? out : cb;
  if (zr == kZeroNone) codes_span<T, ARR, kZeroNone>(x + i0, n, lo, inv, u, levels, c);
  else if (zr == kZeroAll) codes_span<T, ARR, kZeroAll>(x + i0, n, lo, inv, u, levels, c);
  else codes_span<T, ARR, kZeroSome>(x + i0, n, lo, inv, u, levels, c);
  if constexpr (BITS != 8) pack<BITS>(cb, n, out);
}

// Per-element parameters of the columns path: value of group (c % P) / R at c, for c in [0, P + kChunk).
inline std::vector<float> expand(const float* v, const Layout& L) {
  const int64_t P = L.G * L.R;
  const int64_t E = P + kChunk;
  std::vector<float> out(static_cast<size_t>(E));
  for (int64_t c = 0; c < E; ++c) out[c] = v[(c % P) / L.R];
  return out;
}

template <typename T, int BITS, bool STOCH>
void quantize_impl(const T* x, const Layout& L, float* running, EmaParams ema, float* lo, float* scale, float* inv,
                   uint64_t seed, uint8_t* q) {
  constexpr int per = 8 / BITS;
  constexpr float levels = static_cast<float>((1 << BITS) - 1);
  const bool flat = L.last % per == 0;
  const int64_t G = L.G;
  const auto fin = [&](const Stat& s, int64_t g) {
    finalize_group(s.lo, s.hi, s.nan, running ? running + g : nullptr, running ? running + G + g : nullptr, ema,
                   levels, lo + g, scale + g, inv + g);
  };
  // Codes of elements [s, e) with scalar parameters of group g (runs path) or the expanded arrays (columns path).
  const auto code_range = [&](int64_t s, int64_t e, const float* glo, const float* ginv, bool arr, int zr) {
    const int64_t P = G * L.R;
    if (flat) {
      for (int64_t i = s; i < e; i += kChunk) {
        const int64_t n = std::min(kChunk, e - i);
        if (arr) {
          const int64_t c0 = i % P;
          code_segment<T, BITS, STOCH, true>(x, i, n, glo + c0, ginv + c0, zr, seed, q + i / per);
        } else {
          code_segment<T, BITS, STOCH, false>(x, i, n, glo, ginv, zr, seed, q + i / per);
        }
      }
      return;
    }
    for (int64_t i = s; i < e;) {
      const int64_t line = i / L.last, c0 = i - line * L.last;
      const int64_t n = std::min({kChunk, L.last - c0, e - i});
      uint8_t* out = q + line * L.packed + c0 / per;
      if (arr) {
        const int64_t p0 = i % P;
        code_segment<T, BITS, STOCH, true>(x, i, n, glo + p0, ginv + p0, zr, seed, out);
      } else {
        code_segment<T, BITS, STOCH, false>(x, i, n, glo, ginv, zr, seed, out);
      }
      i += n;
    }
  };

  if (!columns_path(L)) {
    const int64_t R = L.R;
    const int64_t nruns = L.A * G;
    const int64_t grain = std::max<int64_t>(1, kGrain / R);
    if (L.A == 1 && R <= kFuseMax) {
      // One visit per run: statistics, finalisation, codes (the run is still in L1/L2 for the second read).
      at::parallel_for(0, nruns, grain, [&](int64_t j0, int64_t j1) {
        for (int64_t j = j0; j < j1; ++j) {
          Stat s;
          reduce_span(x + j * R, R, s);
          fin(s, j);
          code_range(j * R, (j + 1) * R, lo + j, inv + j, false, zero_rule(lo + j, 1));
        }
      });
      return;
    }
    std::vector<Stat> stats;
    stats_runs(x, L, stats);
    for (int64_t g = 0; g < G; ++g) fin(stats[g], g);
    at::parallel_for(0, nruns, grain, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        code_range(j * R, (j + 1) * R, lo + j % G, inv + j % G, false, zero_rule(lo + j % G, 1));
      }
    });
    return;
  }
  std::vector<Stat> stats;
  stats_cols(x, L, stats);
  for (int64_t g = 0; g < G; ++g) fin(stats[g], g);
  const std::vector<float> elo = expand(lo, L), einv = expand(inv, L);
  const int zr = zero_rule(lo, G);
  // Tasks of whole chunks (flat) or whole lines, ~kGrain elements each.
  if (flat) {
    const int64_t nchunks = divup(L.numel, kChunk);
    at::parallel_for(0, nchunks, std::max<int64_t>(1, kGrain / kChunk), [&](int64_t c0, int64_t c1) {
      code_range(c0 * kChunk, std::min(L.numel, c1 * kChunk), elo.data(), einv.data(), true, zr);
    });
  } else {
    at::parallel_for(0, L.nlines, std::max<int64_t>(1, kGrain / L.last), [&](int64_t l0, int64_t l1) {
      code_range(l0 * L.last, l1 * L.last, elo.data(), einv.data(), true, zr);
    });
  }
}

template <typename T>
void quantize_kernel(const T* x, const Layout& L, float* running, EmaParams ema, float* lo, float* scale, float* inv,
                     int64_t bits, bool stochastic, uint64_t seed, uint8_t* q) {
  if (stochastic) {
    if (bits == 8) quantize_impl<T, 8, true>(x, L, running, ema, lo, scale, inv, seed, q);
    else if (bits == 4) quantize_impl<T, 4, true>(x, L, running, ema, lo, scale, inv, seed, q);
    else quantize_impl<T, 2, true>(x, L, running, ema, lo, scale, inv, seed, q);
  } else {
    if (bits == 8) quantize_impl<T, 8, false>(x, L, running, ema, lo, scale, inv, seed, q);
    else if (bits == 4) quantize_impl<T, 4, false>(x, L, running, ema, lo, scale, inv, seed, q);
    else quantize_impl<T, 2, false>(x, L, running, ema, lo, scale, inv, seed, q);
  }
}

// ---------------------------------------------------------------------------------------------------------------------
// dequantize

// n codes of a packed stream starting at code k0 of byte `in` (k0 < per), unpacked into bytes.
template <int BITS>
inline void unpack(const uint8_t* __restrict in, int64_t n, uint8_t* __restrict c) {
  constexpr int per = 8 / BITS;
  constexpr uint32_t mask = (1u << BITS) - 1;
  const int64_t full = n / per;
  for (int64_t j = 0; j < full; ++j) {
    const uint32_t b = in[j];
    for (int k = 0; k < per; ++k) c[j * per + k] = static_cast<uint8_t>((b >> (k * BITS)) & mask);
  }
  for (int64_t k = 0; full * per + k < n; ++k) {
    c[full * per + k] = static_cast<uint8_t>((static_cast<uint32_t>(in[full]) >> (k * BITS)) & mask);
  }
}

// Values of n codes. ARR: per-element scale/lo arrays, else scale[0]/lo[0]. FINITE: every scale and lo is finite, so
// no value is NaN (code * scale is finite or +Inf, and adding a finite lo never makes NaN).
template <typename OUT, bool ARR, bool FINITE>
inline void values_span(const uint8_t* __restrict c, int64_t n, const float* __restrict scale,
                        const float* __restrict lo, OUT* y) {
  int64_t k = 0;
#if AP_AVX2
  for (; k + 8 <= n; k += 8) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + k));
    const __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
    const __m256 s = ARR ? _mm256_loadu_ps(scale + k) : _mm256_set1_ps(scale[0]);
    const __m256 l = ARR ? _mm256_loadu_ps(lo + k) : _mm256_set1_ps(lo[0]);
    store8<OUT, !FINITE>(y + k, _mm256_add_ps(_mm256_mul_ps(f, s), l));  // code * scale, then + lo: two roundings
  }
#endif
  for (; k < n; ++k) store_one(y + k, value_of(c[k], ARR ? scale[k] : scale[0], ARR ? lo[k] : lo[0]));
}

template <typename OUT, int BITS, bool ARR>
inline void value_segment(const uint8_t* in, int64_t n, const float* scale, const float* lo, bool finite, OUT* y) {
  alignas(64) uint8_t cb[kChunk];
  const uint8_t* c = in;
  if constexpr (BITS != 8) {
    unpack<BITS>(in, n, cb);
    c = cb;
  }
  if (finite) values_span<OUT, ARR, true>(c, n, scale, lo, y);
  else values_span<OUT, ARR, false>(c, n, scale, lo, y);
}

inline bool all_finite(const float* a, const float* b, int64_t n) {
  bool ok = true;
  for (int64_t g = 0; g < n; ++g) ok = ok && is_finite(a[g]) && is_finite(b[g]);
  return ok;
}

template <typename OUT, int BITS>
void dequantize_impl(const uint8_t* q, const Layout& L, const float* scale, const float* lo, OUT* y) {
  constexpr int per = 8 / BITS;
  const bool flat = L.last % per == 0;
  const int64_t G = L.G, P = L.G * L.R;
  const auto value_range = [&](int64_t s, int64_t e, const float* gs, const float* gl, bool arr, bool finite) {
    for (int64_t i = s; i < e;) {
      int64_t n;
      const uint8_t* in;
      if (flat) {
        n = std::min(kChunk, e - i);
        in = q + i / per;
      } else {
        const int64_t line = i / L.last, c0 = i - line * L.last;
        n = std::min({kChunk, L.last - c0, e - i});
        in = q + line * L.packed + c0 / per;
      }
      if (arr) {
        const int64_t p0 = i % P;
        value_segment<OUT, BITS, true>(in, n, gs + p0, gl + p0, finite, y + i);
      } else {
        value_segment<OUT, BITS, false>(in, n, gs, gl, finite, y + i);
      }
      i += n;
    }
  };
  if (!columns_path(L)) {
    const int64_t R = L.R;
    at::parallel_for(0, L.A * G, std::max<int64_t>(1, kGrain / R), [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t g = j % G;
        value_range(j * R, (j + 1) * R, scale + g, lo + g, false, all_finite(scale + g, lo + g, 1));
      }
    });
    return;
  }
  const std::vector<float> es = expand(scale, L), el = expand(lo, L);
  const bool finite = all_finite(scale, lo, G);
  if (flat) {
    const int64_t nchunks = divup(L.numel, kChunk);
    at::parallel_for(0, nchunks, std::max<int64_t>(1, kGrain / kChunk), [&](int64_t c0, int64_t c1) {
      value_range(c0 * kChunk, std::min(L.numel, c1 * kChunk), es.data(), el.data(), true, finite);
    });
  } else {
    at::parallel_for(0, L.nlines, std::max<int64_t>(1, kGrain / L.last), [&](int64_t l0, int64_t l1) {
      value_range(l0 * L.last, l1 * L.last, es.data(), el.data(), true, finite);
    });
  }
}

template <typename OUT>
void dequantize_kernel(const uint8_t* q, const Layout& L, const float* scale, const float* lo, int64_t bits, OUT* y) {
  if (bits == 8) dequantize_impl<OUT, 8>(q, L, scale, lo, y);
  else if (bits == 4) dequantize_impl<OUT, 4>(q, L, scale, lo, y);
  else dequantize_impl<OUT, 2>(q, L, scale, lo, y);
}
