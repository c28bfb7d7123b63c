// Quantized matrix products for CPU, llama.cpp style (built by mistralpy/kernels/cpu/__init__.py).
//
// Weights: w = u * d + m per group, u unsigned (4, 5 or 8 bits), (d, m) per group in f16 or f32. A group
// is a block of 32 values, or in the two-group formats each half of one (16 values: Q2_K / Q3_K / Q6_K's
// sub-blocks); every GGUF type maps onto this exactly (quant/gguf/kernels_cpu.py). They are stored row-tiled
// (see "row-tiled layout" below): fmt = 4 (4-bit u), 6 (8-bit) or 8 (5-bit), + 1 for f32 (d, m),
// + 16 for two groups per block (f32 only); fmt 31: Q6_K's 6-bit u with two groups whose d is the file's
// f16 d times its int8 sub-block scale, and no stored m (m = -32 d). visit_format lists them.
// Activations: each row of x is quantized once per call to int8 blocks of 32 (q8_1: dx = amax / 127 in f16,
// q = round(x * 127 / amax), sx = dx * sum(q) per group), so that
//   y[n] = sum_g d_g * dx_b * sum_{j in g} u_j q_j + m_g * sx_g
// with the inner sums exact integer dots on every path:
//   AVX512-VNNI: u8 x s8 vpdpbusd, 16 rows of 4 values per instruction;
//   AVX2: u8 x s8 vpmaddubsw into i16 pairs (summed in i16 only while that cannot overflow), vpmaddwd
//         to i32; 8-bit u through llama.cpp's sign trick (|w| x sign(q, w) with w = u - 128);
//   scalar: the portable loop that defines the result (aarch64 and plain x86-64).
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
// horizontal sums are needed (AVX2 takes the two 32-byte halves, rows 0-7 and 8-15, apart). Per
// tile-block (tiles of 16 rows, blocks along K inside a tile):
//   d[G][16], m[G][16] (f16 or f32; G = 1, or 2 for the halves), then the values: 8-bit: 8 quads j of
//   64 bytes, byte 4 r + i = u[r][4 j + i]; 4-bit: 4 vectors v of 64 bytes, byte 4 r + i = u[r][4 v + i] |
//   u[r][4 v + 16 + i] << 4 (so the low nibbles are the first half, the high ones the second); 5-bit:
//   the 4-bit layout of the low nibbles, then 8 little-endian uint64 masks (one per quad j, bit 4 r + i =
//   bit 4 of u[r][4 j + i]); 6-bit (Q6_K): scales as the file keeps them, f16 d[16] (the superblock's) and
//   int8 sc[2][16] (d_g = d sc_g, exact in f32; no m section: m = -32 d_g), then the 4-bit layout of the low nibbles, then
//   two 64-byte vectors of the top two bits, byte 4 r + i of the first = sum_v (u[r][4 v + i] >> 4) << 2 v,
//   of the second the same for u[r][16 + 4 v + i].
template <int BITS, typename S, int G>
struct Tiled {
  static constexpr int64_t R = 16;
  static constexpr int64_t SB = BITS == 6 ? 4 * R : sizeof(S) * R * G;   // bytes of the d's (6-bit: d and sc)
  static constexpr int64_t MB = BITS == 6 ? 0 : SB;     // bytes of the m's
  static constexpr int64_t QB = R * QK * BITS / 8;       // bytes of values (5/6 bits: nibbles, then the rest)
  static constexpr int64_t BYTES = SB + MB + QB;
};

// m of group g (rows of one 16-lane vector / one 8-lane half): stored, or -32 d for the 6-bit format.
constexpr float SIX_BIT_OFFSET = -32.f;

// The 6-bit format's d of group g, row r: f16 d[r] times int8 sc[g][r].
inline float six_bit_d(const uint8_t* tb, int g, int r) {
  uint16_t h;
  std::memcpy(&h, tb + 2 * r, 2);
  return c10::detail::fp16_ieee_to_fp32_value(h) * static_cast<float>(static_cast<int8_t>(tb[32 + 16 * g + r]));
}

template <typename S>
inline float scale_at(const uint8_t* p, int r) {
  return load_scale<S>(p + r * sizeof(S));
}

