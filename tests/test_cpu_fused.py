"""The fused CPU ops (kernels/cpu/fused.cpp via layers/cpu_fused.py) against the layers' torch paths.

Reference: the same layer with the extension switched off (its torch code, the fallback).
Tolerances, and why:
- RoPE: bitwise equal in every dtype (same float32 products and sums, one rounding).
- RMSNorm: <= 1 ulp in bf16/fp16 (the sum of squares is added in another order, which can move
  1/rms by an f32 ulp and, rarely, a rounding; measured: 1 bf16 value in 300 to none in 36k) and
  1e-6 relative in float32 (F.rms_norm; measured 3e-7).
- act_and_mul: <= 2 ulps in bf16/fp16 (it rounds act(gate) to the dtype before the product like
  torch, but its exp can differ by an f32 ulp and move that rounding, which the product scales
  to up to 2 ulps of the result; measured: almost all equal) and 1e-6 of the output's scale in
  float32 (the same exp ulp; in gelu-tanh's negative tail torch's 1 + tanh(u) cancels while the
  kernel computes x * sigmoid(2u): that is tested separately against float64). The single-rounding
  mode (hf_rounding=False) is checked against float64.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from mistralpy.kernels import cpu as cpu_ext
from mistralpy.layers import cpu_fused
from mistralpy.layers.activation import act_and_mul, gelu_tanh
from mistralpy.layers.norm import RMSNorm
from mistralpy.layers.rotary import get_rope

pytestmark = pytest.mark.skipif(not cpu_fused.available(), reason="CPU extension could not be built")
ACTS = [F.silu, gelu_tanh, F.gelu, F.relu]
HALF = (torch.bfloat16, torch.float16)


@contextlib.contextmanager
def torch_path():
    """The layers' torch code, as with MISTRALPY_CPU_EXT=0."""
    saved = cpu_fused._state["ok"]
    cpu_fused._state["ok"] = False
    try:
        yield
    finally:
        cpu_fused._state["ok"] = saved


def ulp(v: torch.Tensor) -> torch.Tensor:
    """The spacing of v's dtype at |v| (its smallest normal spacing below the normal range)."""
    fi = torch.finfo(v.dtype)
    a = v.float().abs().clamp_min(fi.tiny)
    return torch.exp2(torch.floor(torch.log2(a))) * fi.eps


def assert_close(new: torch.Tensor, ref: torch.Tensor, rel32: float = 1e-6, ulps: int = 1) -> None:
    assert new.dtype == ref.dtype and new.shape == ref.shape
    if ref.numel() == 0:
        return
    d = (new.float() - ref.float()).abs()
    if ref.dtype in HALF:
        # 1 ulp; the 2e-6 floor covers values near 0, where torch's own float32 error (gelu-tanh's
        # 1 + tanh cancels: it returns 0 for ~-5e-7) or its second rounding in fp16 subnormals is larger
        bound = ulps * ulp(ref) + 2e-6
        assert (d <= bound).all(), f"{int((d > bound).sum())} values off by more than {ulps} ulp"
    else:
        bound = rel32 * ref.abs() + rel32 * ref.abs().max()
        assert (d <= bound).all(), f"max diff {d.max().item()}"


def _strided(shape: tuple[int, ...], dtype: torch.dtype, scale: float = 3.0) -> torch.Tensor:
    """A non-contiguous view (rows of a wider buffer), as qkv / latent splits are."""
    *lead, h = shape
    return (torch.randn(*lead, h + 24) * scale).to(dtype)[..., 8:8 + h]


# ------------------------------------------------------------------------------------ RMSNorm


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("shape", [(1, 576), (7, 2048), (3, 100), (2, 9, 64), (4, 7), (0, 576)])
def test_rms_norm_matches_torch(dtype, offset, shape):
    torch.manual_seed(0)
    norm = RMSNorm(shape[-1], 1e-5, offset)
    norm.weight.data = (torch.randn(shape[-1]) * 0.5 + (0.0 if offset else 1.0)).to(dtype)
    for x in ((torch.randn(*shape) * 3).to(dtype), _strided(shape, dtype)):
        new = norm(x)
        with torch_path():
            ref = norm(x)
        assert new.is_contiguous()
        assert_close(new, ref)
        if dtype == torch.bfloat16 and x.numel():  # a differing value is rare (measured: 1 in 300, 0 in 36k)
            assert (new != ref).float().mean() < 1e-2


