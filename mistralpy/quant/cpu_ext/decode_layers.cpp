// Every decoder layer of a Llama-family decode step in one op call (wrapped by mistralpy/worker/native_decode.py).
//
// On a small model the eager decode step spends ~40% of its time in Python and per-op dispatch
// (~13 ops x layers); this runs, per layer, exactly the calls the eager CPU path of
// models/llama.py:LlamaDecoderLayer.forward makes (same kernels, same arguments, same order), so its
// result is bitwise that path's:
//   h = rms_norm(x, in_norm); qkv = linear(h) (+ bias); q, k, v = views of qkv
//   [q = rms_norm(q, q_norm), k = rms_norm(k, k_norm) per head]; q, k = rope(positions, q, k, cos, sin)
//   a = paged_decode(q, k, v, k_cache, v_cache, slots, block_tables, seq_lens, scale, window, 0)
//   x = x + linear_o(a); h = rms_norm(x, post_norm); x = x + linear_down(act_and_mul(linear_gate_up(h)))
// A linear is qmm (fmt >= 4, its bias added by torch's add as Linear.forward does) or dense_mm
// (fmt 0, bias inside the kernel as layers/dense_cpu.py passes it). The residual adds are at::add,
// the op `hidden + y` runs in Python. Returns x before the final norm.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>

#include "kernels.h"

namespace {

namespace K = QMM_NS::kernels;

constexpr int64_t LINEARS = 4;  // qkv, o, gate_up, down

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias, int64_t fmt,
                  int64_t n) {
  if (fmt == 0) return K::dense_mm(x, w, n, bias);
  at::Tensor y = K::qmm(x, w, fmt, n);
  return bias.has_value() && bias->defined() ? at::add(y, *bias) : y;
}

// hidden [T, H] (T decode rows, one per sequence); per layer i: norms[2i], norms[2i + 1] (input,
// post-attention) or, with q/k norms, norms[4i .. 4i + 3] (input, post, q, k) with their eps;
// weights / biases / formats / outs [4i .. 4i + 3] for qkv, o, gate_up, down; scales / windows [i]
// (window 0: none); act: fused.cpp's activation code.
at::Tensor decode_layers(const at::Tensor& hidden, const at::Tensor& positions, const at::Tensor& cos,
                         const at::Tensor& sin, const at::Tensor& slots, const at::Tensor& block_tables,
                         const at::Tensor& seq_lens, at::TensorList k_caches, at::TensorList v_caches,
                         at::TensorList norms, at::TensorList weights,
                         const c10::List<std::optional<at::Tensor>>& biases,
                         at::IntArrayRef formats, at::IntArrayRef outs, at::ArrayRef<double> eps,
                         at::ArrayRef<double> scales, at::IntArrayRef windows, int64_t num_heads,
                         int64_t num_kv_heads, int64_t head_dim, int64_t act) {
  const int64_t L = static_cast<int64_t>(k_caches.size());
  TORCH_CHECK(hidden.dim() == 2, "decode_layers: hidden must be [T, H]");
  TORCH_CHECK(static_cast<int64_t>(v_caches.size()) == L && static_cast<int64_t>(scales.size()) == L &&
                  static_cast<int64_t>(windows.size()) == L,
              "decode_layers: one k/v cache, scale and window per layer");
  const auto four = static_cast<size_t>(LINEARS * L);
  TORCH_CHECK(weights.size() == four && biases.size() == four && formats.size() == four && outs.size() == four,
              "decode_layers: 4 weights, biases, formats and sizes per layer");
  const int64_t per_norm = static_cast<int64_t>(norms.size()) / std::max<int64_t>(L, 1);
  TORCH_CHECK((per_norm == 2 || per_norm == 4) && static_cast<int64_t>(norms.size()) == per_norm * L &&
                  eps.size() == norms.size(),
              "decode_layers: 2 or 4 norm weights (and eps) per layer");
  const int64_t T = hidden.size(0);
  const int64_t q_size = num_heads * head_dim, kv_size = num_kv_heads * head_dim;
  at::Tensor x = hidden;
  for (int64_t i = 0; i < L; ++i) {
    const int64_t l = LINEARS * i, nn = per_norm * i;
    const auto lin = [&](const at::Tensor& in, int64_t j) {
      return linear(in, weights[l + j], biases.get(l + j), formats[l + j], outs[l + j]);
    };
    at::Tensor h = K::rms_norm(x, norms[nn], eps[nn], 0.0);
    const at::Tensor qkv = lin(h, 0);
    TORCH_CHECK(qkv.size(1) == q_size + 2 * kv_size, "decode_layers: qkv width does not match the heads");
    at::Tensor q = qkv.narrow(1, 0, q_size).view({T, num_heads, head_dim});
    at::Tensor k = qkv.narrow(1, q_size, kv_size).view({T, num_kv_heads, head_dim});
    const at::Tensor v = qkv.narrow(1, q_size + kv_size, kv_size).view({T, num_kv_heads, head_dim});
    if (per_norm == 4) {
      q = K::rms_norm(q, norms[nn + 2], eps[nn + 2], 0.0);
      k = K::rms_norm(k, norms[nn + 3], eps[nn + 3], 0.0);
    }
    std::tie(q, k) = K::rope(positions, q, k, cos, sin);
    const at::Tensor a = K::paged_decode(q, k, v, k_caches[i], v_caches[i], slots, block_tables, seq_lens,
                                         scales[i], windows[i], 0.0);
    x = at::add(x, lin(a.reshape({T, q_size}), 1));
    h = K::rms_norm(x, norms[nn + 1], eps[nn + 1], 0.0);
    x = at::add(x, lin(K::act_and_mul(lin(h, 2), act, true), 3));
  }
  return x;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(QMM_NS, m) {
  m.def(
      "decode_layers(Tensor hidden, Tensor positions, Tensor cos, Tensor sin, Tensor slots, Tensor block_tables, "
      "Tensor seq_lens, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, Tensor[] norms, Tensor[] weights, "
      "Tensor?[] biases, int[] formats, int[] outs, float[] eps, float[] scales, int[] windows, int num_heads, "
      "int num_kv_heads, int head_dim, int act) -> Tensor");
}

TORCH_LIBRARY_IMPL(QMM_NS, CPU, m) {
  m.impl("decode_layers", &decode_layers);
}
