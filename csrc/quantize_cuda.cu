// CUDA kernels for actpass::quantize and actpass::dequantize (registered for the CUDA dispatch key).
//
// quantize: where every group is one run of 256..65536 elements (per row, per (batch, head)), one kernel with one block
// per run (statistics by block reduction, finalisation, codes; the second read mostly hits L2). Elsewhere: one kernel
// that initialises a [3, G] workspace, one statistics kernel (first read of x), a per-group finalisation kernel
// (running EMA, scale, reciprocal), one codes kernel (second read of x, packed write). dequantize = one kernel. The
// arithmetic is that of actpass/_reference.py with every fp32 operation rounded on its own (__fmul_rn/__fadd_rn, and
// nvcc --fmad=false), so nearest rounding matches the reference bit for bit.
//
// Group statistics are combined across blocks with 32-bit atomics on order-preserving integer keys of the floats
// (min/max), plus an atomicOr flag for NaN; NaN never enters the min/max.
//
// Stochastic rounding: u for element i is lane i % 4 of Philox4x32-10 with the CUDA generator's seed,
// subsequence i / 4 and the generator's offset; every call advances the offset by 4. torch.manual_seed therefore
// reproduces the codes, and they do not depend on the launch configuration.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/PhiloxUtils.cuh>
#include <ATen/core/PhiloxRNGEngine.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cstdint>
#include <mutex>
#include <tuple>
#include <vector>

#include "quantize_common.h"

namespace actpass {
namespace {

constexpr int kThreads = 256;
constexpr int kVec = 8;  // elements per vectorised access: 2 x float4 for fp32, 1 x uint4 for bf16/fp16

// ---------------------------------------------------------------------------------------------------------------------
// Element types: raw storage and exact conversions (fp32 in; round-to-nearest-even out).

template <typename T>
struct Io;

template <>
struct Io<float> {
  using raw = float;
  static __device__ __forceinline__ float in(float v) { return v; }
  static __device__ __forceinline__ float out(float v) { return v; }
};

template <>
struct Io<c10::BFloat16> {
  using raw = uint16_t;
  static __device__ __forceinline__ float in(uint16_t b) { return __uint_as_float(static_cast<uint32_t>(b) << 16); }
  static __device__ __forceinline__ uint16_t out(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }
};

template <>
struct Io<c10::Half> {
  using raw = uint16_t;
  static __device__ __forceinline__ float in(uint16_t b) { return __half2float(__ushort_as_half(b)); }
  static __device__ __forceinline__ uint16_t out(float v) { return __half_as_ushort(__float2half_rn(v)); }
};

// 8 consecutive elements from a 16-byte aligned address.
template <typename T>
__device__ __forceinline__ void load8(const typename Io<T>::raw* p, float (&v)[kVec]) {
  if constexpr (std::is_same_v<T, float>) {
    const float4 a = reinterpret_cast<const float4*>(p)[0];
    const float4 b = reinterpret_cast<const float4*>(p)[1];
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
  } else {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      v[2 * k] = Io<T>::in(static_cast<uint16_t>(w[k] & 0xFFFFu));
      v[2 * k + 1] = Io<T>::in(static_cast<uint16_t>(w[k] >> 16));
    }
  }
}

template <typename T>
__device__ __forceinline__ void store8(typename Io<T>::raw* p, const float (&v)[kVec]) {
  if constexpr (std::is_same_v<T, float>) {
    reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
  } else {
    uint32_t w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      w[k] = static_cast<uint32_t>(Io<T>::out(v[2 * k])) | (static_cast<uint32_t>(Io<T>::out(v[2 * k + 1])) << 16);
    }
    *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
  }
}

// ---------------------------------------------------------------------------------------------------------------------
// Order-preserving keys: key(a) < key(b) iff a < b for non-NaN floats (-0.0 sorts before +0.0).

__device__ __forceinline__ unsigned key_of(float f) {
  const unsigned u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float float_of(unsigned k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7FFFFFFFu) : ~k);
}

struct Acc {
  float lo = INFINITY;
  float hi = -INFINITY;
  bool nan = false;
  __device__ __forceinline__ void add(float v) {
    if (v != v) {
      nan = true;
    } else {
      lo = fminf(lo, v);
      hi = fmaxf(hi, v);
    }
  }
};

// ws = [min keys (G), max keys (G), NaN flags (G)].
__device__ __forceinline__ void push(unsigned* ws, int64_t G, int64_t g, const Acc& a) {
  if (a.lo <= a.hi) {  // at least one non-NaN value
    atomicMin(ws + g, key_of(a.lo));
    atomicMax(ws + G + g, key_of(a.hi));
  }
  if (a.nan) atomicOr(ws + 2 * G + g, 1u);
}

// ---------------------------------------------------------------------------------------------------------------------
// Statistics, long runs (R >= 32): one warp per (run, chunk of the run); warp reduction, one atomic per warp.

