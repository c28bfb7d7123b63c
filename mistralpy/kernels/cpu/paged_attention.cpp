// One-query (decode) attention over the paged KV cache for CPU (built by mistralpy/kernels/cpu/__init__.py;
// wrapped by mistralpy/attention/cpu_paged.py).
//
// paged_decode writes the step's new k/v rows into the cache at their slots, then, for each decode
// sequence b and query head h (kv head h / (Hq / Hk)), computes
//   out[b, h] = softmax_j(cap(scale * q[b, h] . k_j)) . v_j   over j in [max(0, len_b - window), len_b)
// reading k_j / v_j in place through the block table (no gather). Two passes in float32 per (sequence,
// kv head, group of query heads): the scores of every valid key, then softmax and the weighted sum of
// the values; each key / value row is read once for all query heads of its kv head.
//
// Cache layout: k_cache [blocks, block_size, Hk, D], v_cache [blocks, block_size, Hk, Dv], last dim
// contiguous, other strides free. v_cache None: the values are k_cache's first Dv channels (MLA's
// latent cache), and the v rows are written there after the k rows (as the torch path does).
// Rows of a block are read 16 at a time: 16 dot products reduced together (AVX-512) and the
// weighted sum's accumulators kept in registers across the rows; portable scalar loops otherwise.
// The softmax uses a polynomial exp (~1 ulp) under AVX-512, std::exp otherwise; softcap std::tanh.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "elementwise.h"
#include "simd.h"

#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

#if defined(__AVX512F__)
using mistralpy_simd::exp16;
#endif

#if defined(__AVX512F__)
template <typename T>
inline __m512 load16(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_loadu_ps(p);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    // bf16 is the top half of an f32: widen and shift left 16.
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
}

#endif

// Rows of a block are processed in chunks of up to 16 (the rows of one kv head in one block lie
// `stride` elements apart): scores[r] = scale * q . k_r, and acc += sum_r w[r] v_r.
constexpr int64_t ROWS = 16;

#if defined(__AVX512F__)
// Lane i = the sum of v[i]'s 16 lanes (a transpose-and-add tree: ~3 instructions per row instead of
// a horizontal reduction each).
inline __m512 reduce16(const __m512* v) {
  __m512 t[8], u[4];
  for (int i = 0; i < 8; ++i)
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)
    u[i] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0x44), _mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0xEE));
  const __m512 w0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xDD));
  const __m512 w1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88), _mm512_shuffle_f32x4(u[2], u[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w0, w1, 0x88), _mm512_shuffle_f32x4(w0, w1, 0xDD));
}

template <typename T>
inline void score_rows(const float* q, const T* k0, int64_t stride, int64_t nr, int64_t D, float scale, float* out) {
  // Always 16 accumulators (in registers); rows past nr re-read row 0 and are not stored.
  const T* rows[ROWS];
  for (int64_t r = 0; r < ROWS; ++r) rows[r] = k0 + (r < nr ? r : 0) * stride;
  __m512 acc[ROWS];
  for (int64_t r = 0; r < ROWS; ++r) acc[r] = _mm512_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    const __m512 qv = _mm512_loadu_ps(q + d);
    for (int64_t r = 0; r < ROWS; ++r) acc[r] = _mm512_fmadd_ps(qv, load16(rows[r] + d), acc[r]);
  }
  const __m512 s = _mm512_mul_ps(reduce16(acc), _mm512_set1_ps(scale));
  _mm512_mask_storeu_ps(out, static_cast<__mmask16>((1u << nr) - 1), s);
  for (; d < D; ++d)
    for (int64_t r = 0; r < nr; ++r) out[r] += scale * q[d] * to_f(rows[r][d]);
}

