// The CPU loops of quantize_cpu.cpp. This file is included twice by quantize_cpu.cpp, inside two namespaces: once
// compiled for the baseline ISA and, on x86-64 with GCC, once more under `#pragma GCC target("avx2,f16c")` (chosen
// at run time). No include guard and no #include here: everything it needs is included before.
//
// NOTE: measured on this repo's 2-core Xeon (tools/results/kernels-*.json): the AVX2+F16C copy is what makes the
// float16 paths fast (the baseline copy converts half <-> float one element at a time). FMA is deliberately not in the
// target list and the file is compiled with -ffp-contract=off, so both copies give identical, reference-exact codes.

// Elements processed per inner chunk (converted inputs, codes, uniforms, gathered group parameters live on the stack).
constexpr int64_t kChunk = 1024;
// Lanes of the unrolled min/max reduction (the compiler maps them onto SIMD registers).
constexpr int kLanes = 16;

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
#if AP_F16C
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

template <typename T>
inline void from_float(const float* __restrict y, int64_t n, T* __restrict out) {
  if constexpr (std::is_same_v<T, float>) {
    if (y != out) std::memcpy(out, y, n * sizeof(float));
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    uint16_t* __restrict d = reinterpret_cast<uint16_t*>(out);
    for (int64_t k = 0; k < n; ++k) {
      uint32_t u;
      std::memcpy(&u, y + k, sizeof(float));
      const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
      d[k] = static_cast<uint16_t>(y[k] != y[k] ? 0x7FC0u : rounded);  // c10::BFloat16's NaN
    }
  } else {
#if AP_F16C
    uint16_t* d = reinterpret_cast<uint16_t*>(out);
    int64_t k = 0;
    for (; k + 8 <= n; k += 8) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + k),
                       _mm256_cvtps_ph(_mm256_loadu_ps(y + k), _MM_FROUND_TO_NEAREST_INT));
    }
    for (; k < n; ++k) d[k] = _cvtss_sh(y[k], _MM_FROUND_TO_NEAREST_INT);
#else
    for (int64_t k = 0; k < n; ++k) out[k] = static_cast<c10::Half>(y[k]);
#endif
  }
}

// ---------------------------------------------------------------------------------------------------------------------
// Pass 1: per-group statistics.

struct Stat {
  float lo = INFINITY;
  float hi = -INFINITY;
  bool nan = false;
  void merge(float l, float h, bool n) {
    lo = l < lo ? l : lo;
    hi = h > hi ? h : hi;
    nan = nan || n;
  }
};

// min / max / any-NaN of n contiguous floats. NaN never enters lo/hi (comparisons with NaN are false).
inline void reduce_floats(const float* __restrict x, int64_t n, Stat& out) {
  float lo[kLanes];
  float hi[kLanes];
  uint32_t nan[kLanes];
  for (int k = 0; k < kLanes; ++k) {
    lo[k] = INFINITY;
    hi[k] = -INFINITY;
    nan[k] = 0;
  }
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int k = 0; k < kLanes; ++k) {
      const float v = x[i + k];
      lo[k] = v < lo[k] ? v : lo[k];
      hi[k] = v > hi[k] ? v : hi[k];
      nan[k] |= v != v ? 1u : 0u;
    }
  }
  for (int k = 0; i < n; ++i, ++k) {
    const float v = x[i];
    lo[k] = v < lo[k] ? v : lo[k];
    hi[k] = v > hi[k] ? v : hi[k];
    nan[k] |= v != v ? 1u : 0u;
  }
  for (int k = 0; k < kLanes; ++k) out.merge(lo[k], hi[k], nan[k] != 0);
}

template <typename T>
inline void reduce_span(const T* x, int64_t n, Stat& out) {
  alignas(64) float buf[kChunk];
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const int64_t m = std::min(kChunk, n - c0);
    reduce_floats(as_float(x + c0, m, buf), m, out);
  }
}

// Element-wise min/max of one row segment into per-group accumulators (channel groups: R == 1).
template <typename T>
inline void reduce_row(const T* x, int64_t n, float* __restrict lo, float* __restrict hi, uint8_t* __restrict nan) {
  alignas(64) float buf[kChunk];
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const int64_t m = std::min(kChunk, n - c0);
    const float* __restrict v = as_float(x + c0, m, buf);
    float* __restrict l = lo + c0;
    float* __restrict h = hi + c0;
    uint8_t* __restrict z = nan + c0;
    for (int64_t k = 0; k < m; ++k) {
      l[k] = v[k] < l[k] ? v[k] : l[k];
      h[k] = v[k] > h[k] ? v[k] : h[k];
      z[k] |= v[k] != v[k] ? 1 : 0;
    }
  }
}

