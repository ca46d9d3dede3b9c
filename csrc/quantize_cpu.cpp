// CPU kernels for actpass::quantize and actpass::dequantize (registered for the CPU dispatch key).
//
// quantize: per-group (min, max, has-NaN), a per-group finalisation (running EMA, scale, reciprocal), then the codes,
// packed; where every group is one run that fits in L2 the three happen in one visit of the run, elsewhere in two
// parallel passes (see quantize_cpu_kernels.h). dequantize is one pass. Arithmetic follows actpass/_reference.py bit for bit with nearest rounding (see quantize_common.h).
//
// Stochastic rounding draws u ~ U[0, 1) for element i from Philox4x32-10 keyed by a 64-bit seed taken from the
// default CPU generator (so torch.manual_seed reproduces it), with subsequence i / 4 and lane i % 4: the draws do
// not depend on the thread count or on how the work is split.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/core/PhiloxRNGEngine.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <vector>

#include "quantize_common.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define AP_HAVE_AVX2_COPY 1
#include <immintrin.h>
#else
#define AP_HAVE_AVX2_COPY 0
#endif

namespace actpass {

// NOTE: ~32K elements per task keeps the parallel overhead under ~2% at 2-16 threads while still splitting a
// [64, 197, 384] activation (4.8M elements) into enough tasks.
constexpr int64_t kGrain = 1 << 15;

namespace isa_default {
#define AP_AVX2 0
#include "quantize_cpu_kernels.h"
#undef AP_AVX2
}  // namespace isa_default

#if AP_HAVE_AVX2_COPY
#pragma GCC push_options
#pragma GCC target("avx2,f16c")
namespace isa_avx2 {
#define AP_AVX2 1
#include "quantize_cpu_kernels.h"
#undef AP_AVX2
}  // namespace isa_avx2
#pragma GCC pop_options
#endif

namespace {

// The AVX2+F16C copy when the CPU has it, unless ACTPASS_CPU_ISA=default (read on every call so that tests can
// compare both copies in one process).
bool use_avx2() {
#if AP_HAVE_AVX2_COPY
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  const char* isa = std::getenv("ACTPASS_CPU_ISA");
  return supported && !(isa != nullptr && std::strcmp(isa, "default") == 0);
#else
  return false;
#endif
}

template <typename T>
void run_quantize(const T* x, const Layout& L, float* running, float* scale, float* lo, float* inv, int64_t bits,
                  bool stochastic, uint64_t seed, EmaParams ema, uint8_t* q) {
#if AP_HAVE_AVX2_COPY
  if (use_avx2()) return isa_avx2::quantize_kernel(x, L, running, ema, lo, scale, inv, bits, stochastic, seed, q);
#endif
  isa_default::quantize_kernel(x, L, running, ema, lo, scale, inv, bits, stochastic, seed, q);
}

template <typename OUT>
void run_dequantize(const uint8_t* q, const Layout& L, const float* scale, const float* lo, int64_t bits, OUT* y) {
#if AP_HAVE_AVX2_COPY
  if (use_avx2()) return isa_avx2::dequantize_kernel(q, L, scale, lo, bits, y);
#endif
  isa_default::dequantize_kernel(q, L, scale, lo, bits, y);
}

uint64_t draw_seed() {
  auto gen = at::get_generator_or_default<at::CPUGeneratorImpl>(std::nullopt, at::detail::getDefaultCPUGenerator());
  std::lock_guard<std::mutex> lock(gen->mutex_);
  return gen->random64();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_cpu(const at::Tensor& x_in, int64_t bits, int64_t gend,
                                                            int64_t groups, bool stochastic,
                                                            const std::optional<at::Tensor>& running, double decay) {
  check_quantize_args(x_in, bits, gend, groups);
  TORCH_CHECK(x_in.device().is_cpu(), "actpass::quantize (CPU kernel): x is on ", x_in.device());
  const int64_t G = num_groups(x_in, gend, groups);
  if (running.has_value()) check_running(*running, x_in, G);
  const Layout L = make_layout(x_in.sizes(), gend, G, bits, "quantize");

  std::vector<int64_t> qshape(x_in.sizes().begin(), x_in.sizes().end());
  qshape.back() = bits == 8 ? L.last : L.packed;
  at::Tensor q = at::empty(qshape, x_in.options().dtype(at::kByte));
  at::Tensor scale = at::zeros({G}, x_in.options().dtype(at::kFloat));
  at::Tensor lo = at::zeros({G}, x_in.options().dtype(at::kFloat));
  if (L.numel == 0) return {q, scale, lo};

  const at::Tensor x = x_in.contiguous();
  at::Tensor run = running.has_value() ? running->contiguous() : at::Tensor();
  at::Tensor inv = at::empty({G}, x.options().dtype(at::kFloat));
  const EmaParams ema{static_cast<float>(decay), static_cast<float>(1.0 - decay)};

  dispatch_float_types(x.scalar_type(), "quantize", [&](auto tag) {
    using scalar_t = decltype(tag);
    run_quantize(x.const_data_ptr<scalar_t>(), L, run.defined() ? run.data_ptr<float>() : nullptr,
                 scale.data_ptr<float>(), lo.data_ptr<float>(), inv.data_ptr<float>(), bits, stochastic,
                 stochastic ? draw_seed() : 0, ema, q.data_ptr<uint8_t>());
  });
  if (running.has_value() && !running->is_same(run)) running->copy_(run);
  return {q, scale, lo};
}

at::Tensor dequantize_cpu(const at::Tensor& q_in, const at::Tensor& scale_in, const at::Tensor& lo_in, int64_t bits,
                          int64_t gend, int64_t last_dim, at::ScalarType dtype) {
  check_dequantize_args(q_in, scale_in, lo_in, bits, gend, last_dim, dtype);
  TORCH_CHECK(q_in.device().is_cpu(), "actpass::dequantize (CPU kernel): q is on ", q_in.device());
  const std::vector<int64_t> shape = dequantize_shape(q_in, bits, last_dim);
  at::Tensor y = at::empty(shape, q_in.options().dtype(dtype));
  const Layout L = make_layout(shape, gend, scale_in.numel(), bits, "dequantize");
  if (L.numel == 0) return y;
  const at::Tensor q = q_in.contiguous();
  const at::Tensor scale = scale_in.contiguous();
  const at::Tensor lo = lo_in.contiguous();
  const float* sp = scale.const_data_ptr<float>();
  const float* lp = lo.const_data_ptr<float>();
  const uint8_t* qp = q.const_data_ptr<uint8_t>();
  dispatch_float_types(dtype, "dequantize", [&](auto tag) {
    using scalar_t = decltype(tag);
    run_dequantize(qp, L, sp, lp, bits, y.data_ptr<scalar_t>());
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(actpass, CPU, m) {
  m.impl("quantize", &quantize_cpu);
  m.impl("dequantize", &dequantize_cpu);
}

}  // namespace actpass
