"""HQQ4 / HQQ8 and FP8 ISQ types: round-trip error, HQQ's solver, kernels against dequantize + matmul,
memory, merged layers, names and the GGUF writer's refusal."""
from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from mistralpy.errors import InvalidRequestError
from mistralpy.layers.linear import ConcatKernel, Linear, MergedLinear
from mistralpy.quant.fp8 import FP8Weight, e4m3_as_f16_bits, quantize_fp8
from mistralpy.quant.hqq import HQQDequantKernel, HQQWeight, minmax_hqq, quantize_hqq
from mistralpy.quant.isq import IsqType, parse_isq, quantize_tensor, type_for_width

CPU = torch.device("cpu")
# Relative RMSE on Gaussian 128 x 4096 weights; measured HQQ4 8.61%, HQQ8 0.507%, FP8 2.65% (~+5%).
RMSE_BOUND = {"HQQ4": 0.090, "HQQ8": 0.0053, "FP8": 0.0278}
TOL = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2}   # as tests/test_gguf_kernels.py


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _quant(name: str, w: torch.Tensor):
    return quantize_tensor(w, parse_isq(name))


def _rel_rmse(back: torch.Tensor, w: torch.Tensor) -> float:
    return ((back - w).pow(2).mean() / w.pow(2).mean()).sqrt().item()


@pytest.mark.parametrize("name", sorted(RMSE_BOUND))
def test_round_trip_error(name):
    w = torch.randn(128, 4096, generator=torch.Generator().manual_seed(7))
    q = _quant(name, w)
    assert isinstance(q, FP8Weight if name == "FP8" else HQQWeight) and q.qtype is parse_isq(name)
    assert _rel_rmse(q.dequantize(), w) < RMSE_BOUND[name]
    # Special rows: zeros, a constant, outliers, tiny values decode finite and close.
    s = torch.randn(6, 512, generator=torch.Generator().manual_seed(3))
    s[1], s[2] = 0, -0.75
    s[3, ::37] *= 40
    s[4, :256] *= 1e-20
    back = _quant(name, s).dequantize()
    assert torch.isfinite(back).all()
    assert torch.equal(back[1], torch.zeros(512))
    assert (back[2] + 0.75).abs().max() < 1e-3
    assert _rel_rmse(back[3:4], s[3:4]) < 3 * RMSE_BOUND[name]


@pytest.mark.parametrize("bits", [4, 8])
def test_hqq_solver_lowers_the_error(bits):
    """HQQ's half-quadratic zero-point updates beat plain min/max rounding on the same grid."""
    w = torch.randn(64, 2048, generator=torch.Generator().manual_seed(bits))
    opt, plain = quantize_hqq(w, bits).dequantize(), minmax_hqq(w, bits).dequantize()
    assert (opt - w).abs().mean() < 0.98 * (plain - w).abs().mean()   # measured ~0.96 (both bits)
    assert _rel_rmse(opt, w) < 0.985 * _rel_rmse(plain, w)             # measured ~0.96
    # Per group it never does worse than min/max in mean |error| (the solver keeps its best zero).
    g_opt = (opt - w).abs().reshape(-1, 64).mean(1)
    g_plain = (plain - w).abs().reshape(-1, 64).mean(1)
    assert (g_opt <= g_plain + 1e-7).all()


def test_storage_layout():
    w = torch.randn(8, 128)
    h4, h8 = quantize_hqq(w, 4), quantize_hqq(w, 8)
    assert h4.q.dtype == torch.uint8 and tuple(h4.q.shape) == (8, 64) and tuple(h4.scale.shape) == (8, 2)
    assert tuple(h8.q.shape) == (8, 128) and int(h8.q.max()) <= 255 and int(h4.ints().max()) <= 15
    f = quantize_fp8(w)
    assert f.q.dtype == torch.float8_e4m3fn and tuple(f.scale.shape) == (8,)
    assert torch.allclose(f.q.float().abs().amax(1), torch.full((8,), 448.0))
    with pytest.raises(ValueError, match="multiple of 64"):
        quantize_hqq(torch.randn(4, 96), 4)


def test_fp8_bit_patterns_are_exact():
    """Every finite E4M3 byte, as float16 bits, is its value times 2^-8 (subnormals and signs too)."""
    codes = torch.arange(256, dtype=torch.uint8)
    codes = codes[(codes & 0x7F) != 0x7F]               # the two NaN codes
    q = codes.view(torch.float8_e4m3fn)
    assert torch.equal(e4m3_as_f16_bits(q).float() * 256, q.float())


def _reference(q) -> torch.Tensor:
    return q.dequantize()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", ["HQQ4", "HQQ8", "FP8"])
