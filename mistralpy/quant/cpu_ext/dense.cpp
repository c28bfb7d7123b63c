// Dense bf16 matrix products for CPU decode (built by mistralpy/quant/cpu_ext/__init__.py).
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
// Summation order of an output: even pairs and odd pairs in two float32 accumulators, added at
// the end. It does not depend on the number of rows in the call or on the thread split, so a
// request gets the same numbers alone and inside any batch.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t TILE = 16;
constexpr int MAX_MR = 8;  // rows of x per pass: 2 * MR accumulators + 2 weight registers

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

#if defined(__AVX512BF16__) && defined(__AVX512VL__)
#define MISTRALPY_DENSE_BF16 1

// One tile (16 outputs) for MR rows of x. w: the tile's [KP, 16, 2]; x: MR rows of KP pairs.
template <int MR>
inline void tile_rows(const uint16_t* w, int64_t KP, const uint32_t* x, int64_t x_stride, __m512* out) {
  __m512 even[MR], odd[MR];
  for (int m = 0; m < MR; ++m) {
    even[m] = _mm512_setzero_ps();
    odd[m] = _mm512_setzero_ps();
  }
  int64_t p = 0;
  for (; p + 1 < KP; p += 2) {
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + p * 32);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(w + p * 32 + 32);
    for (int m = 0; m < MR; ++m) {
      even[m] = _mm512_dpbf16_ps(even[m], w0, (__m512bh)_mm512_set1_epi32(x[m * x_stride + p]));
      odd[m] = _mm512_dpbf16_ps(odd[m], w1, (__m512bh)_mm512_set1_epi32(x[m * x_stride + p + 1]));
    }
  }
  if (p < KP) {
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + p * 32);
    for (int m = 0; m < MR; ++m)
      even[m] = _mm512_dpbf16_ps(even[m], w0, (__m512bh)_mm512_set1_epi32(x[m * x_stride + p]));
  }
  for (int m = 0; m < MR; ++m) out[m] = _mm512_add_ps(even[m], odd[m]);
}

template <int MR>
inline void tile_store(const uint16_t* w, int64_t KP, const uint32_t* x, int64_t KPx, const float* bias,
                       int64_t n0, int64_t N, c10::BFloat16* y, int64_t m0) {
  __m512 acc[MR];
  tile_rows<MR>(w, KP, x + m0 * KPx, KPx, acc);
  const int64_t cols = std::min<int64_t>(TILE, N - n0);
  const __mmask16 mask = static_cast<__mmask16>((1u << cols) - 1);
  __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + n0) : _mm512_setzero_ps();
  for (int m = 0; m < MR; ++m) {
    const __m256i v = (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc[m], b));
    _mm256_mask_storeu_epi16(reinterpret_cast<uint16_t*>(y) + (m0 + m) * N + n0, mask, v);
  }
}

void tile_all_rows(const uint16_t* w, int64_t KP, const uint32_t* x, int64_t M, const float* bias, int64_t n0,
                   int64_t N, c10::BFloat16* y) {
  int64_t m0 = 0;
  for (; m0 + MAX_MR <= M; m0 += MAX_MR) tile_store<MAX_MR>(w, KP, x, KP, bias, n0, N, y, m0);
  switch (M - m0) {
    case 1: tile_store<1>(w, KP, x, KP, bias, n0, N, y, m0); break;
    case 2: tile_store<2>(w, KP, x, KP, bias, n0, N, y, m0); break;
    case 3: tile_store<3>(w, KP, x, KP, bias, n0, N, y, m0); break;
    case 4: tile_store<4>(w, KP, x, KP, bias, n0, N, y, m0); break;
    case 5: tile_store<5>(w, KP, x, KP, bias, n0, N, y, m0); break;
    case 6: tile_store<6>(w, KP, x, KP, bias, n0, N, y, m0); break;
    case 7: tile_store<7>(w, KP, x, KP, bias, n0, N, y, m0); break;
    default: break;
  }
}

#else

// Portable path (same order of summation, plain float math): correct, not fast.
void tile_all_rows(const uint16_t* w, int64_t KP, const uint32_t* x, int64_t M, const float* bias, int64_t n0,
                   int64_t N, c10::BFloat16* y) {
  const int64_t cols = std::min<int64_t>(TILE, N - n0);
  for (int64_t m = 0; m < M; ++m) {
    const uint16_t* xr = reinterpret_cast<const uint16_t*>(x + m * KP);
    for (int64_t c = 0; c < cols; ++c) {
      float even = 0.f, odd = 0.f;
      for (int64_t p = 0; p < KP; ++p) {
        const uint16_t* wp = w + p * 32 + c * 2;
        float s = bf16_to_float(wp[0]) * bf16_to_float(xr[2 * p]) + bf16_to_float(wp[1]) * bf16_to_float(xr[2 * p + 1]);
        (p % 2 ? odd : even) += s;
      }
      y[m * N + n0 + c] = c10::BFloat16(even + odd + (bias ? bias[n0 + c] : 0.f));
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
  const int64_t KP = K / 2, NT = (n + TILE - 1) / TILE;
  TORCH_CHECK(w.is_contiguous() && w.numel() == NT * KP * TILE * 2 && w.element_size() == 2,
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
  // Grain: enough tiles per task that a thread streams a few hundred KB of weights.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, KP * std::min<int64_t>(M, MAX_MR)));
  at::parallel_for(0, NT, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) tile_all_rows(W + t * KP * 32, KP, X, M, b, t * TILE, n, Y);
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

at::Tensor dense_isa_code(const at::Tensor& like) {
  const std::string s = dense_isa();
  at::Tensor t = at::empty({static_cast<int64_t>(s.size())}, like.options().dtype(at::kByte));
  std::memcpy(t.data_ptr<uint8_t>(), s.data(), s.size());
  return t;
}

}  // namespace

#ifndef QMM_NS
#define QMM_NS mistralpy_cpu
#endif

TORCH_LIBRARY_FRAGMENT(QMM_NS, m) {
  m.def("dense_mm(Tensor x, Tensor w, int n, Tensor? bias) -> Tensor");
  m.def("dense_isa(Tensor like) -> Tensor");
}

TORCH_LIBRARY_IMPL(QMM_NS, CPU, m) {
  m.impl("dense_mm", &dense_mm);
  m.impl("dense_isa", &dense_isa_code);
}