// Per-group (lo, hi, has_nan) of x viewed as [A, G, R]. The work is split over a grid of (A-chunk, G-chunk,
// R-chunk) tasks; each (A-chunk, R-chunk) pair owns one row of partial results, merged at the end.
template <typename T>
void group_stats(const T* x, const Layout& L, std::vector<Stat>& out) {
  const int64_t A = L.A, G = L.G, R = L.R;
  const int64_t want = std::max<int64_t>(1, std::min<int64_t>(divup(L.numel, kGrain), 4 * at::get_num_threads()));
  // Prefer splitting groups (no merge cost), but keep row segments >= 256 contiguous elements when A > 1.
  int64_t SG = std::min(G, want);
  if (A > 1) SG = std::min(SG, std::max<int64_t>(1, G * R / 256));
  int64_t rest = divup(want, SG);
  const int64_t SA = std::min(A, rest);
  rest = divup(rest, SA);
  const int64_t SR = std::max<int64_t>(1, std::min(rest, R / 4096));
  const int64_t P = SA * SR;

  std::vector<Stat> part(static_cast<size_t>(P * G));
  at::parallel_for(0, SA * SG * SR, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t ia = t / (SG * SR), ig = (t / SR) % SG, ir = t % SR;
      const int64_t a0 = A * ia / SA, a1 = A * (ia + 1) / SA;
      const int64_t g0 = G * ig / SG, g1 = G * (ig + 1) / SG;
      const int64_t r0 = R * ir / SR, r1 = R * (ir + 1) / SR;
      Stat* p = part.data() + (ia * SR + ir) * G;
      if (R == 1) {
        std::vector<float> lo(g1 - g0, INFINITY), hi(g1 - g0, -INFINITY);
        std::vector<uint8_t> nan(g1 - g0, 0);
        for (int64_t a = a0; a < a1; ++a) reduce_row(x + a * G + g0, g1 - g0, lo.data(), hi.data(), nan.data());
        for (int64_t g = g0; g < g1; ++g) p[g] = Stat{lo[g - g0], hi[g - g0], nan[g - g0] != 0};
      } else {
        for (int64_t g = g0; g < g1; ++g) p[g] = Stat{};
        for (int64_t a = a0; a < a1; ++a) {
          for (int64_t g = g0; g < g1; ++g) reduce_span(x + (a * G + g) * R + r0, r1 - r0, p[g]);
        }
      }
    }
  });
  out.assign(static_cast<size_t>(G), Stat{});
  at::parallel_for(0, G, 4096, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      for (int64_t p = 0; p < P; ++p) {
        const Stat& s = part[p * G + g];
        out[g].merge(s.lo, s.hi, s.nan);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------------------------
// Pass 2: codes.

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

template <typename T, int BITS, bool STOCH>
void write_codes(const T* x, const Layout& L, const float* glo, const float* ginv, uint64_t seed, uint8_t* q) {
  constexpr float levels = static_cast<float>((1 << BITS) - 1);
  const int64_t grain = std::max<int64_t>(1, kGrain / L.last);
  at::parallel_for(0, L.nlines, grain, [&](int64_t l0, int64_t l1) {
    alignas(64) float xb[kChunk];
    alignas(64) uint8_t cb[kChunk];
    alignas(64) float ub[kChunk];
    alignas(64) float lob[kChunk];
    alignas(64) float invb[kChunk];
    for (int64_t line = l0; line < l1; ++line) {
      uint8_t* ql = q + line * L.packed;
      for (int64_t c0 = 0; c0 < L.last; c0 += kChunk) {
        const int64_t n = std::min(kChunk, L.last - c0);
        const int64_t i0 = line * L.last + c0;
        const float* __restrict xf = as_float(x + i0, n, xb);
        if constexpr (STOCH) fill_uniforms(seed, i0, n, ub);
        // 8-bit codes go straight to the output; packed codes go through the stack buffer.
        uint8_t* __restrict c = BITS == 8 ? ql + c0 : cb;
        if (L.per_line) {
          const int64_t g = (line / L.lines_per_run) % L.G;
          const float lo = glo[g], inv = ginv[g];
          for (int64_t k = 0; k < n; ++k) c[k] = code_of(xf[k], lo, inv, STOCH ? ub[k] : 0.5f, levels);
        } else {
          // One group per element (R == 1): groups [i0 % G, ...) are contiguous in glo/ginv unless they wrap around
          // (e.g. channel groups, G == last: never), in which case they are gathered first.
          const int64_t g0 = i0 % L.G;
          const float* __restrict lo = glo + g0;
          const float* __restrict inv = ginv + g0;
          if (g0 + n > L.G) {
            for (int64_t k = 0, g = g0; k < n; ++k, g = g + 1 == L.G ? 0 : g + 1) {
              lob[k] = glo[g];
              invb[k] = ginv[g];
            }
            lo = lob;
            inv = invb;
          }
          for (int64_t k = 0; k < n; ++k) c[k] = code_of(xf[k], lo[k], inv[k], STOCH ? ub[k] : 0.5f, levels);
        }
        if constexpr (BITS != 8) pack<BITS>(cb, n, ql + c0 / (8 / BITS));
      }
    }
  });
}

template <typename T>
void codes_kernel(const T* x, const Layout& L, const float* lo, const float* inv, int64_t bits, bool stochastic,
                  uint64_t seed, uint8_t* q) {
  if (stochastic) {
    if (bits == 8) write_codes<T, 8, true>(x, L, lo, inv, seed, q);
    else if (bits == 4) write_codes<T, 4, true>(x, L, lo, inv, seed, q);
    else write_codes<T, 2, true>(x, L, lo, inv, seed, q);
  } else {
    if (bits == 8) write_codes<T, 8, false>(x, L, lo, inv, seed, q);
    else if (bits == 4) write_codes<T, 4, false>(x, L, lo, inv, seed, q);
    else write_codes<T, 2, false>(x, L, lo, inv, seed, q);
  }
}

// ---------------------------------------------------------------------------------------------------------------------
// dequantize

// Codes [c0, c0 + n) of a packed line; c0 is a multiple of 8 / BITS (chunks start at multiples of kChunk).
template <int BITS>
inline void unpack(const uint8_t* __restrict in, int64_t c0, int64_t n, uint8_t* __restrict c) {
  constexpr int per = 8 / BITS;
  constexpr uint32_t mask = (1u << BITS) - 1;
  const uint8_t* __restrict src = in + c0 / per;
  const int64_t full = n / per;
  for (int64_t j = 0; j < full; ++j) {
    const uint32_t b = src[j];
    for (int k = 0; k < per; ++k) c[j * per + k] = static_cast<uint8_t>((b >> (k * BITS)) & mask);
  }
  for (int64_t k = 0; full * per + k < n; ++k) {
    c[full * per + k] = static_cast<uint8_t>((static_cast<uint32_t>(src[full]) >> (k * BITS)) & mask);
  }
}

template <typename OUT, int BITS>
void write_values(const uint8_t* q, const Layout& L, const float* gscale, const float* glo, OUT* y) {
  const int64_t grain = std::max<int64_t>(1, kGrain / L.last);
  at::parallel_for(0, L.nlines, grain, [&](int64_t l0, int64_t l1) {
    alignas(64) uint8_t cb[kChunk];
    alignas(64) float yb[kChunk];
    alignas(64) float sb[kChunk];
    alignas(64) float lb[kChunk];
    for (int64_t line = l0; line < l1; ++line) {
      const uint8_t* ql = q + line * L.packed;
      OUT* yl = y + line * L.last;
      for (int64_t c0 = 0; c0 < L.last; c0 += kChunk) {
        const int64_t n = std::min(kChunk, L.last - c0);
        const uint8_t* __restrict c = ql + c0;
        if constexpr (BITS != 8) {
          unpack<BITS>(ql, c0, n, cb);
          c = cb;
        }
        float* __restrict v = nullptr;
        if constexpr (std::is_same_v<OUT, float>) v = yl + c0;
        else v = yb;
        if (L.per_line) {
          const int64_t g = (line / L.lines_per_run) % L.G;
          const float s = gscale[g], l = glo[g];
          for (int64_t k = 0; k < n; ++k) v[k] = value_of(c[k], s, l);
        } else {  // one group per element: contiguous unless wrapping around (see write_codes)
          const int64_t g0 = (line * L.last + c0) % L.G;
          const float* __restrict s = gscale + g0;
          const float* __restrict l = glo + g0;
          if (g0 + n > L.G) {
            for (int64_t k = 0, g = g0; k < n; ++k, g = g + 1 == L.G ? 0 : g + 1) {
              sb[k] = gscale[g];
              lb[k] = glo[g];
            }
            s = sb;
            l = lb;
          }
          for (int64_t k = 0; k < n; ++k) v[k] = value_of(c[k], s[k], l[k]);
        }
        from_float(v, n, yl + c0);
      }
    }
  });
}

template <typename OUT>
void values_kernel(const uint8_t* q, const Layout& L, const float* scale, const float* lo, int64_t bits, OUT* y) {
  if (bits == 8) write_values<OUT, 8>(q, L, scale, lo, y);
  else if (bits == 4) write_values<OUT, 4>(q, L, scale, lo, y);
  else write_values<OUT, 2>(q, L, scale, lo, y);
}
