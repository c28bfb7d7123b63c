// Quantized matrix products for CPU decode, llama.cpp style (built by mistralpy/quant/cpu_ext/__init__.py).
//
// Weights: w = u * d + m per block of 32 values, u unsigned (4 or 8 bits), (d, m) per block in f16
// or f32; every GGUF type with 32-value sub-blocks maps onto this exactly (gguf_kernels_cpu.py).
// They are stored row-tiled (see "row-tiled layout" below), fmt = 4 (4-bit u), 6 (8-bit) or 8 (5-bit),
// + 1 for f32 (d, m).
// Activations: each row of x is quantized once per call to int8 blocks of 32 (q8_1: dx = amax / 127 in f16,
// q = round(x * 127 / amax), sx = dx * sum(q)), so that
//   y[n] = sum_b d_b * dx_b * sum_j u_j q_j + m_b * sx_b
// with the inner sum an exact integer dot (u8 x s8 vpdpbusd with AVX512-VNNI; a portable scalar
// loop elsewhere, correct but slow: the Python side only uses the extension when isa() says so).
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
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t QK = 32;

template <typename S>
inline float load_scale(const uint8_t* p) {
  S v;
  std::memcpy(&v, p, sizeof(S));
  if constexpr (std::is_same_v<S, float>) {
    return v;
  } else {
#if defined(__F16C__)
    return _cvtsh_ss(v);
#else
    return c10::detail::fp16_ieee_to_fp32_value(v);
#endif
  }
}

// ------------------------------------------------------------------------------ row-tiled layout
// fmt | 4: 16 output rows interleaved per "tile-block" (16 rows x 32 values), llama.cpp-repack
// style, so that one 512-bit vpdpbusd computes 4 values of each of the 16 rows at once and no
// horizontal sums are needed. Per tile-block (tiles of 16 rows, blocks along K inside a tile):
//   d[16], m[16] (f16 or f32), then the values: 8-bit: 8 quads j of 64 bytes, byte 4 r + i =
//   u[r][4 j + i]; 4-bit: 4 vectors v of 64 bytes, byte 4 r + i = u[r][4 v + i] | u[r][4 v + 16 + i] << 4;
//   5-bit: the 4-bit layout of the low nibbles, then 8 little-endian uint64 masks (one per quad j,
//   bit 4 r + i = bit 4 of u[r][4 j + i]).
template <int BITS, typename S>
struct Tiled {
  static constexpr int64_t R = 16;
  static constexpr int64_t SB = sizeof(S) * R;          // bytes of the 16 d's (and of the 16 m's)
  static constexpr int64_t QB = R * QK * BITS / 8;       // bytes of values (5 bits: nibbles, then fifth bits)
  static constexpr int64_t BYTES = 2 * SB + QB;
};

