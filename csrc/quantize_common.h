// Shared by the CPU and CUDA kernels of actpass::quantize / actpass::dequantize.
//
// The semantics are those of actpass/_reference.py (the spec): read it first. This header holds what both devices
// must compute identically: argument checks, the [A, G, R] grouping, the per-group finalisation (running EMA,
// scale, reciprocal) and the element-wise code / value arithmetic, written so that no multiply-add is ever fused.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define AP_HD __host__ __device__ __forceinline__
#else
#define AP_HD inline
#endif

namespace actpass {

// ---------------------------------------------------------------------------------------------------------------------
// fp32 arithmetic with explicit rounding after every operation. On the device the _rn intrinsics are never contracted
// into an FMA; on the host the sources are compiled with -ffp-contract=off (and no -march flags).

AP_HD float fmul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

AP_HD float fadd(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

AP_HD float fsub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

AP_HD float fdiv(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

AP_HD bool is_nan(float v) { return v != v; }
AP_HD bool is_finite(float v) {  // false for NaN and +-Inf
#if defined(__CUDA_ARCH__)
  return fabsf(v) < INFINITY;
#else
  return std::fabs(v) < INFINITY;
#endif
}

// ---------------------------------------------------------------------------------------------------------------------
// Per-group finalisation: current range (NaN-propagated) -> optional running EMA -> (lo, scale, inv).
//
// Mirrors _reference.update_running / scale_of / codes:
//   new = decay * running + (1 - decay) * current     (decay and 1 - decay rounded to fp32, as torch does with a
//                                                       Python scalar; two products then one add, unfused)
//   running is written only when the current range is finite; codes use the updated range.
//   scale = (hi - lo) / L (true division), inv = 1 / scale if scale > 0 else 0.
struct EmaParams {
  float decay;  // (float)decay
  float keep;   // (float)(1.0 - decay), computed in double like Python does
};

AP_HD void finalize_group(
    float cur_lo, float cur_hi, bool has_nan, float* run_lo, float* run_hi, EmaParams ema, float levels,
    float* out_lo, float* out_scale, float* out_inv) {
  if (has_nan) {
    cur_lo = NAN;
    cur_hi = NAN;
  }
  float lo = cur_lo;
  float hi = cur_hi;
  if (run_lo != nullptr && is_finite(cur_lo) && is_finite(cur_hi)) {
    const float r0 = *run_lo;
    const float r1 = *run_hi;
    const bool seen = !is_nan(r0);
    lo = seen ? fadd(fmul(ema.decay, r0), fmul(ema.keep, cur_lo)) : cur_lo;
    hi = seen ? fadd(fmul(ema.decay, r1), fmul(ema.keep, cur_hi)) : cur_hi;
    *run_lo = lo;
    *run_hi = hi;
  }
  const float scale = fdiv(fsub(hi, lo), levels);
  *out_lo = lo;
  *out_scale = scale;
  *out_inv = scale > 0.f ? fdiv(1.f, scale) : 0.f;
}

// ---------------------------------------------------------------------------------------------------------------------
// One code. The reference computes clamp(nan_to_zero(floor(t)), 0, L) with t = (x - lo) * inv + r (r = 0.5 or the
// uniform draw). For t in [0, L] floor(t) == trunc(t), t < 0 gives 0 either way, t > L gives L, NaN gives 0; so
// clamping first and truncating after is identical and needs no floor (which SSE2 cannot vectorise).
AP_HD uint8_t code_of(float x, float lo, float inv, float r, float levels) {
  float t = fadd(fmul(fsub(x, lo), inv), r);
  t = t > 0.f ? t : 0.f;  // also maps NaN to 0
  t = t < levels ? t : levels;
  // A value above a zero low end never gets code 0: ReLU's backward reads only "saved > 0", and rounding small
  // positives down to 0 flipped ~0.3% of a ReLU mask (5.2% gradient error on a conv-BN-ReLU stem; 0.37% with this).
  // NOTE: t is in [0, L] here and code 0 <=> t < 1, so raising t to at least 1 when x > lo is the rule. Written as a
  // max with a selected bound: `c == 0 && x > lo` (or `&` of the two tests) became a branch that stopped GCC from
  // vectorising the CPU code loops (-ftrapping-math forbids speculating the second comparison).
  // Only in groups whose low end is exactly 0 (ReLU-like): elsewhere the rule doubled 4-bit gradient error
  // (6.3% -> 11.6% on a transformer block) for no benefit. Two selects multiplied, so the loop still vectorises.
  const float at_least = (x > lo ? 1.f : 0.f) * (lo == 0.f ? 1.f : 0.f);
  t = t > at_least ? t : at_least;
  return static_cast<uint8_t>(static_cast<int32_t>(t));
}

// One value: code * scale, then + lo (two roundings), in fp32.
AP_HD float value_of(uint8_t c, float scale, float lo) { return fadd(fmul(static_cast<float>(c), scale), lo); }

// Uniform in [0, 1) from 32 random bits (24-bit mantissa grid, exact in fp32).
AP_HD float uniform_of(uint32_t r) { return static_cast<float>(r >> 8) * (1.0f / 16777216.0f); }

}  // namespace actpass

// ---------------------------------------------------------------------------------------------------------------------
// Host side: argument checks and the grouping geometry.
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <vector>

namespace actpass {

inline int64_t divup(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Calls f(T{}) with T the C++ type of one of the three supported floating types (fewer instantiations than
// AT_DISPATCH_FLOATING_TYPES_AND2, which also covers double).
template <typename F>
void dispatch_float_types(at::ScalarType t, const char* op, F&& f) {
  switch (t) {
    case at::kFloat:
      f(float{});
      break;
    case at::kBFloat16:
      f(c10::BFloat16{});
      break;
    case at::kHalf:
      f(c10::Half{});
      break;
    default:
      TORCH_CHECK(false, "actpass::", op, ": unsupported dtype ", t);
  }
}

// Geometry of a (logical, contiguous) tensor as runs and lines.
//   run j = R consecutive elements, group (j % G); A = number of runs / G.
//   line = one row along the last dimension (``last`` elements, ``packed`` output bytes once packed).
//   per_line: every line lies inside one run (true unless gend == ndim with last > 1), then the line's group is
//   (line / lines_per_run) % G; otherwise every element is its own run (R == 1) and its group is (index % G).
struct Layout {
  int64_t numel = 0;
  int64_t G = 0;
  int64_t R = 1;
  int64_t A = 0;
  int64_t last = 1;
  int64_t nlines = 0;
  int64_t per = 1;     // codes per byte
  int64_t packed = 1;  // bytes per packed line
  int64_t lines_per_run = 1;
  bool per_line = true;
};

inline Layout make_layout(c10::IntArrayRef shape, int64_t gend, int64_t G, int64_t bits, const char* op) {
  Layout L;
  L.numel = 1;
  for (auto s : shape) L.numel *= s;
  L.G = G;
  L.R = 1;
  for (int64_t d = gend; d < static_cast<int64_t>(shape.size()); ++d) L.R *= shape[d];
  L.last = shape.empty() ? 1 : shape.back();
  L.per = 8 / bits;
  L.packed = divup(L.last, L.per);
  if (L.numel == 0) return L;
  const int64_t nruns = L.numel / L.R;
  TORCH_CHECK(G >= 1, "actpass::", op, ": ", G, " statistics groups for a non-empty tensor");
  TORCH_CHECK(nruns % G == 0, "actpass::", op, ": the ", nruns, " runs of shape ", shape, " (dims [", gend,
              ":] form a run) cannot be folded into ", G, " groups: the number of runs must be a multiple of it");
  L.A = nruns / G;
  L.nlines = L.numel / L.last;
  L.per_line = L.R % L.last == 0;
  L.lines_per_run = L.per_line ? L.R / L.last : 1;
  return L;
}

inline void check_quantize_args(const at::Tensor& x, int64_t bits, int64_t gend, int64_t groups) {
  TORCH_CHECK(bits == 2 || bits == 4 || bits == 8, "actpass::quantize: bits must be one of (2, 4, 8), got ", bits);
  TORCH_CHECK(x.dim() >= 1, "actpass::quantize: cannot quantize a 0-d tensor");
  TORCH_CHECK(gend >= 0 && gend <= x.dim(), "actpass::quantize: gend=", gend, " out of range for a ", x.dim(),
              "-d tensor");
  TORCH_CHECK(groups == -1 || groups >= 1, "actpass::quantize: groups must be -1 or positive, got ", groups);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "actpass::quantize: unsupported dtype ", x.scalar_type(),
              " (float32, bfloat16, float16 are supported)");
}

inline int64_t num_groups(const at::Tensor& x, int64_t gend, int64_t groups) {
  if (groups != -1) return groups;
  int64_t g = 1;
  for (int64_t d = 0; d < gend; ++d) g *= x.size(d);
  return g;
}

inline void check_running(const at::Tensor& r, const at::Tensor& x, int64_t G) {
  TORCH_CHECK(r.scalar_type() == at::kFloat, "actpass::quantize: running must be float32, got ", r.scalar_type());
  TORCH_CHECK(r.device() == x.device(), "actpass::quantize: running is on ", r.device(), " but x is on ",
              x.device());
  TORCH_CHECK(r.dim() == 2 && r.size(0) == 2 && r.size(1) == G, "actpass::quantize: running must have shape [2, ",
              G, "], got ", r.sizes());
}

// Output shape of dequantize (the reference's unpack: 8-bit keeps q's shape).
inline std::vector<int64_t> dequantize_shape(const at::Tensor& q, int64_t bits, int64_t last_dim) {
  std::vector<int64_t> shape(q.sizes().begin(), q.sizes().end());
  if (bits != 8) shape.back() = last_dim;
  return shape;
}

inline void check_dequantize_args(const at::Tensor& q, const at::Tensor& scale, const at::Tensor& lo, int64_t bits,
                                  int64_t gend, int64_t last_dim, at::ScalarType dtype) {
  TORCH_CHECK(bits == 2 || bits == 4 || bits == 8, "actpass::dequantize: bits must be one of (2, 4, 8), got ",
              bits);
  TORCH_CHECK(q.scalar_type() == at::kByte, "actpass::dequantize: q must be uint8, got ", q.scalar_type());
  TORCH_CHECK(q.dim() >= 1, "actpass::dequantize: q must have at least one dimension");
  TORCH_CHECK(gend >= 0 && gend <= q.dim(), "actpass::dequantize: gend=", gend, " out of range for a ", q.dim(),
              "-d tensor");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && lo.scalar_type() == at::kFloat,
              "actpass::dequantize: scale and lo must be float32, got ", scale.scalar_type(), " and ",
              lo.scalar_type());
  TORCH_CHECK(scale.numel() == lo.numel(), "actpass::dequantize: scale has ", scale.numel(), " groups but lo has ",
              lo.numel());
  TORCH_CHECK(scale.device() == q.device() && lo.device() == q.device(),
              "actpass::dequantize: q, scale and lo must be on one device, got ", q.device(), ", ",
              scale.device(), ", ", lo.device());
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "actpass::dequantize: unsupported output dtype ", dtype, " (float32, bfloat16, float16 are supported)");
  if (bits != 8) {
    TORCH_CHECK(last_dim >= 0 && divup(last_dim, 8 / bits) == q.size(-1), "actpass::dequantize: last_dim=",
                last_dim, " does not match q's packed last dimension ", q.size(-1), " at ", bits, " bits");
  }
}

}  // namespace actpass