template <typename T, bool VEC>
__global__ void stats_runs_kernel(const typename Io<T>::raw* __restrict__ x, int64_t R, int64_t G, int64_t nruns,
                                  int64_t chunk, int64_t chunks_per_run, unsigned* __restrict__ ws) {
  const int lane = threadIdx.x & 31;
  const int64_t nwarps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  const int64_t units = nruns * chunks_per_run;
  for (int64_t u = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; u < units; u += nwarps) {
    const int64_t j = u / chunks_per_run;
    const int64_t s = (u - j * chunks_per_run) * chunk;
    const int64_t e = min(R, s + chunk);
    const typename Io<T>::raw* p = x + j * R;
    Acc a;
    if constexpr (VEC) {  // R % 8 == 0, chunk % 256 == 0, x 16-byte aligned
      for (int64_t i = s + lane * kVec; i < e; i += 32 * kVec) {
        float v[kVec];
        load8<T>(p + i, v);
#pragma unroll
        for (int k = 0; k < kVec; ++k) a.add(v[k]);
      }
    } else {
      for (int64_t i = s + lane; i < e; i += 32) a.add(Io<T>::in(p[i]));
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      a.lo = fminf(a.lo, __shfl_xor_sync(0xFFFFFFFFu, a.lo, off));
      a.hi = fmaxf(a.hi, __shfl_xor_sync(0xFFFFFFFFu, a.hi, off));
      a.nan = __shfl_xor_sync(0xFFFFFFFFu, static_cast<int>(a.nan), off) != 0 || a.nan;
    }
    if (lane == 0) push(ws, G, j % G, a);
  }
}

// Statistics, short runs (R < 32, e.g. channel groups R == 1): x as a matrix [A, W = G * R]; a 2-D block covers a
// band of columns and a band of rows; each thread keeps per-column accumulators, merged per group in shared memory,
// then one global atomic per group and block.

template <typename T, int V>
__global__ void stats_cols_kernel(const typename Io<T>::raw* __restrict__ x, int64_t A, int64_t W, int64_t R,
                                  int64_t G, int64_t rows_per_block, unsigned* __restrict__ ws) {
  extern __shared__ unsigned smem[];  // [3][slots]
  const int64_t cols_per_block = static_cast<int64_t>(blockDim.x) * V;
  const int64_t cb = blockIdx.x * cols_per_block;
  const int64_t ce = min(W, cb + cols_per_block);
  const int64_t gbase = cb / R;
  const int nslots = static_cast<int>((ce - 1) / R - gbase + 1);
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int nthreads = blockDim.x * blockDim.y;
  for (int s = tid; s < nslots; s += nthreads) {
    smem[s] = 0xFFFFFFFFu;
    smem[nslots + s] = 0u;
    smem[2 * nslots + s] = 0u;
  }
  __syncthreads();

  const int64_t col0 = cb + static_cast<int64_t>(threadIdx.x) * V;
  if (col0 < W) {
    Acc a[V];
    const int64_t r0 = blockIdx.y * rows_per_block;
    const int64_t r1 = min(A, r0 + rows_per_block);
    for (int64_t r = r0 + threadIdx.y; r < r1; r += blockDim.y) {
      const typename Io<T>::raw* p = x + r * W + col0;
      if constexpr (V == kVec) {  // W % 8 == 0 and x 16-byte aligned: the 8 columns are all in range
        float v[kVec];
        load8<T>(p, v);
#pragma unroll
        for (int k = 0; k < kVec; ++k) a[k].add(v[k]);
      } else {
        a[0].add(Io<T>::in(p[0]));
      }
    }
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int64_t col = col0 + k;
      if (col < W) {
        const int s = static_cast<int>(col / R - gbase);
        if (a[k].lo <= a[k].hi) {
          atomicMin(smem + s, key_of(a[k].lo));
          atomicMax(smem + nslots + s, key_of(a[k].hi));
        }
        if (a[k].nan) atomicOr(smem + 2 * nslots + s, 1u);
      }
    }
  }
  __syncthreads();
  for (int s = tid; s < nslots; s += nthreads) {
    const int64_t g = gbase + s;
    if (smem[s] != 0xFFFFFFFFu) atomicMin(ws + g, smem[s]);
    if (smem[nslots + s] != 0u) atomicMax(ws + G + g, smem[nslots + s]);
    if (smem[2 * nslots + s] != 0u) atomicOr(ws + 2 * G + g, 1u);
  }
}

__global__ void finalize_kernel(const unsigned* __restrict__ ws, int64_t G, float* __restrict__ running, EmaParams ema,
                                float levels, float* __restrict__ lo, float* __restrict__ scale,
                                float* __restrict__ inv) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= G) return;
  finalize_group(float_of(ws[g]), float_of(ws[G + g]), ws[2 * G + g] != 0u, running ? running + g : nullptr,
                 running ? running + G + g : nullptr, ema, levels, lo + g, scale + g, inv + g);
}

// ---------------------------------------------------------------------------------------------------------------------
// Codes.

struct Geom {
  int64_t numel;
  int64_t last;    // elements per line
  int64_t packed;  // bytes per packed line
  int64_t R;       // run length: element i is in group (i / R) % G
  int64_t G;
};

// The 4 random words of subsequence `quad` at `offset` (counted in 32-bit words, as PyTorch's philox offsets are;
// always a multiple of 4 here): what curand_init(seed, quad, offset) + curand4 give, via ATen's header-only engine.
__device__ __forceinline__ uint4 philox_quad(uint64_t seed, uint64_t offset, int64_t quad) {
  at::Philox4_32 eng(seed, static_cast<uint64_t>(quad), offset / 4);
  uint4 r;
  r.x = eng();
  r.y = eng();
  r.z = eng();
  r.w = eng();
  return r;
}

