// Every decoder layer of a Llama- or Gemma-family decode step in one op call (wrapped by
// mistralpy/worker/native_decode.py).
//
// On a small model the eager decode step spends ~40% of its time in Python and per-op dispatch
// (~13 ops x layers); this runs, per layer, exactly the calls the eager CPU path makes (same kernels,
// same arguments, same order), so its result is bitwise that path's. Layout 0 follows
// models/llama.py:LlamaDecoderLayer.forward (and Gemma 1's, the same with (1 + w) norms):
//   h = rms_norm(x, in_norm); qkv = linear(h) (+ bias); q, k, v = views of qkv
//   [q = rms_norm(q, q_norm), k = rms_norm(k, k_norm) per head]; q, k = rope(positions, q, k, cos, sin)
//   a = paged_decode(q, k, v, k_cache, v_cache, slots, block_tables, seq_lens, scale, window, softcap)
//   x = x + linear_o(a); h = rms_norm(x, post_norm); x = x + linear_down(act_and_mul(linear_gate_up(h)))
// Layout 1 follows models/gemma2.py:Gemma2DecoderLayer.forward (Gemma 2 and 3), norms around both halves:
//   x = x + rms_norm(linear_o(a), post_attn_norm)
//   x = x + rms_norm(linear_down(act_and_mul(linear_gate_up(rms_norm(x, pre_ff_norm)))), post_ff_norm)
// A linear is one or more parts whose outputs are concatenated (layers/linear.py:ConcatKernel, torch.cat
// on the last dim: merged shards of different quant formats), then its bias added by torch's add as
// Linear.forward does; a part is qmm (fmt >= 4), torch's int4 product as quant/gguf/kernels.py:
// Int4PlaneKernel makes it for fewer than 128 rows (fmt -1: Q6_K / Q3_K / Q2_K planes, x widened by the
// kernel's fold first), or a lone dense_mm (fmt 0, bias inside the kernel as layers/dense_cpu.py passes it). The residual adds are at::add, the op `hidden + y` runs in Python.
// Returns x before the final norm.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "kernels.h"

namespace {

namespace K = QMM_NS::kernels;

constexpr int64_t LINEARS = 4;  // qkv, o, gate_up, down
constexpr int64_t INT4 = -1;    // format code of an Int4PlaneKernel part

// Int4PlaneKernel.__call__ on a 2-D contiguous bf16 x of fewer than 128 rows: _extend(x) (fold h > 0:
// [x, hi * x] per h-wide sub-block, zero-padded for hi 0, duplicated for hi 1), the aten int4 product,
// the padding rows cut off.
at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& sz,
                   const std::optional<at::Tensor>& hi_mult, int64_t group, int64_t h, double hi, int64_t n) {
  at::Tensor xe = x;
  if (h > 0) {
    const int64_t m = x.size(0), k_ext = packed.size(1) * 2;
    const at::Tensor xs = x.reshape({m, -1, 1, h});
    if (hi == 0.0) {
      xe = at::constant_pad_nd(xs, {0, h}, 0).reshape({m, k_ext});
    } else if (hi == 1.0) {
      xe = at::cat({xs, xs}, 2).reshape({m, k_ext});
    } else {
      TORCH_CHECK(hi_mult.has_value() && hi_mult->defined(), "decode_layers: int4 part without its fold tensor");
      xe = at::mul(xs, *hi_mult).reshape({m, k_ext});
    }
  }
  const at::Tensor y = at::_weight_int4pack_mm_for_cpu(xe, packed, group, sz);
  return y.size(1) == n ? y : y.narrow(1, 0, n).contiguous();
}