// Software prefetch of the weight stream PREFETCH_BYTES ahead (the lines of one tile-block per
// block step): each product reads its weights once from DRAM, and small matrices (a few hundred KB
// per layer) end before the hardware prefetcher has ramped up. Past a task's range it touches the
// next tiles' bytes or nothing (a prefetch never faults).
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 2048
#endif
inline void prefetch_line(const uint8_t* p) {
#if defined(__x86_64__)
  _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0);
#else
  __builtin_prefetch(p);
#endif
}
inline void prefetch_ahead(const uint8_t* p, int64_t bytes) {
  for (int64_t o = 0; o < bytes; o += 64) prefetch_line(p + PREFETCH_BYTES + o);
}

// Which group of a block's value j (quad j / 4 for 8-bit, nibble half for 4/5-bit) feeds.
template <int G>
constexpr int group_of_quad(int j) {
  return G == 2 && j >= 4 ? 1 : 0;
}

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define MISTRALPY_TILED_VNNI 1
constexpr int MAX_MT = 4;
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
template <int BITS, typename S, int G, int MT>
inline void tile_dot(const uint8_t* t, const int8_t* xq, const float* xd, const float* xs, int64_t nb,
                     float (*out)[16]) {
  using F = Tiled<BITS, S, G>;
  __m512 accf[MT], accm[MT];
#pragma GCC unroll 8
  for (int i = 0; i < MT; ++i) accf[i] = accm[i] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi8(0x0F);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* tb = t + b * F::BYTES;
    const uint8_t* qv = tb + F::SB + F::MB;
    prefetch_ahead(tb, F::BYTES);
    __m512i isum[G][MT];
    for (int g = 0; g < G; ++g)
#pragma GCC unroll 8
      for (int i = 0; i < MT; ++i) isum[g][i] = _mm512_setzero_si512();
    if constexpr (BITS == 4 || BITS == 5 || BITS == 6) {
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v) {
        const __m512i raw = _mm512_loadu_si512(qv + 64 * v);
        __m512i lo = _mm512_and_si512(raw, low);
        __m512i hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low);
        if constexpr (BITS == 6) {  // top two bits: bits 2 v, 2 v + 1 of the two extra vectors
          const __m512i three = _mm512_set1_epi8(3);
          const __m512i top_lo = _mm512_and_si512(_mm512_srli_epi16(_mm512_loadu_si512(qv + 256), 2 * v), three);
          const __m512i top_hi = _mm512_and_si512(_mm512_srli_epi16(_mm512_loadu_si512(qv + 320), 2 * v), three);
          lo = _mm512_or_si512(lo, _mm512_slli_epi16(top_lo, 4));
          hi = _mm512_or_si512(hi, _mm512_slli_epi16(top_hi, 4));
        }
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
          isum[0][i] = _mm512_dpbusd_epi32(isum[0][i], lo, bcast4(xb + 4 * v));
          isum[G - 1][i] = _mm512_dpbusd_epi32(isum[G - 1][i], hi, bcast4(xb + 16 + 4 * v));
        }
      }
    } else {
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {
        const __m512i u = _mm512_loadu_si512(qv + 64 * j);
#pragma GCC unroll 8
        for (int i = 0; i < MT; ++i) {
          __m512i& acc = isum[group_of_quad<G>(j)][i];
          acc = _mm512_dpbusd_epi32(acc, u, bcast4(xq + (i * nb + b) * QK + 4 * j));
        }
      }
    }
    for (int g = 0; g < G; ++g) {
      const __m512 d = BITS == 6
          ? _mm512_mul_ps(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(tb))),
                          _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                              _mm_loadu_si128(reinterpret_cast<const __m128i*>(tb + 32 + 16 * g)))))
          : load16<S>(tb + g * 16 * sizeof(S));
      const __m512 m = BITS == 6 ? _mm512_mul_ps(d, _mm512_set1_ps(SIX_BIT_OFFSET))
                                 : load16<S>(tb + F::SB + g * 16 * sizeof(S));