def test_rms_norm_gemma_weight_in_float32_and_mixed_fallback():
    torch.manual_seed(1)
    x = torch.randn(3, 256).bfloat16()
    gemma = RMSNorm(256, 1e-6, 1.0)
    gemma.weight.data = torch.randn(256) * 0.1              # float32 weight, bf16 activations
    new = gemma(x)
    with torch_path():
        ref = gemma(x)
    assert new.dtype == torch.bfloat16
    assert_close(new, ref)
    plain = RMSNorm(256, 1e-6)                               # offset 0, weight dtype != x dtype:
    plain.weight.data = torch.randn(256)                     # torch promotes, the op is not used
    out = plain(x)
    with torch_path():
        assert torch.equal(out, plain(x)) and out.dtype == torch.float32


def test_rms_norm_is_one_op_with_known_values():
    x = torch.tensor([[3.0, 4.0] * 32]).bfloat16()          # mean(x^2) = 12.5
    norm = RMSNorm(64, 0.0)
    norm.weight.data = torch.full((64,), 2.0).bfloat16()
    with torch.autograd.profiler.profile() as prof:
        out = norm(x)
    names = [e.name for e in prof.function_events]
    assert f"{cpu_ext.namespace()}::rms_norm" in names and "aten::mean" not in names
    want = (torch.tensor([3.0, 4.0] * 32) / 12.5 ** 0.5).bfloat16() * 2
    assert torch.equal(out[0], want)