template <typename S>
inline float scale_at(const uint8_t* p, int r) {
  return load_scale<S>(p + r * sizeof(S));
}

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define MISTRALPY_TILED_VNNI 1
template <typename S>
inline __m512 load16(const uint8_t* p) {
  if constexpr (std::is_same_v<S, float>) {
    return _mm512_loadu_ps(p);
  } else {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
}

inline __m512i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// One tile (16 rows) against MT activation rows: out[i][r] for r < 16.
template <int BITS, typename S, int MT>
inline void tile_dot(const uint8_t* t, const int8_t* xq, const float* xd, const float* xs, int64_t nb,
                     float (*out)[16]) {
  using F = Tiled<BITS, S>;
  __m512 accf[MT], accm[MT];
#pragma GCC unroll 8
  for (int i = 0; i < MT; ++i) accf[i] = accm[i] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi8(0x0F);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* tb = t + b * F::BYTES;
    const uint8_t* qv = tb + 2 * F::SB;
    __m512i isum[MT];
#pragma GCC unroll 8
    for (int i = 0; i < MT; ++i) isum[i] = _mm512_setzero_si512();
    if constexpr (BITS == 4 || BITS == 5) {
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v) {
        const __m512i raw = _mm512_loadu_si512(qv + 64 * v);
        __m512i lo = _mm512_and_si512(raw, low);
        __m512i hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low);
        if constexpr (BITS == 5) {  // fifth bits: one 64-bit mask per quad, + 16 where set
          uint64_t mlo, mhi;
          std::memcpy(&mlo, qv + 256 + 8 * v, 8);
          std::memcpy(&mhi, qv + 256 + 8 * (v + 4), 8);
          const __m512i sixteen = _mm512_set1_epi8(16);
          lo = _mm512_mask_add_epi8(lo, static_cast<__mmask64>(mlo), lo, sixteen);
          hi = _mm512_mask_add_epi8(hi, static_cast<__mmask64>(mhi), hi, sixteen);
        }
#pragma GCC unroll 8
        for (int i = 0; i < MT; ++i) {
          const int8_t* xb = xq + (i * nb + b) * QK;
          isum[i] = _mm512_dpbusd_epi32(isum[i], lo, bcast4(xb + 4 * v));
          isum[i] = _mm512_dpbusd_epi32(isum[i], hi, bcast4(xb + 16 + 4 * v));
        }
      }
    } else {
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {
        const __m512i u = _mm512_loadu_si512(qv + 64 * j);
#pragma GCC unroll 8
        for (int i = 0; i < MT; ++i) isum[i] = _mm512_dpbusd_epi32(isum[i], u, bcast4(xq + (i * nb + b) * QK + 4 * j));
      }
    }
    const __m512 d = load16<S>(tb), m = load16<S>(tb + F::SB);
#pragma GCC unroll 8
    for (int i = 0; i < MT; ++i) {
      const int64_t xi = i * nb + b;
      accf[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[i]), _mm512_mul_ps(d, _mm512_set1_ps(xd[xi])), accf[i]);
      accm[i] = _mm512_fmadd_ps(m, _mm512_set1_ps(xs[xi]), accm[i]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MT; ++i) _mm512_storeu_ps(out[i], _mm512_add_ps(accf[i], accm[i]));
}
#else
template <int BITS, typename S, int MT>
inline void tile_dot(const uint8_t* t, const int8_t* xq, const float* xd, const float* xs, int64_t nb,
                     float (*out)[16]) {
  using F = Tiled<BITS, S>;
  for (int i = 0; i < MT; ++i)
    for (int r = 0; r < 16; ++r) out[i][r] = 0.f;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* tb = t + b * F::BYTES;
    const uint8_t* qv = tb + 2 * F::SB;
    for (int r = 0; r < 16; ++r) {
      uint8_t u[QK];
      if constexpr (BITS == 4 || BITS == 5) {
        for (int v = 0; v < 4; ++v)
          for (int k = 0; k < 4; ++k) {
            const uint8_t byte = qv[64 * v + 4 * r + k];
            u[4 * v + k] = byte & 0x0F;
            u[16 + 4 * v + k] = byte >> 4;
          }
        if constexpr (BITS == 5) {
          for (int j = 0; j < 8; ++j)
            for (int k = 0; k < 4; ++k) {
              const int bit = 4 * r + k;
              u[4 * j + k] |= ((qv[256 + 8 * j + bit / 8] >> (bit % 8)) & 1) << 4;
            }
        }
      } else {
        for (int j = 0; j < 8; ++j)
          for (int k = 0; k < 4; ++k) u[4 * j + k] = qv[64 * j + 4 * r + k];
      }
      const float d = scale_at<S>(tb, r), m = scale_at<S>(tb + F::SB, r);
      for (int i = 0; i < MT; ++i) {
        const int64_t xi = i * nb + b;
        const int8_t* xb = xq + xi * QK;
        int32_t s = 0;
        for (int k = 0; k < QK; ++k) s += static_cast<int32_t>(u[k]) * xb[k];
        out[i][r] += static_cast<float>(s) * (d * xd[xi]) + m * xs[xi];
      }
    }
  }
}
#endif

