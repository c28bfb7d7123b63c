// Fused elementwise ops of a decoder layer for CPU decode (built by mistralpy/kernels/cpu/__init__.py;
// wrapped by mistralpy/layers/cpu_fused.py). Each replaces 3-8 eager torch ops (each ~3-8 us of dispatch)
// with one call; the math is done in float32 and rounded once to the input dtype, like the torch paths
// in layers/norm.py, layers/activation.py and layers/rotary.py:
//
//   rms_norm(x [..., H], w [H], eps, offset) -> [..., H]
//       offset == 0: T(w * T(x * r)),           r = 1 / sqrt(mean(x^2) + eps)  (HF multiplies in T)
//       offset != 0: T((x * r) * (offset + w))  (Gemma)
//   act_and_mul(gate_up [..., 2I], act, hf_rounding) -> [..., I] = T(act(gate) * up); act 0 silu,
//       1 gelu-tanh, 2 gelu (erf), 3 relu; hf_rounding: T(T(act(gate)) * up), HF's two roundings
//
// (rope, the third, is rope.cpp.) x / gate_up may be strided views (last dim contiguous); outputs are
// new contiguous tensors. AVX-512 and AVX2 paths (elementwise.h), the scalar path the portable fallback.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "elementwise.h"
#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace {

// ------------------------------------------------------------------------------------ rms_norm

template <typename T, typename W>
void rms_row(const T* x, const W* w, T* y, int64_t H, float eps, float offset) {
#if defined(MISTRALPY_FUSED_AVX512)
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  int64_t j = 0;
  for (; j + 64 <= H; j += 64) {
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) {
      const __m512 v = load16(x + j + 16 * u, tail_mask(16));
      acc[u] = _mm512_fmadd_ps(v, v, acc[u]);
    }
  }
  for (; j < H; j += 16) {
    const __m512 v = load16(x + j, tail_mask(H - j));
    acc[0] = _mm512_fmadd_ps(v, v, acc[0]);
  }
  const float ss = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
  // mean = sum / H as torch's mean (a division, not a product with 1/H)
  const __m512 r = _mm512_set1_ps(1.0f / std::sqrt(ss / static_cast<float>(H) + eps));
  for (j = 0; j < H; j += 16) {
    const __mmask16 m = tail_mask(H - j);
    const __m512 h = _mm512_mul_ps(load16(x + j, m), r);
    const __m512 wv = load16(w + j, m);
    __m512 out;
    if (offset != 0.0f) {
      out = _mm512_mul_ps(h, _mm512_add_ps(_mm512_set1_ps(offset), wv));
    } else {
      out = _mm512_mul_ps(wv, round_to<T>(h));
    }
    store16(y + j, out, m);
  }
#else
  // The sum of squares in double: within half an ulp of the exact float, where torch's vectorized
  // float sums land too (a float running sum over thousands of values drifts several ulp).
  int64_t j = 0;
  double ssd = 0.0;
#if defined(MISTRALPY_FUSED_AVX2)
  __m256d acc[2] = {_mm256_setzero_pd(), _mm256_setzero_pd()};  // squares of floats are exact in double
  for (; j + 8 <= H; j += 8) {
    const __m256 v = load8(x + j);
    const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v)), hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
    acc[0] = _mm256_fmadd_pd(lo, lo, acc[0]);
    acc[1] = _mm256_fmadd_pd(hi, hi, acc[1]);
  }
  alignas(32) double part[4];
  _mm256_store_pd(part, _mm256_add_pd(acc[0], acc[1]));
  ssd = (part[0] + part[1]) + (part[2] + part[3]);
#endif
  for (; j < H; ++j) {
    const double v = to_f(x[j]);
    ssd += v * v;
  }
  const float ss = static_cast<float>(ssd);
  const float r = 1.0f / std::sqrt(ss / static_cast<float>(H) + eps);
  j = 0;
#if defined(MISTRALPY_FUSED_AVX2)
  const __m256 rv = _mm256_set1_ps(r), off = _mm256_set1_ps(offset);
  for (; j + 8 <= H; j += 8) {
    const __m256 h = keep(_mm256_mul_ps(load8(x + j), rv));
    const __m256 wv = load8(w + j);
    store8(y + j, offset != 0.0f ? _mm256_mul_ps(h, _mm256_add_ps(off, wv)) : _mm256_mul_ps(wv, round8<T>(h)));
  }
#endif
  for (; j < H; ++j) {
    const float h = keep(to_f(x[j]) * r);
    const float out = offset != 0.0f ? h * (offset + to_f(w[j])) : to_f(w[j]) * round_to<T>(h);
    y[j] = static_cast<T>(out);
  }
#endif
}