// acc[0, 16 NR) += sum_r w[r] v_r[0, 16 NR), the accumulators in registers across the rows.
template <int NR, typename T>
inline void wsum_regs(float* acc, const float* w, const T* v0, int64_t stride, int64_t nr) {
  __m512 a[NR];
  for (int i = 0; i < NR; ++i) a[i] = _mm512_loadu_ps(acc + 16 * i);
  for (int64_t r = 0; r < nr; ++r) {
    const __m512 wv = _mm512_set1_ps(w[r]);
    const T* v = v0 + r * stride;
    for (int i = 0; i < NR; ++i) a[i] = _mm512_fmadd_ps(wv, load16(v + 16 * i), a[i]);
  }
  for (int i = 0; i < NR; ++i) _mm512_storeu_ps(acc + 16 * i, a[i]);
}

constexpr int64_t LANES = 16;
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define MISTRALPY_PAGED_AVX2 1
using mistralpy_simd::load8;

// 8 rows at a time: 8 accumulators in registers, reduced together (reduce8).
template <typename T>
inline void score_rows(const float* q, const T* k0, int64_t stride, int64_t nr, int64_t D, float scale, float* out) {
  for (int64_t r0 = 0; r0 < nr; r0 += 8) {
    const int64_t n8 = std::min<int64_t>(8, nr - r0);
    const T* rows[8];
    for (int64_t r = 0; r < 8; ++r) rows[r] = k0 + (r0 + (r < n8 ? r : 0)) * stride;
    __m256 acc[8];
    for (int r = 0; r < 8; ++r) acc[r] = _mm256_setzero_ps();
    int64_t d = 0;
    for (; d + 8 <= D; d += 8) {
      const __m256 qv = _mm256_loadu_ps(q + d);
      for (int r = 0; r < 8; ++r) acc[r] = _mm256_fmadd_ps(qv, load8(rows[r] + d), acc[r]);
    }
    float s[8];
    _mm256_storeu_ps(s, _mm256_mul_ps(mistralpy_simd::reduce8(acc), _mm256_set1_ps(scale)));
    for (int64_t r = 0; r < n8; ++r) {
      float t = s[r];
      for (int64_t e = d; e < D; ++e) t += scale * q[e] * to_f(rows[r][e]);
      out[r0 + r] = t;
    }
  }
}

template <int NR, typename T>
inline void wsum_regs(float* acc, const float* w, const T* v0, int64_t stride, int64_t nr) {
  __m256 a[NR];
  for (int i = 0; i < NR; ++i) a[i] = _mm256_loadu_ps(acc + 8 * i);
  for (int64_t r = 0; r < nr; ++r) {
    const __m256 wv = _mm256_set1_ps(w[r]);
    const T* v = v0 + r * stride;
    for (int i = 0; i < NR; ++i) a[i] = _mm256_fmadd_ps(wv, load8(v + 8 * i), a[i]);
  }
  for (int i = 0; i < NR; ++i) _mm256_storeu_ps(acc + 8 * i, a[i]);
}

constexpr int64_t LANES = 8;
#endif

#if defined(__AVX512F__) || defined(MISTRALPY_PAGED_AVX2)
// acc += sum_r w[r] v_r over Dv: blocks of 8 vectors of LANES, then the remaining vectors, then scalars.
template <typename T>
inline void wsum_rows(float* acc, const float* w, const T* v0, int64_t stride, int64_t nr, int64_t Dv) {
  int64_t d = 0;
  for (; d + 8 * LANES <= Dv; d += 8 * LANES) wsum_regs<8>(acc + d, w, v0 + d, stride, nr);
  switch ((Dv - d) / LANES) {
    case 7: wsum_regs<7>(acc + d, w, v0 + d, stride, nr); break;
    case 6: wsum_regs<6>(acc + d, w, v0 + d, stride, nr); break;
    case 5: wsum_regs<5>(acc + d, w, v0 + d, stride, nr); break;
    case 4: wsum_regs<4>(acc + d, w, v0 + d, stride, nr); break;
    case 3: wsum_regs<3>(acc + d, w, v0 + d, stride, nr); break;
    case 2: wsum_regs<2>(acc + d, w, v0 + d, stride, nr); break;
    case 1: wsum_regs<1>(acc + d, w, v0 + d, stride, nr); break;
    default: break;
  }
  d += (Dv - d) / LANES * LANES;
  for (; d < Dv; ++d)
    for (int64_t r = 0; r < nr; ++r) acc[d] += w[r] * to_f(v0[r * stride + d]);
}
#else
template <typename T>
inline void score_rows(const float* q, const T* k0, int64_t stride, int64_t nr, int64_t D, float scale, float* out) {
  for (int64_t r = 0; r < nr; ++r) {
    const T* k = k0 + r * stride;
    float s = 0.f;
    for (int64_t d = 0; d < D; ++d) s += q[d] * to_f(k[d]);
    out[r] = s * scale;
  }
}