template <int BITS, typename S, typename OT>
void tiled_rows(const uint8_t* W, int64_t t0, int64_t t1, int64_t nb, const int8_t* xq, const float* xd,
                const float* xs, int64_t M, OT* y, int64_t N) {
  using F = Tiled<BITS, S>;
  float out[4][16];
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* tw = W + t * nb * F::BYTES;
    const int64_t rows = std::min<int64_t>(16, N - t * 16);
    for (int64_t m0 = 0; m0 < M;) {
      const int64_t left = M - m0;
      const int mt = left >= 4 ? 4 : (left >= 2 ? 2 : 1);
      const int8_t* q = xq + m0 * nb * QK;
      if (mt == 4) tile_dot<BITS, S, 4>(tw, q, xd + m0 * nb, xs + m0 * nb, nb, out);
      else if (mt == 2) tile_dot<BITS, S, 2>(tw, q, xd + m0 * nb, xs + m0 * nb, nb, out);
      else tile_dot<BITS, S, 1>(tw, q, xd + m0 * nb, xs + m0 * nb, nb, out);
      for (int i = 0; i < mt; ++i) {
        OT* yr = y + (m0 + i) * N + t * 16;
        for (int64_t r = 0; r < rows; ++r) yr[r] = static_cast<OT>(out[i][r]);
      }
      m0 += mt;
    }
  }
}

// x [M, K] -> int8 blocks (q8_1): q [M, K], dx, sx [M, K / 32] (sx = dx * sum(q) in f32: exact enough
// for the offsets of the signed types, m = -128 d, to cancel).
template <typename T>
void quantize_rows(const T* x, int64_t M, int64_t K, int8_t* q, float* dx, float* sx) {
  const int64_t nb = K / QK;
  at::parallel_for(0, M * nb, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* xb = x + (i / nb) * K + (i % nb) * QK;
      float v[QK];
      float amax = 0.f;
      for (int j = 0; j < QK; ++j) {
        v[j] = static_cast<float>(xb[j]);
        amax = std::max(amax, std::fabs(v[j]));
      }
      // As llama.cpp's x86 quantize_row_q8_0/q8_1: the scale is kept in f16, the values are
      // rounded (to nearest even) from x * 127 / amax.
      const float d = static_cast<float>(c10::Half(amax / 127.f));
      const float id = amax != 0.f ? 127.f / amax : 0.f;
      int32_t sum = 0;
      int8_t* qb = q + i * QK;
      for (int j = 0; j < QK; ++j) {
        const int32_t r = static_cast<int32_t>(std::nearbyint(v[j] * id));
        qb[j] = static_cast<int8_t>(r);
        sum += r;
      }
      dx[i] = d;
      sx[i] = d * static_cast<float>(sum);
    }
  });
}

template <int BITS, typename S, typename OT>
void run_tiled(const uint8_t* W, int64_t N, int64_t nb, const int8_t* xq, const float* xd, const float* xs,
               int64_t M, OT* y) {
  const int64_t tiles = (N + 15) / 16;
  const int64_t tile_bytes = nb * Tiled<BITS, S>::BYTES;
  // ~32 KB of weights per task at M = 1 (fewer rows per task for larger M).
  const int64_t grain = std::max<int64_t>(1, (32768 / std::max<int64_t>(tile_bytes, 1)) / std::max<int64_t>(M, 1));
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    tiled_rows<BITS, S, OT>(W, t0, t1, nb, xq, xd, xs, M, y, N);
  });
}

template <typename OT>
void dispatch(int64_t fmt, const uint8_t* W, int64_t N, int64_t nb, const int8_t* xq, const float* xd,
              const float* xs, int64_t M, OT* y) {
  switch (fmt) {
    case 4: return run_tiled<4, uint16_t, OT>(W, N, nb, xq, xd, xs, M, y);
    case 5: return run_tiled<4, float, OT>(W, N, nb, xq, xd, xs, M, y);
    case 6: return run_tiled<8, uint16_t, OT>(W, N, nb, xq, xd, xs, M, y);
    case 7: return run_tiled<8, float, OT>(W, N, nb, xq, xd, xs, M, y);
    case 8: return run_tiled<5, uint16_t, OT>(W, N, nb, xq, xd, xs, M, y);
    case 9: return run_tiled<5, float, OT>(W, N, nb, xq, xd, xs, M, y);
    default: TORCH_CHECK(false, "qmm: unknown weight format ", fmt);
  }
}