template <typename T, typename W>
void rms_rows(const at::Tensor& x, const at::Tensor& w, at::Tensor& y, double eps, double offset) {
  const int64_t H = x.size(-1);
  const Rows rows(x);
  const T* xp = x.data_ptr<T>();
  const W* wp = w.data_ptr<W>();
  T* yp = y.data_ptr<T>();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(H, 1));
  at::parallel_for(0, rows.n, grain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) rms_row(xp + rows.offset(i), wp, yp + i * H, H, float(eps), float(offset));
  });
}

at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& w_in, double eps, double offset) {
  const at::Tensor x = rowable(x_in);
  const at::Tensor w = w_in.contiguous();
  TORCH_CHECK(w.dim() == 1 && w.size(0) == x.size(-1), "rms_norm: weight must be [H]");
  TORCH_CHECK(offset != 0.0 || w.scalar_type() == x.scalar_type(),
              "rms_norm: weight dtype must equal x dtype when offset == 0");
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (x.numel() == 0) return y;
  dispatch_float(x.scalar_type(), "rms_norm", [&](auto xt) {
    dispatch_float(w.scalar_type(), "rms_norm", [&](auto wt) {
      rms_rows<decltype(xt), decltype(wt)>(x, w, y, eps, offset);
    });
  });
  return y;
}

// --------------------------------------------------------------------------------- act_and_mul

enum Act { SILU = 0, GELU_TANH = 1, GELU = 2, RELU = 3 };

inline float act_scalar(float g, int act) {
  switch (act) {
    case SILU:
      return g / (1.0f + std::exp(-g));
    case GELU_TANH: {  // 0.5 x (1 + tanh(u)) == x / (1 + e^(-2u)), without 1 + tanh's cancellation for x << 0
      const float u = 0.7978845608028654f * (g + 0.044715f * (g * g * g));
      return g / (1.0f + std::exp(-2.0f * u));
    }
    case GELU: {  // torch's vectorized erf (Abramowitz-Stegun 7.1.26), so both builds agree with it
      const float z = g * 0.70710678118654752f;
      const float a = std::fabs(z);
      const float t = 1.0f / (0.3275911f * a + 1.0f);
      const float r = (((1.061405429f * t - 1.453152027f) * t + 1.421413741f) * t - 0.284496736f) * t + 0.254829592f;
      const float erf = std::copysign(1.0f - r * t * std::exp(-z * z), z);
      return g * 0.5f * (1.0f + erf);
    }
    default:
      return g > 0.0f ? g : (g == g ? 0.0f : g);
  }
}

#if defined(MISTRALPY_FUSED_AVX512)
template <int ACT>
inline __m512 act16(__m512 g) {
  const __m512 one = _mm512_set1_ps(1.0f);
  if constexpr (ACT == SILU) {
    return _mm512_div_ps(g, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
  } else if constexpr (ACT == GELU_TANH) {
    const __m512 cube = _mm512_mul_ps(_mm512_mul_ps(g, g), g);
    const __m512 u = _mm512_mul_ps(_mm512_set1_ps(0.7978845608028654f),
                                   _mm512_fmadd_ps(_mm512_set1_ps(0.044715f), cube, g));
    return _mm512_div_ps(g, _mm512_add_ps(one, exp16(_mm512_mul_ps(_mm512_set1_ps(-2.0f), u))));
  } else if constexpr (ACT == GELU) {
    const __m512 z = _mm512_mul_ps(g, _mm512_set1_ps(0.70710678118654752f));
    const __m512 sign = _mm512_and_ps(_mm512_set1_ps(-0.0f), z);
    const __m512 a = _mm512_abs_ps(z);
    const __m512 t = _mm512_div_ps(one, _mm512_fmadd_ps(_mm512_set1_ps(0.3275911f), a, one));
    __m512 r = _mm512_fmadd_ps(_mm512_set1_ps(1.061405429f), t, _mm512_set1_ps(-1.453152027f));
    r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(1.421413741f));
    r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(-0.284496736f));
    r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(0.254829592f));
    const __m512 e = exp16(_mm512_xor_ps(_mm512_set1_ps(-0.0f), _mm512_mul_ps(z, z)));
    const __m512 erf = _mm512_xor_ps(sign, _mm512_fmadd_ps(_mm512_mul_ps(_mm512_xor_ps(_mm512_set1_ps(-0.0f), e), t), r, one));
    return _mm512_mul_ps(_mm512_mul_ps(g, _mm512_set1_ps(0.5f)), _mm512_add_ps(one, erf));
  } else {
    return _mm512_max_ps(_mm512_setzero_ps(), g);  // NaN passes (max returns its 2nd operand)
  }
}

template <int ACT, typename T>
inline void act_row_v(const T* g, const T* u, T* y, int64_t I, bool hf) {
  for (int64_t j = 0; j < I; j += 16) {
    const __mmask16 m = tail_mask(I - j);
    __m512 a = act16<ACT>(load16(g + j, m));
    if (hf) a = round_to<T>(a);
    store16(y + j, _mm512_mul_ps(a, load16(u + j, m)), m);
  }
}
#endif