__device__ __forceinline__ uint32_t lane_of(const uint4& r, int k) {
  return k == 0 ? r.x : k == 1 ? r.y : k == 2 ? r.z : r.w;
}

__device__ __forceinline__ int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

// 8 uniforms (stochastic) for elements [e, e + 8), e a multiple of 4: two Philox blocks, one per 4 elements.
__device__ __forceinline__ void draw8(uint64_t seed, uint64_t offset, int64_t e, float (&r)[kVec]) {
  const uint4 a = philox_quad(seed, offset, e / 4);
  const uint4 b = philox_quad(seed, offset, e / 4 + 1);
  r[0] = uniform_of(a.x); r[1] = uniform_of(a.y); r[2] = uniform_of(a.z); r[3] = uniform_of(a.w);
  r[4] = uniform_of(b.x); r[5] = uniform_of(b.y); r[6] = uniform_of(b.z); r[7] = uniform_of(b.w);
}

// Packs 8 codes and stores them at `out` (8 / per bytes, aligned to that size).
template <int BITS>
__device__ __forceinline__ void store_codes8(uint8_t* out, const uint8_t (&c)[kVec]) {
  constexpr int per = 8 / BITS;
  uint32_t b[kVec / per];
#pragma unroll
  for (int j = 0; j < kVec / per; ++j) {
    uint32_t w = 0;
#pragma unroll
    for (int k = 0; k < per; ++k) w |= static_cast<uint32_t>(c[j * per + k]) << (k * BITS);
    b[j] = w;
  }
  if constexpr (BITS == 8) {
    *reinterpret_cast<uint2*>(out) = make_uint2(b[0] | b[1] << 8 | b[2] << 16 | b[3] << 24,
                                                b[4] | b[5] << 8 | b[6] << 16 | b[7] << 24);
  } else if constexpr (BITS == 4) {
    *reinterpret_cast<uint32_t*>(out) = b[0] | b[1] << 8 | b[2] << 16 | b[3] << 24;
  } else {
    *reinterpret_cast<uint16_t*>(out) = static_cast<uint16_t>(b[0] | b[1] << 8);
  }
}

// Vector unit: the 8 elements [e, e + 8) of one line (last % 8 == 0, x 16-byte aligned), group parameters either
// fixed (lo_f/inv_f, FIXED) or looked up (R >= 8: one group for the unit; R == 1: one group per element).
template <typename T, int BITS, bool STOCH, bool FIXED>
__device__ __forceinline__ void code_unit8(const typename Io<T>::raw* __restrict__ x, const Geom& geo, int64_t e,
                                           const float* __restrict__ glo, const float* __restrict__ ginv, float lo_f,
                                           float inv_f, uint64_t seed, uint64_t offset, uint8_t* __restrict__ q) {
  constexpr int per = 8 / BITS;
  constexpr float levels = static_cast<float>((1 << BITS) - 1);
  float v[kVec];
  load8<T>(x + e, v);
  float r[kVec];
#pragma unroll
  for (int k = 0; k < kVec; ++k) r[k] = 0.5f;
  if constexpr (STOCH) draw8(seed, offset, e, r);
  uint8_t c[kVec];
  if (FIXED || geo.R >= kVec) {  // R is a multiple of last, hence of 8: one group for the unit
    float lo = lo_f, inv = inv_f;
    if constexpr (!FIXED) {
      const int64_t g = (e / geo.R) % geo.G;
      lo = glo[g];
      inv = ginv[g];
    }
#pragma unroll
    for (int k = 0; k < kVec; ++k) c[k] = code_of(v[k], lo, inv, r[k], levels);
  } else {  // R == 1: one group per element
    int64_t g = e % geo.G;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      c[k] = code_of(v[k], glo[g], ginv[g], r[k], levels);
      g = g + 1 == geo.G ? 0 : g + 1;
    }
  }
  store_codes8<BITS>(q + e / per, c);  // last % 8 == 0: lines pack without padding
}