def test_kernel_matches_dequantize_matmul(name, dtype):
    gen = torch.Generator().manual_seed(1)
    ks = [256, 576] + ([100] if name == "FP8" else [])
    for k in ks:
        q = _quant(name, torch.randn(80, k, generator=gen) * 0.02)   # 80 rows: not a multiple of 64
        w = _reference(q)
        kern = q.make_kernel(dtype, CPU)
        assert kern.qtype is parse_isq(name) and (kern.out_features, kern.in_features) == (80, k)
        w_k = kern.dequantized()
        assert ((w_k - w).abs().max() / w.abs().max()).item() <= (1e-6 if dtype == torch.float32 else 1e-2)
        for m in (1, 3, 17, 130):   # 130: bf16 takes the expanded path from 128 rows
            x = torch.randn(m, k, generator=gen).to(dtype)
            ref = x.float() @ w.t()
            y = kern(x)
            assert y.dtype == dtype and tuple(y.shape) == (m, 80)
            err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
            assert err <= TOL[dtype], f"{name} {dtype} K={k} M={m}: {err:.2e}"
        assert tuple(kern(torch.randn(2, 3, k).to(dtype)).shape) == (2, 3, 80)
        assert tuple(kern(torch.randn(0, k).to(dtype)).shape) == (0, 80)


def test_generic_hqq_path_is_exact():
    q = quantize_hqq(torch.randn(64, 256), 8)
    kern = HQQDequantKernel(q, torch.float32, CPU)    # what a non-CPU device gets
    assert torch.equal(kern.dequantized(), q.dequantize())
    x = torch.randn(3, 256)
    assert torch.allclose(kern(x), x @ q.dequantize().t(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name, per_weight", [("HQQ4", 0.5 + 4 / 64), ("HQQ8", 1 + 8 / 64), ("FP8", 1.0)])
def test_memory_stays_quantized(name, per_weight):
    n, k = 256, 512
    kern = _quant(name, torch.randn(n, k)).make_kernel(torch.bfloat16, CPU)
    assert kern.nbytes() <= n * k * per_weight + 4 * n
    assert kern.nbytes() < 0.6 * n * k * 2   # well under a bf16 copy


def test_names_widths_and_fallbacks():
    assert parse_isq("hqq4") is IsqType.HQQ4 and parse_isq("HQQ8") is IsqType.HQQ8
    assert parse_isq("FP8") is IsqType.FP8 and parse_isq("f8e4m3") is IsqType.FP8
    assert parse_isq("Q8K") == Q.Q8_K and parse_isq("q8_k") == Q.Q8_K
    assert type_for_width(IsqType.HQQ4, 576) is IsqType.HQQ4
    assert type_for_width(IsqType.HQQ4, 96) == Q.Q8_0 and type_for_width(IsqType.HQQ8, 48) is None
    assert type_for_width(IsqType.FP8, 100) is IsqType.FP8
    assert type_for_width(Q.Q8_K, 576) == Q.Q8_0
    w = torch.randn(8, 96)
    assert quantize_tensor(w, IsqType.HQQ4).qtype == Q.Q8_0      # a GGUFTensor in Q8_0
    assert isinstance(quantize_tensor(torch.randn(8, 48), IsqType.HQQ8), torch.Tensor)   # stays float


def test_gguf_writer_refuses_non_gguf_types():
    from mistralpy.quant.gguf.writer import parse_export_type

    for name in ("HQQ4", "HQQ8", "FP8"):
        with pytest.raises(InvalidRequestError, match="not a GGUF block format"):
            parse_export_type(name)
    with pytest.raises(InvalidRequestError, match="Q8_0"):
        parse_export_type("Q8K")
    assert parse_export_type("Q4K") == Q.Q4_K


def test_linear_and_merged_layers():
    gen = torch.Generator().manual_seed(4)
    parts = [torch.randn(64, 128, generator=gen), torch.randn(80, 128, generator=gen)]
    x = torch.randn(5, 128, generator=gen)
    for name in ("HQQ4", "FP8"):
        layer = MergedLinear(128, [64, 80])
        layer.isq = parse_isq(name)
        for i, p in enumerate(parts):
            layer.weight.weight_loader(layer.weight, p, i)
        assert layer.weight is None and layer.qkernel.qtype is parse_isq(name)   # one joined kernel
        ref = x @ torch.cat([_quant(name, p).dequantize() for p in parts]).t()
        assert torch.allclose(layer(x), ref, rtol=1e-5, atol=1e-5)
        single = Linear(128, 64)
        single.isq = parse_isq(name)
        single.weight.weight_loader(single.weight, parts[0])
        assert torch.allclose(single(x), ref[:, :64], rtol=1e-5, atol=1e-5)
    # Mixed formats (pre-quantized shards): one kernel per shard, outputs side by side.
    mixed = MergedLinear(128, [64, 80])
    mixed.weight.weight_loader(mixed.weight, _quant("HQQ8", parts[0]), 0)
    mixed.weight.weight_loader(mixed.weight, _quant("FP8", parts[1]), 1)
    assert isinstance(mixed.qkernel, ConcatKernel)
    ref = x @ torch.cat([_quant("HQQ8", parts[0]).dequantize(), _quant("FP8", parts[1]).dequantize()]).t()
    assert torch.allclose(mixed(x), ref, rtol=1e-5, atol=1e-5)