#pragma GCC unroll 8
      for (int i = 0; i < MT; ++i) {
        const int64_t xi = i * nb + b;
        accf[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[g][i]), _mm512_mul_ps(d, _mm512_set1_ps(xd[xi])), accf[i]);
        accm[i] = _mm512_fmadd_ps(m, _mm512_set1_ps(xs[xi * G + g]), accm[i]);
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MT; ++i) _mm512_storeu_ps(out[i], _mm512_add_ps(accf[i], accm[i]));
}
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define MISTRALPY_TILED_AVX2 1
constexpr int MAX_MT = 2;  // 16 ymm registers: 2 activation rows x 2 halves of accumulators and sums
template <typename S>
inline __m256 load8(const uint8_t* p) {
  if constexpr (std::is_same_v<S, float>) {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(p));
  } else {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
}

inline __m256i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// 32 mask bits -> 32 bytes, 16 where the bit is set (byte k <- bit k).
inline __m256i bits_to_16(uint32_t bits) {
  const __m256i sel = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                       2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i bit = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ULL));
  const __m256i rep = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int32_t>(bits)), sel);
  const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(rep, bit), bit);
  return _mm256_and_si256(set, _mm256_set1_epi8(16));
}

template <int BITS, typename S, int G, int MT>
inline void tile_dot(const uint8_t* t, const int8_t* xq, const float* xd, const float* xs, int64_t nb,
                     float (*out)[16]) {
  using F = Tiled<BITS, S, G>;
  __m256 acc[MT][2];
  for (int i = 0; i < MT; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* tb = t + b * F::BYTES;
    const uint8_t* qv = tb + F::SB + F::MB;
    prefetch_ahead(tb, F::BYTES);
    for (int h = 0; h < 2; ++h) {  // rows 8 h .. 8 h + 7: bytes 32 h .. 32 h + 31 of every 64-byte vector
      __m256i isum[G][MT];
      if constexpr (BITS == 4) {
        // |sum| <= 8 pairs x 2 x 15 x 127 = 30480: every product of a group fits one i16 lane
        __m256i s16[G][MT];
        for (int g = 0; g < G; ++g)
          for (int i = 0; i < MT; ++i) s16[g][i] = _mm256_setzero_si256();
#pragma GCC unroll 4
        for (int v = 0; v < 4; ++v) {
          const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qv + 64 * v + 32 * h));
          const __m256i lo = _mm256_and_si256(raw, low);
          const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
          for (int i = 0; i < MT; ++i) {
            const int8_t* xb = xq + (i * nb + b) * QK;
            s16[0][i] = _mm256_add_epi16(s16[0][i], _mm256_maddubs_epi16(lo, bcast4(xb + 4 * v)));
            s16[G - 1][i] = _mm256_add_epi16(s16[G - 1][i], _mm256_maddubs_epi16(hi, bcast4(xb + 16 + 4 * v)));
          }
        }
        for (int g = 0; g < G; ++g)
          for (int i = 0; i < MT; ++i) isum[g][i] = _mm256_madd_epi16(s16[g][i], ones);
      } else if constexpr (BITS == 6) {
        static_assert(G == 2, "6-bit blocks are Q6_K's: two groups");
        for (int g = 0; g < G; ++g)
          for (int i = 0; i < MT; ++i) isum[g][i] = _mm256_setzero_si256();
        const __m256i three = _mm256_set1_epi8(3);
        const __m256i ta = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qv + 256 + 32 * h));
        const __m256i tb2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qv + 320 + 32 * h));
