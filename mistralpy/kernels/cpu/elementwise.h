// Helpers of the elementwise ops (fused.cpp: rms_norm, act_and_mul; rope.cpp): float32 math on
// float32 / bf16 / fp16 rows, 16 lanes at a time with AVX-512 (masked tails) or 8 with AVX2 (scalar
// tails), rounded like torch. In an anonymous namespace: each source (and each ISA build) gets its
// own copy, so two builds loaded in one process never bind to each other's code.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "simd.h"

#include <cstdint>
#include <type_traits>

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

#if !defined(MISTRALPY_FUSED_AVX512) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define MISTRALPY_FUSED_AVX2 1
using mistralpy_simd::load8;
using mistralpy_simd::to_bf16_8;

inline __m256 keep(__m256 v) {
  asm("" : "+x"(v));
  return v;
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
#endif

}  // namespace