// Bytes of weight data for n rows of nb blocks.
int64_t weight_bytes(int64_t fmt, int64_t n, int64_t nb) {
  static const int64_t sizes[6] = {Tiled<4, uint16_t>::BYTES, Tiled<4, float>::BYTES, Tiled<8, uint16_t>::BYTES,
                                   Tiled<8, float>::BYTES, Tiled<5, uint16_t>::BYTES, Tiled<5, float>::BYTES};
  TORCH_CHECK(fmt >= 4 && fmt < 10, "qmm: unknown weight format ", fmt);
  return (n + 15) / 16 * nb * sizes[fmt - 4];
}

// x [M, K] float32 or bfloat16 (contiguous), w uint8 [N, K / 32 * block_bytes(fmt)] -> y [M, N] in x's dtype.
at::Tensor qmm(const at::Tensor& x, const at::Tensor& w, int64_t fmt, int64_t n) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "qmm: x must be a contiguous 2-D tensor");
  TORCH_CHECK(w.scalar_type() == at::kByte && w.is_contiguous(), "qmm: w must be contiguous uint8");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K % QK == 0, "qmm: K must be a multiple of 32");
  const int64_t nb = K / QK;
  TORCH_CHECK(w.numel() == weight_bytes(fmt, n, nb), "qmm: w does not hold [", n, ", ", K, "] in format ", fmt);
  at::Tensor y = at::empty({M, n}, x.options());
  if (M == 0 || n == 0) return y;
  std::vector<int8_t> xq(M * K);
  std::vector<float> xd(M * nb), xs(M * nb);
  const uint8_t* W = w.data_ptr<uint8_t>();
  if (x.scalar_type() == at::kBFloat16) {
    quantize_rows(x.data_ptr<c10::BFloat16>(), M, K, xq.data(), xd.data(), xs.data());
    dispatch(fmt, W, n, nb, xq.data(), xd.data(), xs.data(), M, y.data_ptr<c10::BFloat16>());
  } else {
    TORCH_CHECK(x.scalar_type() == at::kFloat, "qmm: x must be float32 or bfloat16");
    quantize_rows(x.data_ptr<float>(), M, K, xq.data(), xd.data(), xs.data());
    dispatch(fmt, W, n, nb, xq.data(), xd.data(), xs.data(), M, y.data_ptr<float>());
  }
  return y;
}

// Which SIMD path this build took (for logs and tests).
std::string isa() {
#if defined(MISTRALPY_TILED_VNNI) && defined(__AVX512VL__)
  return "avx512vnni";
#else
  return "scalar";
#endif
}

at::Tensor isa_code(const at::Tensor& like) { return mistralpy_simd::string_tensor(isa(), like); }

}  // namespace

#ifndef QMM_NS
#define QMM_NS mistralpy_cpu
#endif

// Named entry points for other sources (kernels.h).
namespace QMM_NS::kernels {
at::Tensor qmm(const at::Tensor& x, const at::Tensor& w, int64_t fmt, int64_t n) { return ::qmm(x, w, fmt, n); }
}  // namespace QMM_NS::kernels

TORCH_LIBRARY_FRAGMENT(QMM_NS, m) {
  m.def("qmm(Tensor x, Tensor w, int fmt, int n) -> Tensor");
  m.def("isa(Tensor like) -> Tensor");
}

TORCH_LIBRARY_IMPL(QMM_NS, CPU, m) {
  m.impl("qmm", &qmm);
  m.impl("isa", &isa_code);
}