template <typename T>
inline void wsum_rows(float* acc, const float* w, const T* v0, int64_t stride, int64_t nr, int64_t Dv) {
  for (int64_t r = 0; r < nr; ++r) {
    const T* v = v0 + r * stride;
    for (int64_t d = 0; d < Dv; ++d) acc[d] += w[r] * to_f(v[d]);
  }
}
#endif

inline float max_of(const float* s, int64_t n) {
  int64_t i = 0;
  float m = -std::numeric_limits<float>::infinity();
#if defined(__AVX512F__)
  __m512 mv = _mm512_set1_ps(m);
  for (; i + 16 <= n; i += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(s + i));
  m = _mm512_reduce_max_ps(mv);
#elif defined(MISTRALPY_PAGED_AVX2)
  __m256 mv = _mm256_set1_ps(m);
  for (; i + 8 <= n; i += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(s + i));
  m = mistralpy_simd::hmax8(mv);
#endif
  for (; i < n; ++i) m = std::max(m, s[i]);
  return m;
}

// s[i] = exp(s[i] - m) in place; returns the sum.
inline float exp_sum(float* s, int64_t n, float m) {
  int64_t i = 0;
  float sum = 0.f;
#if defined(__AVX512F__)
  const __m512 mv = _mm512_set1_ps(m);
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + i), mv));
    _mm512_storeu_ps(s + i, e);
    acc = _mm512_add_ps(acc, e);
  }
  sum = _mm512_reduce_add_ps(acc);
#elif defined(MISTRALPY_PAGED_AVX2)
  const __m256 mv = _mm256_set1_ps(m);
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 e = mistralpy_simd::exp8(_mm256_sub_ps(_mm256_loadu_ps(s + i), mv));
    _mm256_storeu_ps(s + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  sum = mistralpy_simd::hsum8(acc);
#endif
  for (; i < n; ++i) {
    s[i] = std::exp(s[i] - m);
    sum += s[i];
  }
  return sum;
}

struct Strides {
  int64_t s0, s1, s2;
};

inline Strides strides3(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2)};
}

// Everything one call needs, as raw pointers and strides (no tensor ops inside the loops).
template <typename QT, typename CT>
struct Args {
  const QT *q, *k, *v;
  CT *kc, *vc;
  Strides qs, ks, vs, kcs, vcs;
  QT* out;
  const int64_t *slots, *table, *lens;
  int64_t n_write, B, Hq, Hk, D, Dv, bs, nb, table_stride, num_blocks;
  float scale, softcap;
  int64_t window;
};

template <typename QT, typename CT>
void write_rows(const Args<QT, CT>& a) {
  const int64_t cap = a.num_blocks * a.bs;
  for (int64_t i = 0; i < a.n_write; ++i) {
    const int64_t slot = a.slots[i];
    TORCH_CHECK(slot >= 0 && slot < cap, "paged_decode: slot ", slot, " out of range");
    const int64_t blk = slot / a.bs, r = slot % a.bs;
    for (int64_t h = 0; h < a.Hk; ++h) {
      const QT* src = a.k + i * a.ks.s0 + h * a.ks.s1;
      CT* dst = a.kc + blk * a.kcs.s0 + r * a.kcs.s1 + h * a.kcs.s2;
      for (int64_t d = 0; d < a.D; ++d) dst[d] = static_cast<CT>(to_f(src[d * a.ks.s2]));
    }
    for (int64_t h = 0; h < a.Hk; ++h) {
      const QT* src = a.v + i * a.vs.s0 + h * a.vs.s1;
      CT* dst = a.vc + blk * a.vcs.s0 + r * a.vcs.s1 + h * a.vcs.s2;
      for (int64_t d = 0; d < a.Dv; ++d) dst[d] = static_cast<CT>(to_f(src[d * a.vs.s2]));
    }
  }
}