// hidden [T, H] (T decode rows, one per sequence). Per layer i, in this order: its norms (layout 0:
// input, post-attention; layout 1: input, post-attention, pre-feedforward, post-feedforward; then q, k
// with qk_norm) with their eps / offsets; linears [4i .. 4i + 3] (qkv, o, gate_up, down), linear j
// made of parts[j] consecutive entries of weights / formats / outs, biases[j]; rope table
// cos[rope_ids[i]] / sin[rope_ids[i]]; an int4 part p also takes extras[2p], extras[2p + 1] (scales and
// zeros, fold multiplier), part_ints[2p], part_ints[2p + 1] (group, fold width h, 0: no fold), part_his[p]; scales / windows / softcaps [i] (window 0, softcap 0: none);
// act: fused.cpp's activation code.
at::Tensor decode_layers(const at::Tensor& hidden, const at::Tensor& positions, at::TensorList cos,
                         at::TensorList sin, at::IntArrayRef rope_ids, const at::Tensor& slots,
                         const at::Tensor& block_tables, const at::Tensor& seq_lens, at::TensorList k_caches,
                         at::TensorList v_caches, at::TensorList norms, at::ArrayRef<double> eps,
                         at::ArrayRef<double> offsets, at::TensorList weights, at::IntArrayRef parts,
                         const c10::List<std::optional<at::Tensor>>& biases, at::IntArrayRef formats,
                         at::IntArrayRef outs, const c10::List<std::optional<at::Tensor>>& extras,
                         at::IntArrayRef part_ints, at::ArrayRef<double> part_his, at::ArrayRef<double> scales, at::IntArrayRef windows,
                         at::ArrayRef<double> softcaps, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                         int64_t act, int64_t layout, bool qk_norm) {
  const auto L = static_cast<int64_t>(k_caches.size());
  const auto Ls = static_cast<size_t>(L);
  TORCH_CHECK(hidden.dim() == 2, "decode_layers: hidden must be [T, H]");
  TORCH_CHECK(layout == 0 || layout == 1, "decode_layers: layout must be 0 or 1");
  TORCH_CHECK(v_caches.size() == Ls && scales.size() == Ls && windows.size() == Ls && softcaps.size() == Ls &&
                  rope_ids.size() == Ls,
              "decode_layers: one k/v cache, rope id, scale, window and softcap per layer");
  TORCH_CHECK(!cos.empty() && cos.size() == sin.size(), "decode_layers: as many cos as sin tables");
  for (const int64_t r : rope_ids)
    TORCH_CHECK(r >= 0 && r < static_cast<int64_t>(cos.size()), "decode_layers: rope id out of range");
  const auto four = static_cast<size_t>(LINEARS * L);
  TORCH_CHECK(parts.size() == four && biases.size() == four, "decode_layers: 4 linears (parts, bias) per layer");
  std::vector<int64_t> first(four + 1, 0);  // first weight entry of each linear
  for (size_t j = 0; j < four; ++j) {
    TORCH_CHECK(parts[j] >= 1, "decode_layers: a linear has at least one part");
    first[j + 1] = first[j] + parts[j];
  }
  const auto nw = static_cast<size_t>(first[four]);
  TORCH_CHECK(weights.size() == nw && formats.size() == nw && outs.size() == nw && extras.size() == 2 * nw &&
                  part_ints.size() == 2 * nw && part_his.size() == nw,
              "decode_layers: one weight, format, size (2 extras, 2 ints, 1 float) per part");
  for (size_t j = 0; j < four; ++j)
    if (parts[j] > 1)
      for (int64_t p = first[j]; p < first[j + 1]; ++p)
        TORCH_CHECK(formats[p] != 0, "decode_layers: parts of a concatenated linear must be quantized kernels");
  const int64_t per_norm = (layout == 1 ? 4 : 2) + (qk_norm ? 2 : 0);
  TORCH_CHECK(static_cast<int64_t>(norms.size()) == per_norm * L && eps.size() == norms.size() &&
                  offsets.size() == norms.size(),
              "decode_layers: norm weights (with eps, offset) do not match the layout");
  const int64_t T = hidden.size(0);
  const int64_t q_size = num_heads * head_dim, kv_size = num_kv_heads * head_dim;
  const int64_t qk = layout == 1 ? 4 : 2;  // index of the q norm within a layer's norms
  at::Tensor x = hidden;
  for (int64_t i = 0; i < L; ++i) {
    const int64_t l = LINEARS * i, nn = per_norm * i;
    const auto norm = [&](const at::Tensor& in, int64_t j) {
      return K::rms_norm(in, norms[nn + j], eps[nn + j], offsets[nn + j]);
    };
    const auto lin = [&](const at::Tensor& in, int64_t j) {
      const int64_t b = first[l + j], e = first[l + j + 1];
      const std::optional<at::Tensor> bias = biases.get(l + j);
      if (e - b == 1 && formats[b] == 0) return K::dense_mm(in, weights[b], outs[b], bias);
      const auto part = [&](int64_t p) {
        if (formats[p] != INT4) return K::qmm(in, weights[p], formats[p], outs[p]);
        const std::optional<at::Tensor> sz = extras.get(2 * p);
        TORCH_CHECK(sz.has_value() && sz->defined(), "decode_layers: int4 part without its scales");
        return int4_mm(in, weights[p], *sz, extras.get(2 * p + 1), part_ints[2 * p], part_ints[2 * p + 1],
                       part_his[p], outs[p]);
      };
      at::Tensor y;
      if (e - b == 1) {
        y = part(b);
      } else {
        std::vector<at::Tensor> ys;
        ys.reserve(static_cast<size_t>(e - b));
        for (int64_t p = b; p < e; ++p) ys.push_back(part(p));
        y = at::cat(ys, -1);
      }
      return bias.has_value() && bias->defined() ? at::add(y, *bias) : y;
    };
    at::Tensor h = norm(x, 0);
    const at::Tensor qkv = lin(h, 0);
    TORCH_CHECK(qkv.size(1) == q_size + 2 * kv_size, "decode_layers: qkv width does not match the heads");
    at::Tensor q = qkv.narrow(1, 0, q_size).view({T, num_heads, head_dim});
    at::Tensor k = qkv.narrow(1, q_size, kv_size).view({T, num_kv_heads, head_dim});
    const at::Tensor v = qkv.narrow(1, q_size + kv_size, kv_size).view({T, num_kv_heads, head_dim});
    if (qk_norm) {
      q = norm(q, qk);
      k = norm(k, qk + 1);
    }
    const auto r = static_cast<size_t>(rope_ids[i]);
    std::tie(q, k) = K::rope(positions, q, k, cos[r], sin[r]);
    const at::Tensor a = K::paged_decode(q, k, v, k_caches[i], v_caches[i], slots, block_tables, seq_lens,
                                         scales[i], windows[i], softcaps[i]);
    const at::Tensor o = lin(a.reshape({T, q_size}), 1);
    if (layout == 0) {
      x = at::add(x, o);
      h = norm(x, 1);
      x = at::add(x, lin(K::act_and_mul(lin(h, 2), act, true), 3));
    } else {
      x = at::add(x, norm(o, 1));
      h = norm(x, 2);
      x = at::add(x, norm(lin(K::act_and_mul(lin(h, 2), act, true), 3), 3));
    }
  }
  return x;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(QMM_NS, m) {
  m.def(
      "decode_layers(Tensor hidden, Tensor positions, Tensor[] cos, Tensor[] sin, int[] rope_ids, Tensor slots, "
      "Tensor block_tables, Tensor seq_lens, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, Tensor[] norms, "
      "float[] eps, float[] offsets, Tensor[] weights, int[] parts, Tensor?[] biases, int[] formats, int[] outs, "
      "Tensor?[] extras, int[] part_ints, float[] part_his, float[] scales, int[] windows, float[] softcaps, "
      "int num_heads, int num_kv_heads, int head_dim, int act, "
      "int layout, bool qk_norm) -> Tensor");
}

TORCH_LIBRARY_IMPL(QMM_NS, CPU, m) {
  m.impl("decode_layers", &decode_layers);
}