#if defined(MISTRALPY_FUSED_AVX2)
using mistralpy_simd::exp8;
// SiLU and gelu-tanh on 8 lanes (act16's formulas); full vectors only, the tail takes act_scalar.
template <int ACT>
inline __m256 act8(__m256 g) {
  const __m256 one = _mm256_set1_ps(1.0f);
  if constexpr (ACT == SILU) {
    return _mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
  } else {
    const __m256 cube = _mm256_mul_ps(_mm256_mul_ps(g, g), g);
    const __m256 u = _mm256_mul_ps(_mm256_set1_ps(0.7978845608028654f),
                                   _mm256_fmadd_ps(_mm256_set1_ps(0.044715f), cube, g));
    return _mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_mul_ps(_mm256_set1_ps(-2.0f), u))));
  }
}

template <int ACT, typename T>
inline void act_row_v8(const T* g, const T* u, T* y, int64_t I, bool hf) {
  int64_t j = 0;
  for (; j + 8 <= I; j += 8) {
    __m256 a = act8<ACT>(load8(g + j));
    if (hf) a = round8<T>(a);
    store8(y + j, _mm256_mul_ps(a, load8(u + j)));
  }
  for (; j < I; ++j) {
    const float a = act_scalar(to_f(g[j]), ACT);
    y[j] = static_cast<T>((hf ? round_to<T>(a) : a) * to_f(u[j]));
  }
}
#endif

template <typename T>
inline void act_row(const T* g, const T* u, T* y, int64_t I, int act, bool hf) {
#if defined(MISTRALPY_FUSED_AVX2)
  if (act == SILU) return act_row_v8<SILU>(g, u, y, I, hf);
  if (act == GELU_TANH) return act_row_v8<GELU_TANH>(g, u, y, I, hf);
#endif
#if defined(MISTRALPY_FUSED_AVX512)
  switch (act) {
    case SILU: return act_row_v<SILU>(g, u, y, I, hf);
    case GELU_TANH: return act_row_v<GELU_TANH>(g, u, y, I, hf);
    case GELU: return act_row_v<GELU>(g, u, y, I, hf);
    default: return act_row_v<RELU>(g, u, y, I, hf);
  }
#else
  for (int64_t j = 0; j < I; ++j) {
    const float a = act_scalar(to_f(g[j]), act);
    y[j] = static_cast<T>((hf ? round_to<T>(a) : a) * to_f(u[j]));
  }
#endif
}

at::Tensor act_and_mul(const at::Tensor& x_in, int64_t act, bool hf_rounding) {
  TORCH_CHECK(act >= 0 && act <= 3, "act_and_mul: act must be 0 (silu), 1 (gelu-tanh), 2 (gelu) or 3 (relu)");
  const at::Tensor x = rowable(x_in);
  TORCH_CHECK(x.size(-1) % 2 == 0, "act_and_mul: last dim must be even");
  const int64_t I = x.size(-1) / 2;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = I;
  at::Tensor y = at::empty(shape, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (y.numel() == 0) return y;
  const Rows rows(x);
  dispatch_float(x.scalar_type(), "act_and_mul", [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.data_ptr<T>();
    T* yp = y.data_ptr<T>();
    const int64_t grain = std::max<int64_t>(1, 16384 / I);
    at::parallel_for(0, rows.n, grain, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const T* g = xp + rows.offset(i);
        act_row(g, g + I, yp + i * I, I, int(act), hf_rounding);
      }
    });
  });
  return y;
}

at::Tensor fused_isa_code(const at::Tensor& like) {
#if defined(MISTRALPY_FUSED_AVX512)
  return mistralpy_simd::string_tensor("avx512", like);
#elif defined(MISTRALPY_FUSED_AVX2)
  return mistralpy_simd::string_tensor("avx2", like);  // act_and_mul's gelu (erf) and relu: scalar code
#else
  return mistralpy_simd::string_tensor("scalar", like);
#endif
}

}  // namespace

#ifndef QMM_NS
#define QMM_NS mistralpy_cpu
#endif

// Named entry points for other sources (kernels.h).
namespace QMM_NS::kernels {
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps, double offset) {
  return ::rms_norm(x, w, eps, offset);
}
at::Tensor act_and_mul(const at::Tensor& x, int64_t act, bool hf_rounding) {
  return ::act_and_mul(x, act, hf_rounding);
}
}  // namespace QMM_NS::kernels

TORCH_LIBRARY_FRAGMENT(QMM_NS, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps, float offset) -> Tensor");
  m.def("act_and_mul(Tensor gate_up, int act, bool hf_rounding) -> Tensor");
  m.def("fused_isa(Tensor like) -> Tensor");
}

TORCH_LIBRARY_IMPL(QMM_NS, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("act_and_mul", &act_and_mul);
  m.impl("fused_isa", &fused_isa_code);
}