// Per-thread scratch, grown once: query rows in f32, scores, accumulators (no allocation per call).
inline float* scratch(int64_t n) {
  thread_local std::vector<float> buf;
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(n);
  return buf.data();
}

// Sequence b, kv head g, query heads [h0, h1) of that kv head's group.
template <typename QT, typename CT>
void attend(const Args<QT, CT>& a, int64_t b, int64_t g, int64_t h0, int64_t h1) {
  const int64_t G = a.Hq / a.Hk, nh = h1 - h0;
  const int64_t len = a.lens[b];
  const int64_t j0 = a.window > 0 ? std::max<int64_t>(0, len - a.window) : 0;
  const int64_t n = len - j0;
  QT* out = a.out + (b * a.Hq + g * G + h0) * a.Dv;
  if (n <= 0) {  // nothing to attend to (not produced by the engine): zeros, not NaNs
    for (int64_t i = 0; i < nh * a.Dv; ++i) out[i] = static_cast<QT>(0.f);
    return;
  }
  float* qf = scratch(nh * (a.D + n + a.Dv + 1));
  float* sc = qf + nh * a.D;       // [nh, n]
  float* acc = sc + nh * n;        // [nh, Dv]
  float* invp = acc + nh * a.Dv;   // [nh] 1 / softmax denominators
  for (int64_t h = 0; h < nh; ++h) {
    const QT* src = a.q + b * a.qs.s0 + (g * G + h0 + h) * a.qs.s1;
    for (int64_t d = 0; d < a.D; ++d) qf[h * a.D + d] = to_f(src[d * a.qs.s2]);
  }
  const int64_t* row = a.table + b * a.table_stride;
  // Pass 1: scores, block by block, up to 16 rows at a time.
  for (int64_t j = j0; j < len;) {
    const int64_t blk = row[j / a.bs];
    TORCH_CHECK(blk >= 0 && blk < a.num_blocks, "paged_decode: block id ", blk, " out of range");
    const int64_t r = j % a.bs, nr = std::min({ROWS, a.bs - r, len - j});
    const CT* k0 = a.kc + blk * a.kcs.s0 + r * a.kcs.s1 + g * a.kcs.s2;
    for (int64_t h = 0; h < nh; ++h) score_rows(qf + h * a.D, k0, a.kcs.s1, nr, a.D, a.scale, sc + h * n + (j - j0));
    j += nr;
  }
  if (a.softcap > 0.f) {
    const float c = a.softcap, ic = 1.f / a.softcap;
    for (int64_t i = 0; i < nh * n; ++i) sc[i] = std::tanh(sc[i] * ic) * c;
  }
  // Softmax (unnormalised; 1 / sum is applied to the output).
  for (int64_t h = 0; h < nh; ++h) {
    float* s = sc + h * n;
    invp[h] = 1.f / exp_sum(s, n, max_of(s, n));
  }
  // Pass 2: weighted sum of the values, in the same chunks.
  std::fill(acc, acc + nh * a.Dv, 0.f);
  for (int64_t j = j0; j < len;) {
    const int64_t blk = row[j / a.bs];
    const int64_t r = j % a.bs, nr = std::min({ROWS, a.bs - r, len - j});
    const CT* v0 = a.vc + blk * a.vcs.s0 + r * a.vcs.s1 + g * a.vcs.s2;
    for (int64_t h = 0; h < nh; ++h) wsum_rows(acc + h * a.Dv, sc + h * n + (j - j0), v0, a.vcs.s1, nr, a.Dv);
    j += nr;
  }
  for (int64_t h = 0; h < nh; ++h)
    for (int64_t d = 0; d < a.Dv; ++d) out[h * a.Dv + d] = static_cast<QT>(acc[h * a.Dv + d] * invp[h]);
}