#pragma GCC unroll 4
        for (int v = 0; v < 4; ++v) {
          const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qv + 64 * v + 32 * h));
          const __m256i top_lo = _mm256_and_si256(_mm256_srli_epi16(ta, 2 * v), three);
          const __m256i top_hi = _mm256_and_si256(_mm256_srli_epi16(tb2, 2 * v), three);
          const __m256i lo = _mm256_or_si256(_mm256_and_si256(raw, low), _mm256_slli_epi16(top_lo, 4));
          const __m256i hi =
              _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(raw, 4), low), _mm256_slli_epi16(top_hi, 4));
          for (int i = 0; i < MT; ++i) {
            const int8_t* xb = xq + (i * nb + b) * QK;
            // 2 x 63 x 127 = 16002 per lane: straight to i32
            isum[0][i] = _mm256_add_epi32(isum[0][i], _mm256_madd_epi16(_mm256_maddubs_epi16(lo, bcast4(xb + 4 * v)), ones));
            isum[1][i] = _mm256_add_epi32(isum[1][i],
                                          _mm256_madd_epi16(_mm256_maddubs_epi16(hi, bcast4(xb + 16 + 4 * v)), ones));
          }
        }
      } else if constexpr (BITS == 5) {
        static_assert(G == 1, "5-bit two-group blocks are not a format");
        for (int i = 0; i < MT; ++i) isum[0][i] = _mm256_setzero_si256();
#pragma GCC unroll 4
        for (int v = 0; v < 4; ++v) {
          const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qv + 64 * v + 32 * h));
          uint32_t mlo, mhi;
          std::memcpy(&mlo, qv + 256 + 8 * v + 4 * h, 4);
          std::memcpy(&mhi, qv + 256 + 8 * (v + 4) + 4 * h, 4);
          const __m256i lo = _mm256_or_si256(_mm256_and_si256(raw, low), bits_to_16(mlo));
          const __m256i hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(raw, 4), low), bits_to_16(mhi));
          for (int i = 0; i < MT; ++i) {
            const int8_t* xb = xq + (i * nb + b) * QK;
            // 2 x 2 x 31 x 127 = 15748 per lane: one i16 add, then to i32
            const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, bcast4(xb + 4 * v)),
                                               _mm256_maddubs_epi16(hi, bcast4(xb + 16 + 4 * v)));
            isum[0][i] = _mm256_add_epi32(isum[0][i], _mm256_madd_epi16(p, ones));
          }
        }
      } else {
        for (int g = 0; g < G; ++g)
          for (int i = 0; i < MT; ++i) isum[g][i] = _mm256_setzero_si256();
        const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
#pragma GCC unroll 8
        for (int j = 0; j < 8; ++j) {
          // w = u - 128 (signed); |w| <= 128 as u8 times sign(q, w): 2 x 128 x 127 = 32512 per lane
          const __m256i w = _mm256_xor_si256(
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qv + 64 * j + 32 * h)), flip);
          const __m256i aw = _mm256_sign_epi8(w, w);
          for (int i = 0; i < MT; ++i) {
            const __m256i sq = _mm256_sign_epi8(bcast4(xq + (i * nb + b) * QK + 4 * j), w);
            __m256i& s = isum[group_of_quad<G>(j)][i];
            s = _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sq), ones));
          }
        }
      }
      for (int g = 0; g < G; ++g) {
        const __m256 d = BITS == 6
            ? _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tb + 16 * h))),
                            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                                _mm_loadl_epi64(reinterpret_cast<const __m128i*>(tb + 32 + 16 * g + 8 * h)))))
            : load8<S>(tb + (g * 16 + 8 * h) * sizeof(S));
        __m256 m = BITS == 6 ? _mm256_mul_ps(d, _mm256_set1_ps(SIX_BIT_OFFSET))
                             : load8<S>(tb + F::SB + (g * 16 + 8 * h) * sizeof(S));
        // 8-bit sums were of w = u - 128: sum u q = sum w q + 128 sum q, i.e. m + 128 d against sx
        if constexpr (BITS == 8) m = _mm256_fmadd_ps(d, _mm256_set1_ps(128.f), m);
        for (int i = 0; i < MT; ++i) {
          const int64_t xi = i * nb + b;
          acc[i][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[g][i]), _mm256_mul_ps(d, _mm256_set1_ps(xd[xi])),
                                      acc[i][h]);
          acc[i][h] = _mm256_fmadd_ps(m, _mm256_set1_ps(xs[xi * G + g]), acc[i][h]);
        }
      }
    }
  }
  for (int i = 0; i < MT; ++i) {
    _mm256_storeu_ps(out[i], acc[i][0]);
    _mm256_storeu_ps(out[i] + 8, acc[i][1]);
  }
}
#else
constexpr int MAX_MT = 4;
template <int BITS, typename S, int G, int MT>
inline void tile_dot(const uint8_t* t, const int8_t* xq, const float* xd, const float* xs, int64_t nb,
                     float (*out)[16]) {
  using F = Tiled<BITS, S, G>;
  for (int i = 0; i < MT; ++i)
    for (int r = 0; r < 16; ++r) out[i][r] = 0.f;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* tb = t + b * F::BYTES;
    const uint8_t* qv = tb + F::SB + F::MB;
    for (int r = 0; r < 16; ++r) {
      uint8_t u[QK];
      if constexpr (BITS == 4 || BITS == 5 || BITS == 6) {
        for (int v = 0; v < 4; ++v)
          for (int k = 0; k < 4; ++k) {
            const uint8_t byte = qv[64 * v + 4 * r + k];
            u[4 * v + k] = byte & 0x0F;
            u[16 + 4 * v + k] = byte >> 4;
            if constexpr (BITS == 6) {
              u[4 * v + k] |= ((qv[256 + 4 * r + k] >> (2 * v)) & 3) << 4;
              u[16 + 4 * v + k] |= ((qv[320 + 4 * r + k] >> (2 * v)) & 3) << 4;
            }
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
      for (int i = 0; i < MT; ++i) {
        const int64_t xi = i * nb + b;
        const int8_t* xb = xq + xi * QK;
        for (int g = 0; g < G; ++g) {
          const float d = BITS == 6 ? six_bit_d(tb, g, r) : scale_at<S>(tb, g * 16 + r);
          const float m = BITS == 6 ? d * SIX_BIT_OFFSET : scale_at<S>(tb + F::SB, g * 16 + r);
          int32_t s = 0;
          for (int k = g * QK / G; k < (g + 1) * QK / G; ++k) s += static_cast<int32_t>(u[k]) * xb[k];
          out[i][r] += static_cast<float>(s) * (d * xd[xi]) + m * xs[xi * G + g];
        }
      }
    }
  }
}
#endif

template <int BITS, typename S, int G, typename OT>
void tiled_rows(const uint8_t* W, int64_t t0, int64_t t1, int64_t nb, const int8_t* xq, const float* xd,
                const float* xs, int64_t M, OT* y, int64_t N) {
  using F = Tiled<BITS, S, G>;
  float out[4][16];
  for (int64_t o = 0; o < PREFETCH_BYTES; o += 64)  // the head of this task's stream (prefetch_ahead covers the rest)
    prefetch_line(W + t0 * nb * F::BYTES + o);
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* tw = W + t * nb * F::BYTES;
    const int64_t rows = std::min<int64_t>(16, N - t * 16);
    for (int64_t m0 = 0; m0 < M;) {
      const int64_t left = M - m0;
      const int mt = left >= 4 && MAX_MT >= 4 ? 4 : (left >= 2 ? 2 : 1);
      const int8_t* q = xq + m0 * nb * QK;
      const float* d = xd + m0 * nb;
      const float* s = xs + m0 * nb * G;
      if constexpr (MAX_MT >= 4) {
        if (mt == 4) tile_dot<BITS, S, G, 4>(tw, q, d, s, nb, out);
      }
      if (mt == 2) tile_dot<BITS, S, G, 2>(tw, q, d, s, nb, out);
      else if (mt == 1) tile_dot<BITS, S, G, 1>(tw, q, d, s, nb, out);
      for (int i = 0; i < mt; ++i) {
        OT* yr = y + (m0 + i) * N + t * 16;
        for (int64_t r = 0; r < rows; ++r) yr[r] = static_cast<OT>(out[i][r]);
      }
      m0 += mt;
    }
  }
}

