"""The C++ extension's dense bf16 kernel (kernels/cpu/dense.cpp, layers/dense_cpu.py).

Reference: the float64 product of the same bf16 values. The kernel accumulates exact bf16 x bf16
products in float32 and rounds once to bf16, so it must sit within one bf16 rounding of the exact
result (2^-8 relative) plus float32 accumulation error (~1e-6 of sum |x||w|). Rows must not
depend on the other rows in the call (batch invariance, bitwise).
"""
from __future__ import annotations

import pytest
import torch
from fixtures_models import build_checkpoint

from mistralpy import Engine, SamplingParams
from mistralpy.kernels import cpu as cpu_ext
from mistralpy.layers import dense_cpu
from mistralpy.layers.linear import Linear
from mistralpy.layers.matmul import linear, prepack_linear_weights, unpacked

needs_dense = pytest.mark.skipif(not dense_cpu.available(), reason="no SIMD (AVX512-BF16 or AVX2) build of the CPU extension")


def _check_close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    ref = x.double() @ w.double().t()
    if bias is not None:
        ref = ref + bias.double()
    scale = x.double().abs() @ w.double().abs().t()
    err = (y.double() - ref).abs()
    assert (err <= ref.abs() * 2 ** -8 + scale * 1e-6 + 1e-30).all(), err.max().item()


@needs_dense
@pytest.mark.parametrize("n,k", [(16, 2), (48, 64), (960, 576), (64, 130), (32, 1538)])
def test_matches_the_exact_product(n, k):
    torch.manual_seed(n + k)
    w = torch.randn(n, k, dtype=torch.bfloat16)
    packed = dense_cpu.pack(w)
    assert torch.equal(dense_cpu.unpack(packed), w)
    for m in (1, 3, 8, 9, 17):
        x = torch.randn(m, k, dtype=torch.bfloat16)
        _check_close(dense_cpu.linear(x, packed), x, w)


@needs_dense
def test_bias_in_any_float_dtype():
    torch.manual_seed(1)
    w, x = torch.randn(64, 96, dtype=torch.bfloat16), torch.randn(5, 96, dtype=torch.bfloat16)
    for bias in (torch.randn(64), torch.randn(64, dtype=torch.bfloat16)):
        _check_close(dense_cpu.linear(x, dense_cpu.pack(w), bias), x, w, bias)


@needs_dense
def test_rows_do_not_depend_on_the_batch():
    torch.manual_seed(2)
    w = torch.randn(3072, 576, dtype=torch.bfloat16)
    packed = dense_cpu.pack(w)
    x = torch.randn(40, 576, dtype=torch.bfloat16)
    full = dense_cpu.linear(x, packed)
    for m in (1, 2, 7, 8, 9, 16, 23, 33):
        assert torch.equal(dense_cpu.linear(x[:m], packed), full[:m])
    assert torch.equal(dense_cpu.linear(x[17:18], packed), full[17:18])


@needs_dense
def test_linear_layers_are_packed_and_leading_dims_kept():
    torch.manual_seed(3)
    layer = Linear(64, 48, bias=True).to(torch.bfloat16)
    layer.weight.data.normal_()
    layer.bias.data.normal_()
    w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    assert prepack_linear_weights(layer) == 1
    assert dense_cpu.is_packed(layer.weight)
    assert torch.equal(unpacked(layer.weight), w)
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    y = layer(x)
    assert y.shape == (2, 3, 48)
    _check_close(y.reshape(6, 48), x.reshape(6, 64), w, b)
    # float32 and widths that are not multiples of 16 stay with oneDNN / torch
    assert not dense_cpu.can_pack(torch.randn(48, 64))
    assert not dense_cpu.can_pack(torch.randn(40, 64, dtype=torch.bfloat16))


@needs_dense
def test_traced_by_torch_compile():
    torch.manual_seed(4)
    w = torch.randn(64, 128, dtype=torch.bfloat16)
    packed = dense_cpu.pack(w)
    x = torch.randn(3, 128, dtype=torch.bfloat16)

    def f(x):
        return torch.relu(linear(x, packed))

    compiled = torch.compile(f, fullgraph=True, dynamic=False)
    assert torch.equal(compiled(x), f(x))


def test_every_build_matches(variant_ops):
    """Each ISA build the CPU runs (AVX512-BF16 dot products, AVX2 FMAs on widened bf16, plain float
    math): within the same bound of the exact product."""
    variant, op = variant_ops
    expected = {"avx512": ("avx512bf16", "avx2"), "avx2": ("avx2",)}.get(variant, ("scalar",))
    assert cpu_ext.isa(cpu_ext.variant_namespace(variant), "dense_isa") in expected
    torch.manual_seed(5)
    w, x, b = torch.randn(48, 96, dtype=torch.bfloat16), torch.randn(9, 96, dtype=torch.bfloat16), torch.randn(48)
    _check_close(op.dense_mm(x, dense_cpu.pack(w), 48, b), x, w, b)


@needs_dense
def test_bf16_engine_same_tokens_alone_and_batched(tmp_path, tokenizer_dir):
    """End to end in bf16 (the CPU default): every linear runs through the kernel, and a request's
    greedy tokens do not depend on what else is in the step."""
    ckpt = build_checkpoint(tmp_path / "llama", "llama", tokenizer_dir, hidden_size=128, intermediate_size=256)
    eng = Engine(str(ckpt), dtype="bf16", num_kv_blocks=128, max_model_len=256)
    try:
        model = eng.core.runner.model
        assert dense_cpu.is_packed(model.model.layers[0].mlp.gate_up_proj.weight)
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(3, 4096, (n,), generator=g).tolist() for n in (5, 37, 64, 3)]
        greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
        alone = [eng.generate(p, greedy)[0].outputs[0].token_ids for p in prompts]
        assert [r.outputs[0].token_ids for r in eng.generate(prompts, greedy)] == alone
    finally:
        eng.shutdown()