template <typename QT, typename CT>
void run(const Args<QT, CT>& a) {
  write_rows(a);
  const int64_t G = a.Hq / a.Hk;
  // Enough tasks for every thread: split a kv head's query group when sequences x kv heads are few.
  const int64_t threads = at::get_num_threads();
  const int64_t base = std::max<int64_t>(1, a.B * a.Hk);
  const int64_t split = std::min<int64_t>(G, (threads + base - 1) / base);
  const int64_t per = (G + split - 1) / split;
  const int64_t tasks = a.B * a.Hk * split;
  int64_t work = 0;  // multiply-adds, to stay on this thread when a parallel region costs more
  for (int64_t b = 0; b < a.B; ++b) work += std::min(a.lens[b], a.window > 0 ? a.window : a.lens[b]);
  work *= a.Hq * (a.D + a.Dv);
  const int64_t grain = work < (1 << 15) ? tasks : 1;
  at::parallel_for(0, tasks, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t s = t % split, g = (t / split) % a.Hk, b = t / (split * a.Hk);
      const int64_t h0 = s * per, h1 = std::min(G, h0 + per);
      if (h0 < h1) attend(a, b, g, h0, h1);
    }
  });
}

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 3, "paged_decode: ", name, " must be 3-D");
}

template <typename QT, typename CT>
at::Tensor typed(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& kc,
                 const at::Tensor& vc, bool v_in_k, const at::Tensor& slots, const at::Tensor& table,
                 const at::Tensor& lens, double scale, int64_t window, double softcap) {
  Args<QT, CT> a;
  a.B = q.size(0);
  a.Hq = q.size(1);
  a.D = q.size(2);
  a.Hk = kc.size(2);
  a.Dv = v.size(2);
  a.bs = kc.size(1);
  a.num_blocks = kc.size(0);
  a.nb = table.size(1);
  a.table_stride = table.stride(0);
  a.n_write = slots.numel();
  a.q = q.data_ptr<QT>();
  a.k = k.data_ptr<QT>();
  a.v = v.data_ptr<QT>();
  a.kc = kc.data_ptr<CT>();
  a.vc = v_in_k ? a.kc : vc.data_ptr<CT>();
  a.qs = strides3(q);
  a.ks = strides3(k);
  a.vs = strides3(v);
  a.kcs = {kc.stride(0), kc.stride(1), kc.stride(2)};
  a.vcs = v_in_k ? a.kcs : Strides{vc.stride(0), vc.stride(1), vc.stride(2)};
  a.slots = slots.data_ptr<int64_t>();
  a.table = table.data_ptr<int64_t>();
  a.lens = lens.data_ptr<int64_t>();
  a.scale = static_cast<float>(scale);
  a.softcap = static_cast<float>(softcap);
  a.window = window;
  at::Tensor out = at::empty({a.B, a.Hq, a.Dv}, q.options());
  a.out = out.data_ptr<QT>();
  for (int64_t b = 0; b < a.B; ++b)
    TORCH_CHECK(a.lens[b] <= a.nb * a.bs, "paged_decode: length ", a.lens[b], " exceeds the block table");
  run(a);
  return out;
}

template <typename QT>
at::Tensor by_cache(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& kc,
                    const at::Tensor& vc, bool v_in_k, const at::Tensor& slots, const at::Tensor& table,
                    const at::Tensor& lens, double scale, int64_t window, double softcap) {
  switch (kc.scalar_type()) {
    case at::kFloat: return typed<QT, float>(q, k, v, kc, vc, v_in_k, slots, table, lens, scale, window, softcap);
    case at::kBFloat16:
      return typed<QT, c10::BFloat16>(q, k, v, kc, vc, v_in_k, slots, table, lens, scale, window, softcap);
    case at::kHalf: return typed<QT, c10::Half>(q, k, v, kc, vc, v_in_k, slots, table, lens, scale, window, softcap);
    default: TORCH_CHECK(false, "paged_decode: cache dtype must be float32, bfloat16 or float16");
  }
}