# ------------------------------------------------------------------------------ act_and_mul


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("act", ACTS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("shape", [(1, 3072), (5, 200), (2, 3, 80), (0, 64)])
def test_act_and_mul_matches_torch(dtype, act, shape):
    torch.manual_seed(2)
    for x in ((torch.randn(*shape) * 4).to(dtype), _strided(shape, dtype, 4.0)):
        new = act_and_mul(x, act)
        with torch_path():
            ref = act_and_mul(x, act)
        assert new.is_contiguous()
        assert_close(new, ref, ulps=2)
        if act is F.relu:  # one exact rounding either way
            assert torch.equal(new, ref)


def test_act_and_mul_gelu_tanh_tail_is_accurate():
    """x * sigmoid(2u) keeps its relative accuracy where torch's 1 + tanh(u) cancels (x << 0)."""
    g = torch.linspace(-9, -2, 512)
    x = torch.cat((g, torch.ones_like(g)))[None]
    new = act_and_mul(x, gelu_tanh)[0].double()
    g = g.double()
    ref = g / (1 + torch.exp(-2 * 0.7978845608028654 * (g + 0.044715 * g**3)))  # the same, in float64
    assert ((new - ref).abs() / ref.abs()).max() < 1e-5
    with torch_path():
        old = act_and_mul(x, gelu_tanh)[0].double()
    assert ((old - ref).abs() / ref.abs()).max() > 1e-2  # the torch path's cancellation, for contrast


@pytest.mark.parametrize("code,act,bound", [(0, F.silu, 0.51), (1, gelu_tanh, 0.51), (2, F.gelu, 0.6)])
def test_act_and_mul_single_rounding_mode(code, act, bound):
    """hf_rounding=False rounds once: within half an ulp (+ exp's f32 error; + erf's 1.5e-7 for
    torch's Abramowitz-Stegun gelu) of the float64 value, where HF's form is off by up to 1.5 ulps."""
    torch.manual_seed(5)
    x = (torch.randn(16, 2 * 512) * 3).bfloat16()
    g, u = x.double().chunk(2, -1)
    exact = act(g) * u
    once = cpu_fused.act_and_mul(x, code, False).double()
    twice = cpu_fused.act_and_mul(x, code).double()
    big = exact.abs() > 1e-3                                # (the erf and tanh forms' own error below)
    err_once = ((once - exact).abs() / ulp(exact.bfloat16()))[big]
    err_twice = ((twice - exact).abs() / ulp(exact.bfloat16()))[big]
    assert err_once.max() <= bound and err_twice.max() > 0.9


def test_act_and_mul_unknown_activation_uses_torch():
    x = torch.randn(2, 32)
    new = act_and_mul(x, torch.tanh)
    assert torch.equal(new, torch.tanh(x[:, :16]) * x[:, 16:])


def test_act_and_mul_special_values():
    # (no infinities: torch's gelu(inf) is nan where the kernel's is inf)
    g = torch.tensor([float("nan"), 0.0, -0.0, 100.0, -100.0, 1e4, -1e4, 1e-30, -1e-30])
    x = torch.cat((g, torch.ones_like(g)))[None]
    for act in ACTS:
        new = act_and_mul(x, act)
        with torch_path():
            ref = act_and_mul(x, act)
        assert torch.equal(new.isnan(), ref.isnan()), act.__name__
        fin = ~ref.isnan()
        assert torch.allclose(new[fin], ref[fin], rtol=1e-6, atol=1e-30), act.__name__


# ------------------------------------------------------------------------------------- RoPE


def _qk(t: int, hq: int, hk: int, d: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    qkv = torch.randn(t, (hq + 2 * hk) * d).to(dtype)  # q, k, v split views of one matmul output
    return qkv[:, : hq * d].view(t, hq, d), qkv[:, hq * d: (hq + hk) * d].view(t, hk, d)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("head_dim,rotary_dim", [(64, 64), (64, 32), (80, 40), (128, 64), (96, 24)])
@pytest.mark.parametrize("t", [1, 5, 0])
def test_rope_matches_torch_bitwise(dtype, head_dim, rotary_dim, t):
    torch.manual_seed(3)
    rope = get_rope(head_dim, rotary_dim, 256, 10000.0, {"rope_type": "yarn", "factor": 4.0,
                                                        "original_max_position_embeddings": 64}, torch.float32)
    q, k = _qk(t, 9, 3, head_dim, dtype)
    q0, k0 = q.clone(), k.clone()
    pos = torch.randint(0, 200, (t,))
    new = rope(pos, q, k)
    with torch_path():
        rope._step_cache = None
        ref = rope(pos, q, k)
    assert torch.equal(q, q0) and torch.equal(k, k0)          # inputs untouched
    for a, b in zip(new, ref):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def test_rope_flat_inputs_int32_positions_and_cache_growth():
    rope = get_rope(64, 64, 16, 10000.0, None, torch.float32)
    q, k = torch.randn(3, 4 * 64).bfloat16(), torch.randn(3, 2 * 64).bfloat16()
    pos = torch.tensor([3, 40, 100], dtype=torch.int32)      # past the 16 cached positions: grows
    new = rope(pos, q, k)
    assert rope.max_cached_position > 100
    with torch_path():
        rope._step_cache = None
        ref = rope(pos.long(), q, k)
    assert new[0].shape == (3, 256) and all(torch.equal(a, b) for a, b in zip(new, ref))
    for step in range(3):                                    # a new positions tensor every step
        pos = torch.tensor([101 + step])
        out = rope(pos, q[:1], k[:1])
        with torch_path():
            rope._step_cache = None
            assert torch.equal(out[0], rope(pos, q[:1], k[:1])[0])


def test_rope_refuses_positions_past_the_cache():
    rope = get_rope(64, 64, 16, 10000.0, None, torch.float32)
    rope.check_bounds = False                               # the caller promised ensure_cache
    q, k = _qk(1, 2, 1, 64, torch.float32)
    with pytest.raises(RuntimeError, match="outside the cos/sin cache"):
        rope(torch.tensor([rope.max_cached_position]), q, k)


def test_rope_deepseek_style_views():
    """q_pe a split of [T, H, nope + rope], k_pe an unsqueezed split of the latent projection."""
    rope = get_rope(64, 64, 512, 10000.0, None, torch.float32)
    q = torch.randn(2, 4, 128 + 64).bfloat16()
    kv = torch.randn(2, 512 + 64).bfloat16()
    q_pe = q.split([128, 64], dim=-1)[1]
    k_pe = kv.split([512, 64], dim=-1)[1].unsqueeze(1)
    pos = torch.tensor([7, 300])
    new = rope(pos, q_pe, k_pe)
    with torch_path():
        rope._step_cache = None
        ref = rope(pos, q_pe, k_pe)
    assert all(torch.equal(a, b) for a, b in zip(new, ref))


# ------------------------------------------------------------------ fallback, compile, portable


def test_not_used_with_autograd_or_when_disabled():
    x = torch.randn(2, 64, requires_grad=True)
    assert not cpu_fused.usable(x)
    assert cpu_fused.usable(x.detach())
    with torch_path():
        assert not cpu_fused.usable(x.detach())


def test_compile_traces_the_torch_path_and_the_fakes_work():
    norm = RMSNorm(64, 1e-6)
    norm.weight.data = torch.randn(64).bfloat16()
    rope = get_rope(32, 32, 64, 10000.0, None, torch.float32)
    seen: list[str] = []

    def backend(gm, inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes)
        return gm

    def layer(x, pos):
        h = act_and_mul(norm(x).repeat(1, 2), F.silu)
        q, k = rope(pos, h.view(2, 2, 32), h.view(2, 2, 32)[:, :1])
        return q.sum() + k.sum()

    x, pos = torch.randn(2, 64).bfloat16(), torch.tensor([1, 2])
    torch.compile(layer, backend=backend, fullgraph=True)(x, pos)
    assert seen and not any("mistralpy_cpu" in s for s in seen)  # inductor gets the torch ops

    w = norm.weight
    def direct(x, pos):
        q, k = cpu_fused.rope(pos, x.view(2, 2, 32), x.view(2, 2, 32), rope._cos, rope._sin)
        return cpu_fused.act_and_mul(cpu_fused.rms_norm(x, w, 1e-6, 0.0), 0, False), q, k

    got = torch.compile(direct, backend="aot_eager", fullgraph=True)(x, pos)
    want = direct(x, pos)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_every_build_matches(variant_ops):
    """Each ISA build the CPU runs (AVX-512 masked vectors, AVX2 8-lane loops, scalar) against the
    layers' torch code, with the tolerances above (the scalar build too: it defines behaviour on ARM)."""
    variant, ops = variant_ops
    assert cpu_ext.isa(cpu_ext.variant_namespace(variant), "fused_isa") == variant
    torch.manual_seed(4)
    rope = get_rope(80, 40, 64, 10000.0, None, torch.float32)
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        x = _strided((5, 100), dtype)
        for offset in (0.0, 1.0):
            norm = RMSNorm(100, 1e-6, offset)
            norm.weight.data = (torch.randn(100) * 0.5 + (0.0 if offset else 1.0)).to(dtype)
            with torch_path():
                ref = norm(x)
            assert_close(ops.rms_norm(x, norm.weight, 1e-6, offset), ref)
        gu = _strided((3, 2 * 70), dtype, 4.0)
        g, u = gu.double().chunk(2, -1)
        for code, act in enumerate(ACTS):
            with torch_path():
                ref = act_and_mul(gu, act)
            assert_close(ops.act_and_mul(gu, code, True), ref, ulps=2, rel32=2e-6)
            if dtype == torch.bfloat16:  # one rounding: ~half an ulp from the float64 value (as above)
                exact = act(g) * u
                once = ops.act_and_mul(gu, code, False)
                big = exact.abs() > 1e-3
                assert (((once.double() - exact).abs() / ulp(exact.to(dtype)))[big] <= 0.6).all(), (dtype, act)
        q, k = _qk(4, 3, 2, 80, dtype)
        pos = torch.tensor([0, 5, 63, 17])
        with torch_path():
            rope._step_cache = None
            ref = rope(pos, q, k)
        for a, b in zip(ops.rope(pos, q, k, rope._cos, rope._sin), ref):
            assert torch.equal(a, b)
