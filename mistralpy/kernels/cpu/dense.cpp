// Dense bf16 matrix products for CPU decode (built by mistralpy/kernels/cpu/__init__.py).
//
// oneDNN's bf16 linear reads a small decoder's weights at ~13 GB/s when one to a few rows are
// multiplied (short products, fixed cost per call); this kernel streams them at close to the memory
// bandwidth with AVX512-BF16 (vdpbf16ps) and stays usable up to prefill sizes.
//
// Weight layout ("pair tiles", made by layers/dense_cpu.py pack()): W [N, K] -> [NT, K/2, 16, 2] with
// NT = ceil(N / 16) (missing rows are zero): for every pair of input columns (2p, 2p+1), the 16 rows
// of a tile side by side, each row's two values adjacent. One 64-byte load then holds exactly what
// vdpbf16ps needs for 16 outputs, and x's pair (x[2p], x[2p+1]) is one broadcast 32-bit word.
//
// Summation order of an output: one float32 accumulator over the pairs in order. It does not
// depend on the number of rows in the call or on the thread split, so a request gets the same
// numbers alone and inside any batch. The micro-kernel takes 8 rows x 3 tiles (24 accumulators):
// one 64-byte weight load feeds 8 dot products, one broadcast of x feeds 3.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "simd.h"

#include "kernels.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t TILE = 16;
constexpr int MR = 8;  // rows of x per micro-kernel call
constexpr int NT = 3;  // tiles per micro-kernel call: MR * NT = 24 accumulators, 11 loads per 24 dot products

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

#if defined(__AVX512BF16__) && defined(__AVX512VL__)
#define MISTRALPY_DENSE_BF16 1

// R rows of x against T consecutive tiles; one float32 accumulator per (tile, row) summed over the
// pairs in order, so an output's sum does not depend on R, T or the thread split.
template <int R, int T>
inline void micro(const uint16_t* w, int64_t KP, const uint32_t* x, const float* bias, int64_t n0, int64_t N,
                  c10::BFloat16* y, int64_t m0, const uint16_t* next) {
  __m512 acc[T][R];
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = _mm512_setzero_ps();
  const uint32_t* xr = x + m0 * KP;
  for (int64_t p = 0; p < KP; ++p) {
    __m512bh xb[R];
    for (int r = 0; r < R; ++r) xb[r] = (__m512bh)_mm512_set1_epi32(xr[r * KP + p]);
    if (next != nullptr) {
      for (int t = 0; t < T; ++t) _mm_prefetch(reinterpret_cast<const char*>(next + (t * KP + p) * 32), _MM_HINT_T1);
    }
    for (int t = 0; t < T; ++t) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + (t * KP + p) * 32);
      for (int r = 0; r < R; ++r) acc[t][r] = _mm512_dpbf16_ps(acc[t][r], wv, xb[r]);
    }
  }
  for (int t = 0; t < T; ++t) {
    const int64_t n = n0 + t * TILE;
    const int64_t cols = std::min<int64_t>(TILE, N - n);
    const __mmask16 mask = static_cast<__mmask16>((1u << cols) - 1);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + n) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r) {
      const __m256i v = (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc[t][r], b));
      _mm256_mask_storeu_epi16(reinterpret_cast<uint16_t*>(y) + (m0 + r) * N + n, mask, v);
    }
  }
}

// With several row chunks, the first one also prefetches the next group's weights into L2, so that
// they stream in while this group is computed (compute-bound from ~8 rows on).
template <int T>
void rows_for_tiles(const uint16_t* w, int64_t KP, const uint32_t* x, int64_t M, const float* bias, int64_t n0,
                    int64_t N, c10::BFloat16* y, const uint16_t* next) {
  if (M <= MR) next = nullptr;
  int64_t m0 = 0;
  for (; m0 + MR <= M; m0 += MR, next = nullptr) micro<MR, T>(w, KP, x, bias, n0, N, y, m0, next);
  switch (M - m0) {
    case 1: micro<1, T>(w, KP, x, bias, n0, N, y, m0, next); break;
    case 2: micro<2, T>(w, KP, x, bias, n0, N, y, m0, next); break;
    case 3: micro<3, T>(w, KP, x, bias, n0, N, y, m0, next); break;
    case 4: micro<4, T>(w, KP, x, bias, n0, N, y, m0, next); break;
    case 5: micro<5, T>(w, KP, x, bias, n0, N, y, m0, next); break;
    case 6: micro<6, T>(w, KP, x, bias, n0, N, y, m0, next); break;
    case 7: micro<7, T>(w, KP, x, bias, n0, N, y, m0, next); break;
    default: break;
  }
}