// x [M, K] -> int8 blocks (q8_1): q [M, K], dx [M, K / 32], and the offsets' sums sx = dx * sum(q) per
// block (xs [M, K / 32]) and per half block (xh [M, K / 16]) in f32: exact enough for the offsets of the
// signed types, m = -128 d, to cancel.
template <typename T>
void quantize_rows(const T* x, int64_t M, int64_t K, int8_t* q, float* dx, float* xs, float* xh) {
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
      int32_t sum[2] = {0, 0};
      int8_t* qb = q + i * QK;
      for (int j = 0; j < QK; ++j) {
        const int32_t r = static_cast<int32_t>(std::nearbyint(v[j] * id));
        qb[j] = static_cast<int8_t>(r);
        sum[j >= QK / 2] += r;
      }
      dx[i] = d;
      xs[i] = d * static_cast<float>(sum[0] + sum[1]);
      xh[2 * i] = d * static_cast<float>(sum[0]);
      xh[2 * i + 1] = d * static_cast<float>(sum[1]);
    }
  });
}

template <int BITS, typename S, int G, typename OT>
void run_tiled(const uint8_t* W, int64_t N, int64_t nb, const int8_t* xq, const float* xd, const float* xs,
               const float* xh, int64_t M, OT* y) {
  const int64_t tiles = (N + 15) / 16;
  const int64_t tile_bytes = nb * Tiled<BITS, S, G>::BYTES;
  // ~32 KB of weights per task at M = 1 (fewer rows per task for larger M).
  const int64_t grain = std::max<int64_t>(1, (32768 / std::max<int64_t>(tile_bytes, 1)) / std::max<int64_t>(M, 1));
  const float* sums = G == 2 ? xh : xs;
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    tiled_rows<BITS, S, G, OT>(W, t0, t1, nb, xq, xd, sums, M, y, N);
  });
}