// q [B, Hq, D] (decode rows in sequence order; q, k and v with any strides), k [W, Hk, D], v [W, Hk, Dv] written at slots [W]
// (W may be 0: the cache was written already), block_tables [B, nb] and seq_lens [B] int64.
// window <= 0: no sliding window; softcap <= 0: no soft-capping. -> [B, Hq, Dv] in q's dtype.
at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                        const std::optional<at::Tensor>& v_cache, const at::Tensor& slots,
                        const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale, int64_t window,
                        double softcap) {
  check_rows(q, "q");
  check_rows(k, "k");
  check_rows(v, "v");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "paged_decode: q, k and v must share a dtype");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.stride(3) == 1, "paged_decode: k_cache must be 4-D, last dim contiguous");
  const bool v_in_k = !v_cache.has_value();
  const int64_t Hk = k_cache.size(2), D = k_cache.size(3), Dv = v.size(2);
  TORCH_CHECK(q.size(2) == D && k.size(2) == D && k.size(1) == Hk && v.size(1) == Hk && k.size(0) == v.size(0),
              "paged_decode: q/k/v do not match the cache's heads and head dim");
  TORCH_CHECK(Hk > 0 && q.size(1) % Hk == 0, "paged_decode: query heads must be a multiple of kv heads");
  if (v_in_k) {
    TORCH_CHECK(Dv <= D, "paged_decode: values in the k cache need Dv <= D");
  } else {
    const at::Tensor& vc = *v_cache;
    TORCH_CHECK(vc.dim() == 4 && vc.stride(3) == 1 && vc.size(0) == k_cache.size(0) &&
                    vc.size(1) == k_cache.size(1) && vc.size(2) == Hk && vc.size(3) == Dv &&
                    vc.scalar_type() == k_cache.scalar_type(),
                "paged_decode: v_cache must match k_cache ([blocks, block_size, Hk, Dv], same dtype)");
  }
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 1 && slots.is_contiguous() &&
                  slots.size(0) == k.size(0),
              "paged_decode: slots must be contiguous int64 [W]");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && block_tables.dim() == 2 && block_tables.stride(1) == 1 &&
                  block_tables.size(0) == q.size(0),
              "paged_decode: block_tables must be int64 [B, nb] with contiguous rows");
  TORCH_CHECK(seq_lens.scalar_type() == at::kLong && seq_lens.dim() == 1 && seq_lens.is_contiguous() &&
                  seq_lens.size(0) == q.size(0),
              "paged_decode: seq_lens must be contiguous int64 [B]");
  const at::Tensor& vc = v_in_k ? k_cache : *v_cache;
  switch (q.scalar_type()) {
    case at::kFloat:
      return by_cache<float>(q, k, v, k_cache, vc, v_in_k, slots, block_tables, seq_lens, scale, window, softcap);
    case at::kBFloat16:
      return by_cache<c10::BFloat16>(q, k, v, k_cache, vc, v_in_k, slots, block_tables, seq_lens, scale, window,
                                     softcap);
    case at::kHalf:
      return by_cache<c10::Half>(q, k, v, k_cache, vc, v_in_k, slots, block_tables, seq_lens, scale, window, softcap);
    default: TORCH_CHECK(false, "paged_decode: q must be float32, bfloat16 or float16");
  }
}

}  // namespace

#ifndef QMM_NS
#define QMM_NS mistralpy_cpu
#endif

// Named entry points for other sources (kernels.h).
namespace QMM_NS::kernels {
at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                        const std::optional<at::Tensor>& v_cache, const at::Tensor& slots,
                        const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale, int64_t window,
                        double softcap) {
  return ::paged_decode(q, k, v, k_cache, v_cache, slots, block_tables, seq_lens, scale, window, softcap);
}
}  // namespace QMM_NS::kernels

TORCH_LIBRARY_FRAGMENT(QMM_NS, m) {
  m.def(
      "paged_decode(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!)? v_cache, Tensor slots, "
      "Tensor block_tables, Tensor seq_lens, float scale, int window, float softcap) -> Tensor");
}

TORCH_LIBRARY_IMPL(QMM_NS, CPU, m) {
  m.impl("paged_decode", &paged_decode);
}
