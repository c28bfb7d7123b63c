// Rotary embedding of q and k for CPU decode and prefill (built by mistralpy/kernels/cpu/__init__.py;
// wrapped by mistralpy/layers/cpu_fused.py, reference: layers/rotary.py):
//
//   rope(positions [T], q [T, Hq, D], k [T, Hk, D], cos [n, rd/2], sin [n, rd/2]) -> (q', k'): Neox
//       half-split rotation of the first rd dims (x1 c - x2 s, x2 c + x1 s), the rest copied.
//
// q / k may be strided views (last dim contiguous); outputs are new contiguous tensors.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "elementwise.h"
#include "kernels.h"

#include <algorithm>
#include <cstdint>
#include <tuple>

namespace {

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
  int64_t j = 0;
#if defined(MISTRALPY_FUSED_AVX2)
  for (; j + 8 <= half; j += 8) {
    const __m256 x1 = load8(x + j), x2 = load8(x + half + j);
    const __m256 cv = _mm256_loadu_ps(c + j), sv = _mm256_loadu_ps(s + j);
    store8(o + j, _mm256_sub_ps(keep(_mm256_mul_ps(x1, cv)), keep(_mm256_mul_ps(x2, sv))));
    store8(o + half + j, _mm256_add_ps(keep(_mm256_mul_ps(x2, cv)), keep(_mm256_mul_ps(x1, sv))));
  }
#endif
  for (; j < half; ++j) {
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

}  // namespace

#ifndef QMM_NS
#define QMM_NS mistralpy_cpu
#endif

namespace QMM_NS::kernels {
std::tuple<at::Tensor, at::Tensor> rope(const at::Tensor& positions, const at::Tensor& q, const at::Tensor& k,
                                        const at::Tensor& cos, const at::Tensor& sin) {
  return ::rope(positions, q, k, cos, sin);
}
}  // namespace QMM_NS::kernels

TORCH_LIBRARY_FRAGMENT(QMM_NS, m) {
  m.def("rope(Tensor positions, Tensor q, Tensor k, Tensor cos, Tensor sin) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(QMM_NS, CPU, m) { m.impl("rope", &rope); }