// A weight format as template arguments: BITS, scale type S, groups per block G.
template <int B, typename SC, int GR>
struct Format {
  static constexpr int BITS = B;
  static constexpr int G = GR;
  using S = SC;
  using Tile = Tiled<B, SC, GR>;
};

// f(Format<...>{}) for weight format `fmt`: the one list of formats.
template <typename F>
void visit_format(int64_t fmt, F&& f) {
  switch (fmt) {
    case 4: return f(Format<4, uint16_t, 1>{});
    case 5: return f(Format<4, float, 1>{});
    case 6: return f(Format<8, uint16_t, 1>{});
    case 7: return f(Format<8, float, 1>{});
    case 8: return f(Format<5, uint16_t, 1>{});
    case 9: return f(Format<5, float, 1>{});
    case 21: return f(Format<4, float, 2>{});
    case 31: return f(Format<6, float, 2>{});
    default: TORCH_CHECK(false, "qmm: unknown weight format ", fmt);
  }
}

template <typename OT>
void dispatch(int64_t fmt, const uint8_t* W, int64_t N, int64_t nb, const int8_t* xq, const float* xd,
              const float* xs, const float* xh, int64_t M, OT* y) {
  visit_format(fmt, [&](auto f) {
    using Fm = decltype(f);
    run_tiled<Fm::BITS, typename Fm::S, Fm::G, OT>(W, N, nb, xq, xd, xs, xh, M, y);
  });
}

// Bytes of weight data for n rows of nb blocks.
int64_t weight_bytes(int64_t fmt, int64_t n, int64_t nb) {
  int64_t bytes = 0;
  visit_format(fmt, [&](auto f) { bytes = decltype(f)::Tile::BYTES; });
  return (n + 15) / 16 * nb * bytes;
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
  std::vector<float> xd(M * nb), xs(M * nb), xh(2 * M * nb);
  const uint8_t* W = w.data_ptr<uint8_t>();
  if (x.scalar_type() == at::kBFloat16) {
    quantize_rows(x.data_ptr<c10::BFloat16>(), M, K, xq.data(), xd.data(), xs.data(), xh.data());
    dispatch(fmt, W, n, nb, xq.data(), xd.data(), xs.data(), xh.data(), M, y.data_ptr<c10::BFloat16>());
  } else {
    TORCH_CHECK(x.scalar_type() == at::kFloat, "qmm: x must be float32 or bfloat16");
    quantize_rows(x.data_ptr<float>(), M, K, xq.data(), xd.data(), xs.data(), xh.data());
    dispatch(fmt, W, n, nb, xq.data(), xd.data(), xs.data(), xh.data(), M, y.data_ptr<float>());
  }
  return y;
}

// Which SIMD path this build took (for logs and tests).
std::string isa() {
#if defined(MISTRALPY_TILED_VNNI) && defined(__AVX512VL__)
  return "avx512vnni";
#elif defined(MISTRALPY_TILED_AVX2)
  return "avx2";
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