// Scalar unit: codes [c0, c0 + 4) of line `line` (fewer at the line's end), so the unit owns its 4, 2 or 1 output
// bytes at every width. One division finds the group of its first element; the group then advances without dividing
// (the old per-byte unit paid 2-3 64-bit divisions per element). Stochastic rounding draws one Philox block for the
// unit, a second only when its flat indices straddle a multiple of 4 (last % 4 != 0).
template <typename T, int BITS, bool STOCH, bool FIXED>
__device__ __forceinline__ void code_unit4(const typename Io<T>::raw* __restrict__ x, const Geom& geo, int64_t line,
                                           int64_t c0, const float* __restrict__ glo, const float* __restrict__ ginv,
                                           float lo_f, float inv_f, uint64_t seed, uint64_t offset,
                                           uint8_t* __restrict__ q) {
  constexpr int per = 8 / BITS;
  constexpr float levels = static_cast<float>((1 << BITS) - 1);
  const int n = static_cast<int>(min(static_cast<int64_t>(4), geo.last - c0));
  const int64_t i0 = line * geo.last + c0;
  int64_t g = 0, left = 0;  // group of the current element; elements left in its run (R > 1)
  if constexpr (!FIXED) {
    if (geo.R == 1) {
      g = i0 % geo.G;
    } else {
      const int64_t j = i0 / geo.R;
      g = j % geo.G;
      left = geo.R - (i0 - j * geo.R);
    }
  }
  uint4 ra = make_uint4(0, 0, 0, 0), rb = ra;
  const int64_t quad = i0 / 4;
  if constexpr (STOCH) {
    ra = philox_quad(seed, offset, quad);
    if ((i0 + n - 1) / 4 != quad) rb = philox_quad(seed, offset, quad + 1);
  }
  uint32_t codes = 0;  // up to 4 codes, 8 bits each
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    if (k < n) {
      float r = 0.5f;
      if constexpr (STOCH) {
        const int m = static_cast<int>(i0 + k - 4 * quad);
        r = uniform_of(m < 4 ? lane_of(ra, m) : lane_of(rb, m - 4));
      }
      const float lo = FIXED ? lo_f : glo[g];
      const float inv = FIXED ? inv_f : ginv[g];
      codes |= static_cast<uint32_t>(code_of(Io<T>::in(x[i0 + k]), lo, inv, r, levels)) << (8 * k);
      if constexpr (!FIXED) {
        if (geo.R == 1) {
          g = g + 1 == geo.G ? 0 : g + 1;
        } else if (--left == 0) {
          g = g + 1 == geo.G ? 0 : g + 1;
          left = geo.R;
        }
      }
    }
  }
  uint8_t* out = q + line * geo.packed + c0 / per;  // c0 is a multiple of 4, hence of per
  if constexpr (BITS == 8) {
    for (int k = 0; k < n; ++k) out[k] = static_cast<uint8_t>(codes >> (8 * k));
  } else if constexpr (BITS == 4) {
    const uint32_t b0 = (codes & 0xFu) | ((codes >> 8) & 0xFu) << 4;
    const uint32_t b1 = ((codes >> 16) & 0xFu) | ((codes >> 24) & 0xFu) << 4;
    out[0] = static_cast<uint8_t>(b0);
    if (n > 2) out[1] = static_cast<uint8_t>(b1);
  } else {
    out[0] = static_cast<uint8_t>((codes & 0x3u) | ((codes >> 8) & 0x3u) << 2 | ((codes >> 16) & 0x3u) << 4 |
                                  ((codes >> 24) & 0x3u) << 6);
  }
}

// FAST: last % 8 == 0 and x 16-byte aligned: 8-element vector units. Otherwise 4-code scalar units.
template <typename T, int BITS, bool STOCH, bool FAST>
__global__ void codes_kernel(const typename Io<T>::raw* __restrict__ x, Geom geo, const float* __restrict__ glo,
                             const float* __restrict__ ginv, at::PhiloxCudaState philox, uint8_t* __restrict__ q) {
  uint64_t seed = 0, offset = 0;
  if constexpr (STOCH) {
    const auto seeds = at::cuda::philox::unpack(philox);
    seed = std::get<0>(seeds);
    offset = std::get<1>(seeds);
  }
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if constexpr (FAST) {
    const int64_t units = geo.numel / kVec;
    for (int64_t u = first; u < units; u += stride) {
      code_unit8<T, BITS, STOCH, false>(x, geo, u * kVec, glo, ginv, 0.f, 0.f, seed, offset, q);
    }
  } else {
    const int64_t upl = div_up(geo.last, 4);  // units per line
    const int64_t units = geo.numel / geo.last * upl;
    for (int64_t u = first; u < units; u += stride) {
      const int64_t line = u / upl;
      code_unit4<T, BITS, STOCH, false>(x, geo, line, (u - line * upl) * 4, glo, ginv, 0.f, 0.f, seed, offset, q);
    }
  }
}

// One block per run, where every group is one run (A == 1: per row, per (batch, head)) of at most kFuseMaxRun
// elements: the run's statistics (block reduction, no atomics), its finalisation and its codes in one kernel, so a
// quantize is one launch instead of a memset, a statistics kernel, a finalisation kernel and a codes kernel, and the
// second read of the run mostly hits L2. VEC: R % 8 == 0 and x 16-byte aligned (loads); FAST: the codes' vector
// units apply (last % 8 == 0, aligned).
constexpr int64_t kFuseMaxRun = 1 << 16;