// Tiles [t0, t1) for all rows of x: groups of NT tiles (2 NT for one or two rows, where the product
// is a stream of weights and more independent accumulators hide the dot-product latency), then
// single tiles.
void tiles(const uint16_t* W, int64_t KP, const uint32_t* x, int64_t M, const float* bias, int64_t t0, int64_t t1,
           int64_t N, c10::BFloat16* y) {
  int64_t t = t0;
  if (M <= 2) {
    for (; t + 2 * NT <= t1; t += 2 * NT)
      rows_for_tiles<2 * NT>(W + t * KP * 32, KP, x, M, bias, t * TILE, N, y, nullptr);
  }
  for (; t + NT <= t1; t += NT) {
    const uint16_t* next = t + 2 * NT <= t1 ? W + (t + NT) * KP * 32 : nullptr;
    rows_for_tiles<NT>(W + t * KP * 32, KP, x, M, bias, t * TILE, N, y, next);
  }
  for (; t < t1; ++t) rows_for_tiles<1>(W + t * KP * 32, KP, x, M, bias, t * TILE, N, y, nullptr);
}

#else

// Portable path (same order of summation, plain float math): correct, not fast.
void tiles(const uint16_t* W, int64_t KP, const uint32_t* x, int64_t M, const float* bias, int64_t t0, int64_t t1,
           int64_t N, c10::BFloat16* y) {
  for (int64_t t = t0; t < t1; ++t) {
    const uint16_t* w = W + t * KP * 32;
    const int64_t n0 = t * TILE, cols = std::min<int64_t>(TILE, N - n0);
    for (int64_t m = 0; m < M; ++m) {
      const uint16_t* xr = reinterpret_cast<const uint16_t*>(x + m * KP);
      for (int64_t c = 0; c < cols; ++c) {
        float acc = 0.f;
        for (int64_t p = 0; p < KP; ++p) {
          const uint16_t* wp = w + p * 32 + c * 2;
          acc += bf16_to_float(wp[0]) * bf16_to_float(xr[2 * p]) + bf16_to_float(wp[1]) * bf16_to_float(xr[2 * p + 1]);
        }
        y[m * N + n0 + c] = c10::BFloat16(acc + (bias ? bias[n0 + c] : 0.f));
      }
    }
  }
}

#endif

// x [M, K] bf16 contiguous, w the pair-tiled weight ([NT, K/2, 16, 2], 2-byte elements), n outputs,
// bias [n] (any float dtype) or none -> y [M, n] bf16, rounded once after the bias is added.
at::Tensor dense_mm(const at::Tensor& x, const at::Tensor& w, int64_t n, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kBFloat16,
              "dense_mm: x must be a contiguous 2-D bfloat16 tensor");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K % 2 == 0, "dense_mm: K must be even");
  const int64_t KP = K / 2, NTILES = (n + TILE - 1) / TILE;
  TORCH_CHECK(w.is_contiguous() && w.numel() == NTILES * KP * TILE * 2 && w.element_size() == 2,
              "dense_mm: w does not hold a pair-tiled [", n, ", ", K, "] weight");
  const float* b = nullptr;
  at::Tensor bias_f32;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == n, "dense_mm: bias must have n elements");
    bias_f32 = bias->to(at::kFloat).contiguous();
    b = bias_f32.data_ptr<float>();
  }
  at::Tensor y = at::empty({M, n}, x.options());
  if (M == 0 || n == 0) return y;
  const auto* W = reinterpret_cast<const uint16_t*>(w.data_ptr());
  const auto* X = reinterpret_cast<const uint32_t*>(x.data_ptr());
  auto* Y = y.data_ptr<c10::BFloat16>();
  // Tasks of whole groups of 2 NT tiles, each task streaming at least ~256 KB of weights.
  const int64_t groups = (NTILES + 2 * NT - 1) / (2 * NT);
  const int64_t grain = std::max<int64_t>(1, 2048 / std::max<int64_t>(1, KP));
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    tiles(W, KP, X, M, b, g0 * 2 * NT, std::min(g1 * 2 * NT, NTILES), n, Y);
  });
  return y;
}

std::string dense_isa() {
#if defined(MISTRALPY_DENSE_BF16)
  return "avx512bf16";
#else
  return "scalar";
#endif
}

at::Tensor dense_isa_code(const at::Tensor& like) { return mistralpy_simd::string_tensor(dense_isa(), like); }

}  // namespace

#ifndef QMM_NS
#define QMM_NS mistralpy_cpu
#endif

// Named entry points for other sources (kernels.h).
namespace QMM_NS::kernels {
at::Tensor dense_mm(const at::Tensor& x, const at::Tensor& w, int64_t n, const std::optional<at::Tensor>& bias) {
  return ::dense_mm(x, w, n, bias);
}
}  // namespace QMM_NS::kernels

TORCH_LIBRARY_FRAGMENT(QMM_NS, m) {
  m.def("dense_mm(Tensor x, Tensor w, int n, Tensor? bias) -> Tensor");
  m.def("dense_isa(Tensor like) -> Tensor");
}

TORCH_LIBRARY_IMPL(QMM_NS, CPU, m) {
  m.impl("dense_mm", &dense_mm);
  m.impl("dense_isa", &dense_isa_code);
}
