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
//   rope(positions [T], q [T, Hq, D], k [T, Hk, D], cos [n, rd/2], sin [n, rd/2]) -> (q', k'): Neox
//       half-split rotation of the first rd dims (x1 c - x2 s, x2 c + x1 s), the rest copied.
//
// x / gate_up / q / k may be strided views (last dim contiguous); outputs are new contiguous tensors.
// The AVX-512 path covers every element (masked tails); the scalar path is the portable fallback.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "simd.h"

#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define MISTRALPY_FUSED_AVX512 1
#endif

namespace {

#if defined(__AVX512F__)
using mistralpy_simd::exp16;
#endif

using BF16 = c10::BFloat16;
using F16 = c10::Half;

// A product that must be rounded on its own (torch multiplies, then adds): g++ would otherwise
// contract a * b - c * d into an FMA and change the float32 result.
inline float keep(float v) {
#if defined(__GNUC__) && defined(__x86_64__)
  asm("" : "+x"(v));
#endif
  return v;
}

template <typename T>
inline float to_f(T v) {
  return static_cast<float>(v);
}

template <typename T>
inline float round_to(float v) {  // float -> T -> float (HF's h.to(dtype) before the weight product)
  return static_cast<float>(static_cast<T>(v));
}

// Row addressing for tensors whose last dim is contiguous: the leading dims, coalesced.
struct Rows {
  int64_t n = 1;
  int nd = 0;
  int64_t size[8];
  int64_t stride[8];
  explicit Rows(const at::Tensor& t) {
    for (int64_t d = 0; d + 1 < t.dim(); ++d) {
      const int64_t s = t.size(d);
      n *= s;
      if (s == 1) continue;
      if (nd > 0 && stride[nd - 1] == t.stride(d) * s) {
        size[nd - 1] *= s;
        stride[nd - 1] = t.stride(d);
      } else {
        size[nd] = s;
        stride[nd] = t.stride(d);
        ++nd;
      }
    }
  }
  int64_t offset(int64_t i) const {
    if (nd == 1) return i * stride[0];
    int64_t off = 0;
    for (int d = nd - 1; d >= 0; --d) {
      off += (i % size[d]) * stride[d];
      i /= size[d];
    }
    return off;
  }
};

// float32 / bf16 / fp16 only: f(T{}) with T the element type.
template <typename F>
void dispatch_float(at::ScalarType st, const char* op, F&& f) {
  switch (st) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(BF16{});
    case at::kHalf: return f(F16{});
    default: TORCH_CHECK(false, op, ": dtype must be float32, bfloat16 or float16, got ", st);
  }
}

// Last dim contiguous and at most 8 leading dims (else a contiguous copy).
at::Tensor rowable(const at::Tensor& t) {
  return (t.dim() > 0 && t.stride(-1) == 1 && t.dim() <= 9) ? t : t.contiguous();
}

#if defined(MISTRALPY_FUSED_AVX512)
inline __m512 keep(__m512 v) {
  asm("" : "+v"(v));
  return v;
}

inline __mmask16 tail_mask(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }

inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const BF16* p, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const F16* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }

// float32 -> bf16 bits, round to nearest even (c10::BFloat16's rounding; NaN -> 0x7FC0).
inline __m256i to_bf16(__m512 v) {
#if defined(__AVX512BF16__)
  return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
#else
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
#endif
}

inline void store16(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
inline void store16(BF16* p, __m512 v, __mmask16 m) { _mm256_mask_storeu_epi16(p, m, to_bf16(v)); }
inline void store16(F16* p, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

template <typename T>
inline __m512 round_to(__m512 v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else if constexpr (std::is_same_v<T, BF16>) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16(v)), 16));
  } else {
    return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
}

#endif

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
  double ssd = 0.0;
  for (int64_t j = 0; j < H; ++j) {
    const double v = to_f(x[j]);
    ssd += v * v;
  }
  const float ss = static_cast<float>(ssd);
  const float r = 1.0f / std::sqrt(ss / static_cast<float>(H) + eps);
  for (int64_t j = 0; j < H; ++j) {
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

#if !defined(MISTRALPY_FUSED_AVX512) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define MISTRALPY_FUSED_AVX2 1
using mistralpy_simd::exp8;
using mistralpy_simd::load8;

// float32 -> bf16 bits, round to nearest even (c10::BFloat16's rounding; NaN -> 0x7FC0).
inline __m128i to_bf16_8(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
  return _mm256_castsi256_si128(packed);
}
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(BF16* p, __m256 v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_bf16_8(v)); }
inline void store8(F16* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
template <typename T>
inline __m256 round8(__m256 v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else if constexpr (std::is_same_v<T, BF16>) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(to_bf16_8(v)), 16));
  } else {
    return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
}

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

// ---------------------------------------------------------------------------------------- rope

