// C++ entry points of the ops in this folder, for sources that call them directly (decode_layers.cpp)
// instead of through the dispatcher. Each forwards to the op's body (in its file's anonymous namespace);
// the namespace is QMM_NS::kernels so that two builds of the library loaded side by side (the tests'
// portable copy) keep their symbols apart.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#ifndef QMM_NS
#define QMM_NS mistralpy_cpu
#endif

namespace QMM_NS {
namespace kernels {

// qmatmul.cpp: x [M, K] (contiguous f32/bf16) @ the row-tiled quantized weight -> [M, n]
at::Tensor qmm(const at::Tensor& x, const at::Tensor& w, int64_t fmt, int64_t n);
// dense.cpp: x [M, K] bf16 (contiguous) @ the pair-tiled weight (+ bias) -> [M, n]
at::Tensor dense_mm(const at::Tensor& x, const at::Tensor& w, int64_t n, const std::optional<at::Tensor>& bias);
// fused.cpp, rope.cpp
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps, double offset);
at::Tensor act_and_mul(const at::Tensor& x, int64_t act, bool hf_rounding);
std::tuple<at::Tensor, at::Tensor> rope(const at::Tensor& positions, const at::Tensor& q, const at::Tensor& k,
                                        const at::Tensor& cos, const at::Tensor& sin);
// paged_attention.cpp
at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                        const std::optional<at::Tensor>& v_cache, const at::Tensor& slots,
                        const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale, int64_t window,
                        double softcap);

}  // namespace kernels
}  // namespace QMM_NS
