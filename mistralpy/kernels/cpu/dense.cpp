// Dense bf16 matrix products for CPU decode (built by mistralpy/kernels/cpu/__init__.py).
//
// oneDNN's bf16 linear reads a small decoder's weights at ~13 GB/s when one to a few rows are
// multiplied (short products, fixed cost per call); this kernel streams them at close to the memory
// bandwidth with AVX512-BF16 (vdpbf16ps), or on AVX2 with bf16 widened to float32 in registers
// (FMA), and stays usable up to prefill sizes.
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

#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define MISTRALPY_DENSE_AVX2 1

// AVX2 has no bf16 dot product: a pair's 64 bytes are four 128-bit loads of 4 rows x 2 columns each,
// widened to exact float32 lanes [r0 c0, r0 c1, r1 c0, ...] and multiplied by x's pair broadcast as
// [x0 x1 x0 x1 ...] (one 64-bit broadcast of the float32 copy xf [M, K] made once per call). Each
// lane sums one column parity over the pairs in order; the output is the even sum plus the odd sum
// (hadd). That order does not depend on the rows in the call, the micro-kernel shape or the thread
// split. 20% faster than splitting each load into even and odd columns (fewer loads per FMA).
// One row's 16 outputs of a tile from its four accumulators (+ bias), rounded to bf16; n0 + 16 may
// pass N (a partial last tile).
inline void store_tile(__m256 a0, __m256 a1, __m256 a2, __m256 a3, const float* bias, int64_t n0, int64_t N,
                       uint16_t* y) {
  const int64_t cols = std::min<int64_t>(TILE, N - n0);
  alignas(32) float b[TILE] = {};
  if (bias) std::memcpy(b, bias + n0, cols * sizeof(float));
  // hadd -> rows [0 1 4 5 | 2 3 6 7] of a half; the 64-bit permute puts them in order
  __m256 lo = _mm256_hadd_ps(a0, a1), hi = _mm256_hadd_ps(a2, a3);
  lo = _mm256_add_ps(_mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(lo), 0xD8)), _mm256_load_ps(b));
  hi = _mm256_add_ps(_mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(hi), 0xD8)), _mm256_load_ps(b + 8));
  alignas(16) uint16_t out[TILE];
  _mm_store_si128(reinterpret_cast<__m128i*>(out), mistralpy_simd::to_bf16_8(lo));
  _mm_store_si128(reinterpret_cast<__m128i*>(out + 8), mistralpy_simd::to_bf16_8(hi));
  std::memcpy(y + n0, out, cols * sizeof(uint16_t));
}

template <int R, int T>
inline void micro8(const uint16_t* w, int64_t KP, const float* xf, const float* bias, int64_t n0, int64_t N,
                   c10::BFloat16* y, int64_t m0) {
  __m256 acc[T][4][R];  // [tile][rows 4q..4q+3][row of x]
#pragma GCC unroll 8
  for (int t = 0; t < T; ++t)
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q)
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[t][q][r] = _mm256_setzero_ps();
  const float* xr = xf + m0 * 2 * KP;
  for (int64_t p = 0; p < KP; ++p) {
    __m256 xb[R];
    for (int r = 0; r < R; ++r)
      xb[r] = _mm256_castpd_ps(_mm256_broadcast_sd(reinterpret_cast<const double*>(xr + r * 2 * KP + 2 * p)));
    for (int t = 0; t < T; ++t) {
      const uint16_t* wp = w + (t * KP + p) * 32;
      for (int q = 0; q < 4; ++q) {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wp + 8 * q));
        const __m256 wv = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
        for (int r = 0; r < R; ++r) acc[t][q][r] = _mm256_fmadd_ps(wv, xb[r], acc[t][q][r]);
      }
    }
  }
  // Every loop over acc fully unrolled: an index left to run time would keep acc in memory (g++
  // then stores all 12 accumulators on every pair, half the speed).
#pragma GCC unroll 8
  for (int t = 0; t < T; ++t) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) store_tile(acc[t][0][r], acc[t][1][r], acc[t][2][r], acc[t][3][r], bias, n0 + t * TILE,
                                           N, reinterpret_cast<uint16_t*>(y) + (m0 + r) * N);
  }
}

// Rows in chunks of 3 against one tile (12 accumulators of the 16 registers), the rest in 2s and 1s;
// one row against 3 tiles, where the product is a stream of weights.
template <int T>
void rows_for_tiles8(const uint16_t* w, int64_t KP, const float* xf, int64_t M, const float* bias, int64_t n0,
                     int64_t N, c10::BFloat16* y) {
  int64_t m0 = 0;
  for (; M - m0 >= 3 && M - m0 != 4; m0 += 3) micro8<3, T>(w, KP, xf, bias, n0, N, y, m0);
  for (; M - m0 >= 2; m0 += 2) micro8<2, T>(w, KP, xf, bias, n0, N, y, m0);  // 4 = 2 + 2, not 3 + 1
  if (M - m0 == 1) micro8<1, T>(w, KP, xf, bias, n0, N, y, m0);
}

void tiles8(const uint16_t* W, int64_t KP, const float* xf, int64_t M, const float* bias, int64_t t0, int64_t t1,
            int64_t N, c10::BFloat16* y) {
  int64_t t = t0;
  if (M == 1) {
    for (; t + 3 <= t1; t += 3) micro8<1, 3>(W + t * KP * 32, KP, xf, bias, t * TILE, N, y, 0);
  }
  for (; t < t1; ++t) rows_for_tiles8<1>(W + t * KP * 32, KP, xf, M, bias, t * TILE, N, y);
}

#endif

#if !defined(MISTRALPY_DENSE_BF16) && !defined(MISTRALPY_DENSE_AVX2)

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
  // Tasks of whole groups of 2 NT tiles, each task streaming at least ~256 KB of weights (AVX512).
  const int64_t groups = (NTILES + 2 * NT - 1) / (2 * NT);
  const int64_t grain = std::max<int64_t>(1, 2048 / std::max<int64_t>(1, KP));
#if defined(MISTRALPY_DENSE_AVX2)
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const float* XF = xf.data_ptr<float>();
  (void)X;
  // Single groups as tasks (~100 KB of weights at K = 576): with the grain above, a 576 x 576
  // projection ran on one thread at half the bandwidth.
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    tiles8(W, KP, XF, M, b, g0 * 2 * NT, std::min(g1 * 2 * NT, NTILES), n, Y);
  });
#else
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    tiles(W, KP, X, M, b, g0 * 2 * NT, std::min(g1 * 2 * NT, NTILES), n, Y);
  });
#endif
  return y;
}

std::string dense_isa() {
#if defined(MISTRALPY_DENSE_BF16)
  return "avx512bf16";
#elif defined(MISTRALPY_DENSE_AVX2)
  return "avx2";
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