// One head: o[:half] = x1 c - x2 s, o[half:rd] = x2 c + x1 s, o[rd:] = x[rd:]; each product is
// rounded before the sum (torch's order), so float32 is bitwise equal to the torch path.
template <typename T>
inline void rope_head(const T* x, T* o, const float* c, const float* s, int64_t half, int64_t D) {
  const int64_t rd = 2 * half;
#if defined(MISTRALPY_FUSED_AVX512)
  for (int64_t j = 0; j < half; j += 16) {
    const __mmask16 m = tail_mask(half - j);
    const __m512 x1 = load16(x + j, m), x2 = load16(x + half + j, m);
    const __m512 cv = _mm512_maskz_loadu_ps(m, c + j), sv = _mm512_maskz_loadu_ps(m, s + j);
    store16(o + j, _mm512_sub_ps(keep(_mm512_mul_ps(x1, cv)), keep(_mm512_mul_ps(x2, sv))), m);
    store16(o + half + j, _mm512_add_ps(keep(_mm512_mul_ps(x2, cv)), keep(_mm512_mul_ps(x1, sv))), m);
  }
#else
  for (int64_t j = 0; j < half; ++j) {
    const float x1 = to_f(x[j]), x2 = to_f(x[half + j]);
    o[j] = static_cast<T>(keep(x1 * c[j]) - keep(x2 * s[j]));
    o[half + j] = static_cast<T>(keep(x2 * c[j]) + keep(x1 * s[j]));
  }
#endif
  for (int64_t j = rd; j < D; ++j) o[j] = x[j];
}

template <typename T, typename P>
void rope_one(const P* pos, const at::Tensor& x, at::Tensor& o, const float* cos, const float* sin, int64_t half) {
  const int64_t Tn = x.size(0), H = x.size(1), D = x.size(2);
  const int64_t s0 = x.stride(0), s1 = x.stride(1);
  const T* xp = x.data_ptr<T>();
  T* op = o.data_ptr<T>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));
  at::parallel_for(0, Tn * H, grain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t t = i / H, h = i % H;
      const int64_t p = static_cast<int64_t>(pos[t]);
      rope_head(xp + t * s0 + h * s1, op + i * D, cos + p * half, sin + p * half, half, D);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> rope(const at::Tensor& positions, const at::Tensor& q_in, const at::Tensor& k_in,
                                        const at::Tensor& cos_in, const at::Tensor& sin_in) {
  const at::Tensor q = rowable(q_in), k = rowable(k_in);
  const at::Tensor cos = cos_in.contiguous(), sin = sin_in.contiguous();
  const at::Tensor pos = positions.contiguous();
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3, "rope: q and k must be [T, H, D]");
  TORCH_CHECK(pos.dim() == 1 && pos.size(0) == q.size(0) && k.size(0) == q.size(0), "rope: positions must be [T]");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.dim() == 2 &&
                  sin.sizes() == cos.sizes(), "rope: cos/sin must be float32 [n, rotary_dim / 2]");
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "rope: q and k must have one dtype");
  const int64_t half = cos.size(1), n = cos.size(0);
  TORCH_CHECK(2 * half <= q.size(2) && 2 * half <= k.size(2), "rope: rotary_dim exceeds head_dim");
  TORCH_CHECK(pos.scalar_type() == at::kLong || pos.scalar_type() == at::kInt, "rope: positions must be int64/int32");
  at::Tensor qo = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor ko = at::empty(k.sizes(), k.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_INDEX_TYPES(pos.scalar_type(), "rope_pos", [&] {
    const index_t* pp = pos.data_ptr<index_t>();
    for (int64_t t = 0; t < pos.size(0); ++t)  // an out-of-range position would read past the tables
      TORCH_CHECK(pp[t] >= 0 && pp[t] < n, "rope: position ", pp[t], " outside the cos/sin cache (", n, ")");
    dispatch_float(q.scalar_type(), "rope", [&](auto tag) {
      using T = decltype(tag);
      rope_one<T>(pp, q, qo, cos.data_ptr<float>(), sin.data_ptr<float>(), half);
      rope_one<T>(pp, k, ko, cos.data_ptr<float>(), sin.data_ptr<float>(), half);
    });
  });
  return {qo, ko};
}

at::Tensor fused_isa_code(const at::Tensor& like) {
#if defined(MISTRALPY_FUSED_AVX512)
  return mistralpy_simd::string_tensor("avx512", like);
#elif defined(MISTRALPY_FUSED_AVX2)
  return mistralpy_simd::string_tensor("avx2", like);  // act_and_mul only; the rest is the scalar code
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
std::tuple<at::Tensor, at::Tensor> rope(const at::Tensor& positions, const at::Tensor& q, const at::Tensor& k,
                                        const at::Tensor& cos, const at::Tensor& sin) {
  return ::rope(positions, q, k, cos, sin);
}
}  // namespace QMM_NS::kernels

TORCH_LIBRARY_FRAGMENT(QMM_NS, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps, float offset) -> Tensor");
  m.def("act_and_mul(Tensor gate_up, int act, bool hf_rounding) -> Tensor");
  m.def("rope(Tensor positions, Tensor q, Tensor k, Tensor cos, Tensor sin) -> (Tensor, Tensor)");
  m.def("fused_isa(Tensor like) -> Tensor");
}

TORCH_LIBRARY_IMPL(QMM_NS, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("act_and_mul", &act_and_mul);
  m.impl("rope", &rope);
  m.impl("fused_isa", &fused_isa_code);
}