template <typename T, int BITS, bool STOCH, bool VEC, bool FAST>
__global__ void fused_runs_kernel(const typename Io<T>::raw* __restrict__ x, Geom geo, float* __restrict__ running,
                                  EmaParams ema, float* __restrict__ glo, float* __restrict__ gscale,
                                  float* __restrict__ ginv, at::PhiloxCudaState philox, uint8_t* __restrict__ q) {
  constexpr float levels = static_cast<float>((1 << BITS) - 1);
  __shared__ float s_lo[32], s_hi[32];
  __shared__ int s_nan[32];
  __shared__ float s_par[2];
  uint64_t seed = 0, offset = 0;
  if constexpr (STOCH) {
    const auto seeds = at::cuda::philox::unpack(philox);
    seed = std::get<0>(seeds);
    offset = std::get<1>(seeds);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int64_t R = geo.R;
  for (int64_t j = blockIdx.x; j < geo.G; j += gridDim.x) {
    const typename Io<T>::raw* p = x + j * R;
    Acc a;
    if constexpr (VEC) {
      for (int64_t i = static_cast<int64_t>(threadIdx.x) * kVec; i < R; i += static_cast<int64_t>(blockDim.x) * kVec) {
        float v[kVec];
        load8<T>(p + i, v);
#pragma unroll
        for (int k = 0; k < kVec; ++k) a.add(v[k]);
      }
    } else {
      for (int64_t i = threadIdx.x; i < R; i += blockDim.x) a.add(Io<T>::in(p[i]));
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      a.lo = fminf(a.lo, __shfl_xor_sync(0xFFFFFFFFu, a.lo, off));
      a.hi = fmaxf(a.hi, __shfl_xor_sync(0xFFFFFFFFu, a.hi, off));
      a.nan = __shfl_xor_sync(0xFFFFFFFFu, static_cast<int>(a.nan), off) != 0 || a.nan;
    }
    if (lane == 0) {
      s_lo[warp] = a.lo;
      s_hi[warp] = a.hi;
      s_nan[warp] = a.nan ? 1 : 0;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      float lo = INFINITY, hi = -INFINITY;
      bool nan = false;
      for (int w = 0; w < nwarps; ++w) {
        lo = fminf(lo, s_lo[w]);
        hi = fmaxf(hi, s_hi[w]);
        nan = nan || s_nan[w] != 0;
      }
      // lo > hi (no non-NaN value) only for an all-NaN run; finalize_group then sees the NaN flag.
      finalize_group(lo, hi, nan, running ? running + j : nullptr, running ? running + geo.G + j : nullptr, ema,
                     levels, glo + j, gscale + j, ginv + j);
      s_par[0] = glo[j];
      s_par[1] = ginv[j];
    }
    __syncthreads();
    const float lo = s_par[0], inv = s_par[1];
    if constexpr (FAST) {
      for (int64_t e = j * R + static_cast<int64_t>(threadIdx.x) * kVec; e < (j + 1) * R;
           e += static_cast<int64_t>(blockDim.x) * kVec) {
        code_unit8<T, BITS, STOCH, true>(x, geo, e, nullptr, nullptr, lo, inv, seed, offset, q);
      }
    } else {
      const int64_t upl = div_up(geo.last, 4);
      const int64_t line0 = j * R / geo.last;  // a run is whole lines
      const int64_t units = R / geo.last * upl;
      for (int64_t u = threadIdx.x; u < units; u += blockDim.x) {
        const int64_t l = u / upl;
        code_unit4<T, BITS, STOCH, true>(x, geo, line0 + l, (u - l * upl) * 4, nullptr, nullptr, lo, inv, seed,
                                         offset, q);
      }
    }
    __syncthreads();  // s_par and the warp partials are reused by the next run
  }
}

// ---------------------------------------------------------------------------------------------------------------------
// Values.

// FAST: last % 8 == 0 and q aligned to the 8 / per bytes of a unit; a unit is 8 elements, stored as one 16/32-byte
// vector. Otherwise one element per thread iteration.
template <typename T, int BITS, bool FAST>
__global__ void values_kernel(const uint8_t* __restrict__ q, Geom geo, const float* __restrict__ gscale,
                              const float* __restrict__ glo, typename Io<T>::raw* __restrict__ y) {
  constexpr int per = 8 / BITS;
  constexpr uint32_t mask = (1u << BITS) - 1;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if constexpr (FAST) {
    const int64_t units = geo.numel / kVec;
    for (int64_t u = first; u < units; u += stride) {
      const int64_t e = u * kVec;
      const uint8_t* in = q + e / per;
      uint32_t bytes[kVec / per];
      if constexpr (BITS == 8) {
        const uint2 w = *reinterpret_cast<const uint2*>(in);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          bytes[k] = (w.x >> (8 * k)) & 0xFFu;
          bytes[4 + k] = (w.y >> (8 * k)) & 0xFFu;
        }
      } else if constexpr (BITS == 4) {
        const uint32_t w = *reinterpret_cast<const uint32_t*>(in);
#pragma unroll
        for (int k = 0; k < 4; ++k) bytes[k] = (w >> (8 * k)) & 0xFFu;
      } else {
        const uint32_t w = *reinterpret_cast<const uint16_t*>(in);
        bytes[0] = w & 0xFFu;
        bytes[1] = w >> 8;
      }
      float v[kVec];
      if (geo.R >= kVec) {
        const int64_t g = (e / geo.R) % geo.G;
        const float s = gscale[g], l = glo[g];
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          v[k] = value_of(static_cast<uint8_t>((bytes[k / per] >> ((k % per) * BITS)) & mask), s, l);
        }
      } else {
        int64_t g = e % geo.G;
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          v[k] = value_of(static_cast<uint8_t>((bytes[k / per] >> ((k % per) * BITS)) & mask), gscale[g], glo[g]);
          g = g + 1 == geo.G ? 0 : g + 1;
        }
      }
      store8<T>(y + e, v);
    }
  } else {
    // 4-code units of one line, as the codes kernel's scalar path: one division for the line, one for the group.
    const int64_t upl = div_up(geo.last, 4);
    const int64_t units = geo.numel / geo.last * upl;
    for (int64_t u = first; u < units; u += stride) {
      const int64_t line = u / upl;
      const int64_t c0 = (u - line * upl) * 4;
      const int n = static_cast<int>(min(static_cast<int64_t>(4), geo.last - c0));
      const int64_t i0 = line * geo.last + c0;
      int64_t g, left = 0;
      if (geo.R == 1) {
        g = i0 % geo.G;
      } else {
        const int64_t j = i0 / geo.R;
        g = j % geo.G;
        left = geo.R - (i0 - j * geo.R);
      }
      const uint8_t* in = q + line * geo.packed + c0 / per;
      uint32_t bytes = 0;  // the unit's packed bytes (4 at 8 bits, 2 at 4 bits, 1 at 2 bits)
      for (int b = 0; b < (n + per - 1) / per; ++b) bytes |= static_cast<uint32_t>(in[b]) << (8 * b);
      for (int k = 0; k < n; ++k) {
        const uint8_t code = static_cast<uint8_t>((bytes >> (k * BITS)) & mask);
        y[i0 + k] = Io<T>::out(value_of(code, gscale[g], glo[g]));
        if (geo.R == 1) {
          g = g + 1 == geo.G ? 0 : g + 1;
        } else if (--left == 0) {
          g = g + 1 == geo.G ? 0 : g + 1;
          left = geo.R;
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------------
// Host side.

bool aligned(const void* p, size_t n) { return reinterpret_cast<uintptr_t>(p) % n == 0; }

// Streaming multiprocessors of the current device (cached per device; not via ATen/cuda/CUDAContext.h, which needs
// the cuBLAS/cuSPARSE headers).
int num_sms() {
  static std::once_flag once;
  static std::vector<int> counts;
  std::call_once(once, [] { counts.assign(static_cast<size_t>(c10::cuda::device_count()), 0); });
  const int dev = c10::cuda::current_device();
  int& n = counts.at(static_cast<size_t>(dev));
  if (n == 0) {
    int value = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, cudaDevAttrMultiProcessorCount, dev));
    n = value;
  }
  return n;
}

int64_t grid_for(int64_t units, int64_t per_block = kThreads) {
  return std::max<int64_t>(1, std::min<int64_t>(divup(units, per_block), static_cast<int64_t>(num_sms()) * 32));
}

template <typename T>
void launch_stats(const typename Io<T>::raw* x, const Layout& L, unsigned* ws, cudaStream_t stream) {
  const bool x16 = aligned(x, 16);
  const int sms = num_sms();
  if (L.R >= 32) {
    const int64_t nruns = L.A * L.G;
    const bool vec = x16 && L.R % kVec == 0;
    // Chunks of >= 256 elements, sized for ~64 warps per SM: fewer, larger chunks mean fewer atomics.
    int64_t chunk = std::max<int64_t>(256, divup(L.numel, static_cast<int64_t>(sms) * 64));
    chunk = std::min(divup(chunk, 256) * 256, divup(L.R, 256) * 256);
    const int64_t cpr = divup(L.R, chunk);
    const int64_t blocks = grid_for(nruns * cpr * 32);
    if (vec) {
      stats_runs_kernel<T, true><<<blocks, kThreads, 0, stream>>>(x, L.R, L.G, nruns, chunk, cpr, ws);
    } else {
      stats_runs_kernel<T, false><<<blocks, kThreads, 0, stream>>>(x, L.R, L.G, nruns, chunk, cpr, ws);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const int64_t W = L.G * L.R;
  const bool vec = x16 && W % kVec == 0;
  const int V = vec ? kVec : 1;
  const int tx = static_cast<int>(std::min<int64_t>(kThreads, divup(divup(W, V), 32) * 32));
  const int ty = kThreads / tx;
  const int64_t gx = divup(W, static_cast<int64_t>(tx) * V);
  TORCH_CHECK(gx <= 0x7FFFFFFF, "actpass::quantize: tensor too large");
  // ~8 blocks per SM in all (2 per SM left most of an H100 idle on a [4096, 768] channel reduction), each covering
  // at least kMinRowsPerBlock rows so that the global atomics (one per group and block) stay few.
  constexpr int64_t kMinRowsPerBlock = 16;
  int64_t gy = std::max<int64_t>(
      1, std::min<int64_t>(divup(L.A, kMinRowsPerBlock), 8 * static_cast<int64_t>(sms) / gx));
  const int64_t rows_per_block = divup(L.A, gy);
  gy = divup(L.A, rows_per_block);
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
  const dim3 block(tx, ty);
  const size_t smem = 3 * static_cast<size_t>(tx) * V * sizeof(unsigned);
  if (vec) {
    stats_cols_kernel<T, kVec><<<grid, block, smem, stream>>>(x, L.A, W, L.R, L.G, rows_per_block, ws);
  } else {
    stats_cols_kernel<T, 1><<<grid, block, smem, stream>>>(x, L.A, W, L.R, L.G, rows_per_block, ws);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int BITS, bool STOCH>
void launch_codes(const typename Io<T>::raw* x, const Layout& L, const float* lo, const float* inv,
                  at::PhiloxCudaState philox, uint8_t* q, cudaStream_t stream) {
  const Geom geo{L.numel, L.last, L.packed, L.R, L.G};
  constexpr int per = 8 / BITS;
  const bool fast = L.last % kVec == 0 && aligned(x, 16) && aligned(q, kVec / per);
  if (fast) {
    codes_kernel<T, BITS, STOCH, true><<<grid_for(L.numel / kVec), kThreads, 0, stream>>>(x, geo, lo, inv, philox, q);
  } else {
    codes_kernel<T, BITS, STOCH, false>
        <<<grid_for(L.nlines * divup(L.last, 4)), kThreads, 0, stream>>>(x, geo, lo, inv, philox, q);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Whether quantize can run as one fused_runs_kernel launch: every group is one run (A == 1) of whole lines, short
// enough for its second read to find it in L2, and long enough for a block.
bool fused_layout(const Layout& L) { return L.A == 1 && L.R >= 256 && L.R <= kFuseMaxRun && L.R % L.last == 0; }

template <typename T, int BITS, bool STOCH>
void launch_fused(const typename Io<T>::raw* x, const Layout& L, float* running, EmaParams ema, float* lo,
                  float* scale, float* inv, at::PhiloxCudaState philox, uint8_t* q, cudaStream_t stream) {
  const Geom geo{L.numel, L.last, L.packed, L.R, L.G};
  constexpr int per = 8 / BITS;
  const bool vec = L.R % kVec == 0 && aligned(x, 16);
  const bool fast = L.last % kVec == 0 && aligned(x, 16) && aligned(q, kVec / per);
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(L.G, static_cast<int64_t>(num_sms()) * 8));
  if (fast) {  // last % 8 == 0 implies R % 8 == 0
    fused_runs_kernel<T, BITS, STOCH, true, true>
        <<<blocks, kThreads, 0, stream>>>(x, geo, running, ema, lo, scale, inv, philox, q);
  } else if (vec) {
    fused_runs_kernel<T, BITS, STOCH, true, false>
        <<<blocks, kThreads, 0, stream>>>(x, geo, running, ema, lo, scale, inv, philox, q);
  } else {
    fused_runs_kernel<T, BITS, STOCH, false, false>
        <<<blocks, kThreads, 0, stream>>>(x, geo, running, ema, lo, scale, inv, philox, q);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_fused_any(const typename Io<T>::raw* x, const Layout& L, float* running, EmaParams ema, float* lo,
                      float* scale, float* inv, int64_t bits, bool stochastic, at::PhiloxCudaState philox, uint8_t* q,
                      cudaStream_t stream) {
  if (stochastic) {
    if (bits == 8) launch_fused<T, 8, true>(x, L, running, ema, lo, scale, inv, philox, q, stream);
    else if (bits == 4) launch_fused<T, 4, true>(x, L, running, ema, lo, scale, inv, philox, q, stream);
    else launch_fused<T, 2, true>(x, L, running, ema, lo, scale, inv, philox, q, stream);
  } else {
    if (bits == 8) launch_fused<T, 8, false>(x, L, running, ema, lo, scale, inv, philox, q, stream);
    else if (bits == 4) launch_fused<T, 4, false>(x, L, running, ema, lo, scale, inv, philox, q, stream);
    else launch_fused<T, 2, false>(x, L, running, ema, lo, scale, inv, philox, q, stream);
  }
}

// [min keys (G) = 0xFFFFFFFF, max keys (G) = 0, NaN flags (G) = 0] in one launch (it was two memsets).
__global__ void init_ws_kernel(unsigned* __restrict__ ws, int64_t G) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < 3 * G;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    ws[i] = i < G ? 0xFFFFFFFFu : 0u;
  }
}

template <typename T>
void launch_codes_any(const typename Io<T>::raw* x, const Layout& L, const float* lo, const float* inv, int64_t bits,
                      bool stochastic, at::PhiloxCudaState philox, uint8_t* q, cudaStream_t stream) {
  if (stochastic) {
    if (bits == 8) launch_codes<T, 8, true>(x, L, lo, inv, philox, q, stream);
    else if (bits == 4) launch_codes<T, 4, true>(x, L, lo, inv, philox, q, stream);
    else launch_codes<T, 2, true>(x, L, lo, inv, philox, q, stream);
  } else {
    if (bits == 8) launch_codes<T, 8, false>(x, L, lo, inv, philox, q, stream);
    else if (bits == 4) launch_codes<T, 4, false>(x, L, lo, inv, philox, q, stream);
    else launch_codes<T, 2, false>(x, L, lo, inv, philox, q, stream);
  }
}

template <typename T, int BITS>
void launch_values(const uint8_t* q, const Layout& L, const float* scale, const float* lo, typename Io<T>::raw* y,
                   cudaStream_t stream) {
  const Geom geo{L.numel, L.last, L.packed, L.R, L.G};
  constexpr int per = 8 / BITS;
  const bool fast = L.last % kVec == 0 && aligned(q, kVec / per) && aligned(y, 16);
  if (fast) {
    values_kernel<T, BITS, true><<<grid_for(L.numel / kVec), kThreads, 0, stream>>>(q, geo, scale, lo, y);
  } else {
    values_kernel<T, BITS, false><<<grid_for(L.nlines * divup(L.last, 4)), kThreads, 0, stream>>>(q, geo, scale, lo, y);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_cuda(const at::Tensor& x_in, int64_t bits, int64_t gend,
                                                             int64_t groups, bool stochastic,
                                                             const std::optional<at::Tensor>& running, double decay) {
  check_quantize_args(x_in, bits, gend, groups);
  TORCH_CHECK(x_in.is_cuda(), "actpass::quantize (CUDA kernel): x is on ", x_in.device());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t G = num_groups(x_in, gend, groups);
  if (running.has_value()) check_running(*running, x_in, G);
  const Layout L = make_layout(x_in.sizes(), gend, G, bits, "quantize");

  std::vector<int64_t> qshape(x_in.sizes().begin(), x_in.sizes().end());
  qshape.back() = bits == 8 ? L.last : L.packed;
  at::Tensor q = at::empty(qshape, x_in.options().dtype(at::kByte));
  if (L.numel == 0) {
    return {q, at::zeros({G}, x_in.options().dtype(at::kFloat)), at::zeros({G}, x_in.options().dtype(at::kFloat))};
  }
  at::Tensor scale = at::empty({G}, x_in.options().dtype(at::kFloat));
  at::Tensor lo = at::empty({G}, x_in.options().dtype(at::kFloat));
  const at::Tensor x = x_in.contiguous();
  at::Tensor run = running.has_value() ? running->contiguous() : at::Tensor();
  at::Tensor inv = at::empty({G}, x.options().dtype(at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  at::PhiloxCudaState philox;
  if (stochastic) {
    auto gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(std::nullopt,
                                                                   at::cuda::detail::getDefaultCUDAGenerator());
    std::lock_guard<std::mutex> lock(gen->mutex_);
    philox = gen->philox_cuda_state(4);  // every element reads 4 values at this offset of its own subsequence
  }
  const EmaParams ema{static_cast<float>(decay), static_cast<float>(1.0 - decay)};
  const float levels = static_cast<float>((1 << bits) - 1);

  dispatch_float_types(x.scalar_type(), "quantize", [&](auto tag) {
    using T = decltype(tag);
    using raw = typename Io<T>::raw;
    const raw* xp = reinterpret_cast<const raw*>(x.const_data_ptr<T>());
    float* runp = run.defined() ? run.data_ptr<float>() : nullptr;
    if (fused_layout(L)) {
      launch_fused_any<T>(xp, L, runp, ema, lo.data_ptr<float>(), scale.data_ptr<float>(), inv.data_ptr<float>(), bits,
                          stochastic, philox, q.data_ptr<uint8_t>(), stream);
      return;
    }
    at::Tensor ws = at::empty({3 * G}, x.options().dtype(at::kInt));
    unsigned* wsp = reinterpret_cast<unsigned*>(ws.data_ptr<int32_t>());
    init_ws_kernel<<<grid_for(3 * G), kThreads, 0, stream>>>(wsp, G);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_stats<T>(xp, L, wsp, stream);
    finalize_kernel<<<divup(G, kThreads), kThreads, 0, stream>>>(wsp, G, runp, ema, levels, lo.data_ptr<float>(),
                                                                scale.data_ptr<float>(), inv.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_codes_any<T>(xp, L, lo.data_ptr<float>(), inv.data_ptr<float>(), bits, stochastic, philox,
                        q.data_ptr<uint8_t>(), stream);
  });
  if (running.has_value() && !running->is_same(run)) running->copy_(run);
  return {q, scale, lo};
}

at::Tensor dequantize_cuda(const at::Tensor& q_in, const at::Tensor& scale_in, const at::Tensor& lo_in, int64_t bits,
                           int64_t gend, int64_t last_dim, at::ScalarType dtype) {
  check_dequantize_args(q_in, scale_in, lo_in, bits, gend, last_dim, dtype);
  TORCH_CHECK(q_in.is_cuda(), "actpass::dequantize (CUDA kernel): q is on ", q_in.device());
  const c10::cuda::CUDAGuard guard(q_in.device());
  const std::vector<int64_t> shape = dequantize_shape(q_in, bits, last_dim);
  at::Tensor y = at::empty(shape, q_in.options().dtype(dtype));
  const Layout L = make_layout(shape, gend, scale_in.numel(), bits, "dequantize");
  if (L.numel == 0) return y;
  const at::Tensor q = q_in.contiguous();
  const at::Tensor scale = scale_in.contiguous();
  const at::Tensor lo = lo_in.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float_types(dtype, "dequantize", [&](auto tag) {
    using T = decltype(tag);
    using raw = typename Io<T>::raw;
    raw* yp = reinterpret_cast<raw*>(y.data_ptr<T>());
    const uint8_t* qp = q.const_data_ptr<uint8_t>();
    const float* sp = scale.const_data_ptr<float>();
    const float* lp = lo.const_data_ptr<float>();
    if (bits == 8) launch_values<T, 8>(qp, L, sp, lp, yp, stream);
    else if (bits == 4) launch_values<T, 4>(qp, L, sp, lp, yp, stream);
    else launch_values<T, 2>(qp, L, sp, lp, yp, stream);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(actpass, CUDA, m) {
  m.impl("quantize", &quantize_cuda);
  m.impl("dequantize", &dequantize_cuda);
}

}  // namespace actpass
