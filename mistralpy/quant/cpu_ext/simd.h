// Small helpers shared by the extension's sources.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>
#include <string>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace mistralpy_simd {

// A string as a uint8 tensor: how the ops report which SIMD path a build took (Python decodes it).
inline at::Tensor string_tensor(const std::string& s, const at::Tensor& like) {
  at::Tensor t = at::empty({static_cast<int64_t>(s.size())}, like.options().dtype(at::kByte));
  std::memcpy(t.data_ptr<uint8_t>(), s.data(), s.size());
  return t;
}

#if defined(__AVX512F__)
// e^x, Cephes' expf polynomial on x - n ln2 (|error| ~ 1 ulp) scaled by 2^n with scalef, which
// saturates to inf / 0 like expf. NaN propagates through the clamps (min/max return their 2nd operand).
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-104.0f), _mm512_min_ps(_mm512_set1_ps(89.0f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}
#endif

}  // namespace mistralpy_simd
