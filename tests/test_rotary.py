"""RoPE parity with transformers (the oracle): inv_freq, attention scaling and rotated q/k."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, Phi3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_apply
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding
from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb as phi3_apply

from mistralpy.errors import ModelLoadError
from mistralpy.layers.rotary import (
    compute_inv_freq,
    get_rope,
    partial_rotary_factor_from_config,
    rope_params_from_config,
)

HEAD_DIM = 32
ATOL = 1e-6

_g = torch.Generator().manual_seed(0)
LONG = [1.0 + 3.0 * float(x) for x in torch.rand(HEAD_DIM // 2, generator=_g)]
SHORT = [1.0 + 0.2 * float(x) for x in torch.rand(HEAD_DIM // 2, generator=_g)]

# name -> (max_position_embeddings, rope_parameters in transformers-5 spelling)
CASES = {
    "default": (64, {"rope_type": "default", "rope_theta": 10000.0}),
    "linear": (64, {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
    "llama3": (512, {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 128}),
    "yarn": (128, {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                   "original_max_position_embeddings": 32}),
    "yarn_mscale": (128, {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 0.707,
                          "mscale_all_dim": 1.0, "beta_fast": 24, "beta_slow": 2, "truncate": False,
                          "original_max_position_embeddings": 32}),
    "yarn_attn_factor": (128, {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                               "attention_factor": 1.25, "original_max_position_embeddings": 32}),
    "longrope": (128, {"rope_type": "longrope", "rope_theta": 10000.0, "long_factor": LONG,
                       "short_factor": SHORT, "original_max_position_embeddings": 32}),
}


def _cfg_dict(max_pos: int, rope: dict, **extra) -> dict:
    return dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=HEAD_DIM,
                max_position_embeddings=max_pos, rope_parameters=copy.deepcopy(rope), **extra)


def _hf_config(d: dict) -> LlamaConfig:
    return LlamaConfig(**copy.deepcopy(d))


def _qk(t: int, d: int = HEAD_DIM, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return torch.randn(t, 4, d, generator=g).to(dtype), torch.randn(t, 2, d, generator=g).to(dtype)


def _hf_rotate(emb, apply, positions, q, k):
    cos, sin = emb(q[None], positions[None])
    q_ref, k_ref = apply(q[None], k[None], cos, sin, unsqueeze_dim=2)
    return q_ref[0], k_ref[0]


def _ours(d: dict, **kw):
    theta, scaling = rope_params_from_config(d)
    prf = partial_rotary_factor_from_config(d)
    return get_rope(HEAD_DIM, HEAD_DIM, d["max_position_embeddings"], theta, scaling, torch.float32,
                    partial_rotary_factor=prf, **kw)


@pytest.mark.parametrize("name", sorted(CASES))
def test_inv_freq_and_scaling_match_hf(name):
    max_pos, rope = CASES[name]
    d = _cfg_dict(max_pos, rope)
    cfg = _hf_config(d)
    rope_type = cfg.rope_parameters["rope_type"]
    if rope_type == "default":
        ref, ref_scale = LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
    else:
        # longrope: max_model_len defaults to max_position (128 > original 32) -> long factors,
        # which is what HF picks for a sequence longer than 32
        seq_len = 33 if rope_type == "longrope" else None
        ref, ref_scale = ROPE_INIT_FUNCTIONS[rope_type](cfg, None, seq_len=seq_len)
    ours = _ours(d)
    assert torch.equal(ours.inv_freq, ref), (ours.inv_freq - ref).abs().max()
    assert ours.attention_scaling == ref_scale


@pytest.mark.parametrize("name", sorted(CASES))
def test_rotation_matches_hf(name):
    max_pos, rope = CASES[name]
    d = _cfg_dict(max_pos, rope)
    emb = LlamaRotaryEmbedding(_hf_config(d))
    ours = _ours(d)
    # unsorted positions from several sequences in one flat batch, up to max_pos - 1
    positions = torch.cat([torch.arange(max_pos), torch.tensor([5, 0, max_pos - 1, 17])])
    q, k = _qk(positions.numel())
    q_ref, k_ref = _hf_rotate(emb, llama_apply, positions, q, k)
    q_out, k_out = ours(positions, q, k)
    assert q_out.shape == q.shape and k_out.shape == k.shape and q_out.dtype == q.dtype
    torch.testing.assert_close(q_out, q_ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(k_out, k_ref, atol=ATOL, rtol=0)


def test_longrope_short_factors_when_engine_fits_original():
    max_pos, rope = CASES["longrope"]
    d = _cfg_dict(max_pos, rope)
    cfg = _hf_config(d)
    ours = _ours(d, max_model_len=32)  # <= original_max -> short factors, like HF below 32
    ref, ref_scale = ROPE_INIT_FUNCTIONS["longrope"](cfg, None)  # seq_len None -> short
    assert torch.equal(ours.inv_freq, ref) and ours.attention_scaling == ref_scale
    positions = torch.arange(32)
    q, k = _qk(32)
    q_ref, k_ref = _hf_rotate(LlamaRotaryEmbedding(cfg), llama_apply, positions, q, k)
    q_out, k_out = ours(positions, q, k)
    torch.testing.assert_close(q_out, q_ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(k_out, k_ref, atol=ATOL, rtol=0)
    # default max_model_len = max_position (128 > 32): long factors everywhere, as vLLM
    long_ref, _ = ROPE_INIT_FUNCTIONS["longrope"](cfg, None, seq_len=33)
    assert torch.equal(_ours(d).inv_freq, long_ref)


def test_longrope_phi3_factor_from_lengths():
    # Phi-3 style: no `factor`, top-level original_max_position_embeddings; attention factor from 128/32
    rope = {"rope_type": "longrope", "long_factor": LONG, "short_factor": SHORT}
    d = _cfg_dict(128, rope, original_max_position_embeddings=32)
    d["rope_parameters"]["rope_theta"] = 10000.0
    theta, scaling = rope_params_from_config(d)
    assert scaling["original_max_position_embeddings"] == 32
    cfg = Phi3Config(**{k: v for k, v in copy.deepcopy(d).items()})
    ref, ref_scale = ROPE_INIT_FUNCTIONS["longrope"](cfg, None, seq_len=33)
    ours = get_rope(HEAD_DIM, HEAD_DIM, 128, theta, scaling, torch.float32)
    assert torch.equal(ours.inv_freq, ref) and ours.attention_scaling == ref_scale > 1.0


def test_dynamic_ntk():
    rope = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    d = _cfg_dict(64, rope)
    cfg = _hf_config(d)
    # default: base fixed for max_position * factor (vLLM) == HF's inv_freq at seq_len 128
    ours = _ours(d)
    ref, _ = ROPE_INIT_FUNCTIONS["dynamic"](cfg, None, seq_len=128)
    assert torch.equal(ours.inv_freq, ref)
    assert ours.max_cached_position == 128
    positions = torch.arange(128)
    q, k = _qk(128)
    q_ref, k_ref = _hf_rotate(LlamaRotaryEmbedding(cfg), llama_apply, positions, q, k)
    q_out, k_out = ours(positions, q, k)
    # HF recomputes the base with float32 tensor math at run time (we use float64 python math)
    torch.testing.assert_close(q_out, q_ref, atol=2e-5, rtol=0)
    torch.testing.assert_close(k_out, k_ref, atol=2e-5, rtol=0)
    # an engine capped at the original length: unscaled base, exact HF parity below 64
    capped = _ours(d, max_model_len=64)
    ref64, _ = ROPE_INIT_FUNCTIONS["dynamic"](cfg, None)
    assert torch.equal(capped.inv_freq, ref64)
    positions = torch.arange(64)
    q, k = _qk(64)
    q_ref, k_ref = _hf_rotate(LlamaRotaryEmbedding(cfg), llama_apply, positions, q, k)
    q_out, k_out = capped(positions, q, k)
    torch.testing.assert_close(q_out, q_ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(k_out, k_ref, atol=ATOL, rtol=0)


OLD_SPELLINGS = [
    ({"rope_theta": 5000.0, "rope_scaling": {"type": "linear", "factor": 2.0}},
     {"rope_parameters": {"rope_type": "linear", "rope_theta": 5000.0, "factor": 2.0}}),
    ({"rope_theta": 5000.0, "rope_scaling": {"rope_type": "yarn", "factor": 2.0,
                                             "original_max_position_embeddings": 32}},
     {"rope_parameters": {"type": "yarn", "rope_theta": 5000.0, "factor": 2.0,
                          "original_max_position_embeddings": 32}}),
    ({"rope_theta": 5000.0, "rope_scaling": None}, {"rope_parameters": {"rope_type": "default", "rope_theta": 5000.0}}),
    ({"rope_theta": 5000.0}, {"rope_parameters": {"rope_theta": 5000.0}}),
]


@pytest.mark.parametrize("old,new", OLD_SPELLINGS)
def test_both_config_spellings_parse_the_same(old, new):
    base = {"max_position_embeddings": 64}
    assert rope_params_from_config({**base, **old}) == rope_params_from_config({**base, **new})


def test_parse_details():
    assert rope_params_from_config({}) == (10000.0, None)
    theta, s = rope_params_from_config({"rope_theta": 1e6, "rope_scaling": {"type": "linear", "factor": 2}})
    assert theta == 1e6 and s == {"rope_type": "linear", "factor": 2}
    # llama3 without original_max: filled from max_position_embeddings, as transformers does
    _, s = rope_params_from_config({"max_position_embeddings": 99, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}})
    assert s["original_max_position_embeddings"] == 99
    # partial rotary factor: inside rope_parameters (transformers 5) or top level
    assert partial_rotary_factor_from_config({"rope_parameters": {"partial_rotary_factor": 0.25}}) == 0.25
    assert partial_rotary_factor_from_config({"partial_rotary_factor": 0.5}) == 0.5
    assert partial_rotary_factor_from_config({}) == 1.0
    _, s = rope_params_from_config({"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}})
    assert s is None
    # nested by layer type
    nested = {"rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                  "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}
    assert rope_params_from_config(nested, layer_type="full_attention") == (1e6, {"rope_type": "linear", "factor": 8.0})
    assert rope_params_from_config(nested, layer_type="sliding_attention") == (1e4, None)
    with pytest.raises(ModelLoadError):
        rope_params_from_config(nested)
    with pytest.raises(ModelLoadError):
        rope_params_from_config({"rope_scaling": {"type": "nonsense", "factor": 2}})


def test_partial_rotary_default_matches_phi3():
    d = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
    cfg = Phi3Config(**copy.deepcopy(d))
    ours = get_rope(HEAD_DIM, HEAD_DIM, 64, *rope_params_from_config(d), torch.float32,
                    partial_rotary_factor=partial_rotary_factor_from_config(d))
    assert ours.rotary_dim == 16
    positions = torch.arange(64)
    q, k = _qk(64)
    q_ref, k_ref = _hf_rotate(Phi3RotaryEmbedding(cfg), phi3_apply, positions, q, k)
    q_out, k_out = ours(positions, q, k)
    torch.testing.assert_close(q_out, q_ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(k_out, k_ref, atol=ATOL, rtol=0)
    assert torch.equal(q_out[..., 16:], q[..., 16:])  # pass-through dims untouched


@pytest.mark.parametrize("name", ["yarn", "linear", "llama3"])
def test_partial_rotary_scaled_matches_hf(name):
    max_pos, rope = CASES[name]
    rope = {**rope, "partial_rotary_factor": 0.5}
    d = _cfg_dict(max_pos, rope)
    cfg = _hf_config(d)
    ref, ref_scale = ROPE_INIT_FUNCTIONS[rope["rope_type"]](cfg, None)
    ours = _ours(d)
    assert ours.rotary_dim == 16
    assert torch.equal(ours.inv_freq, ref) and ours.attention_scaling == ref_scale
    positions = torch.arange(max_pos)
    q, k = _qk(max_pos)
    q_ref, k_ref = _hf_rotate(LlamaRotaryEmbedding(cfg), phi3_apply, positions, q, k)
    q_out, k_out = ours(positions, q, k)
    torch.testing.assert_close(q_out, q_ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(k_out, k_ref, atol=ATOL, rtol=0)


def test_cache_grows_for_positions_beyond_max():
    max_pos, rope = CASES["yarn"]
    d = _cfg_dict(max_pos, rope)
    ours = _ours(d)
    assert ours.max_cached_position == 128
    positions = torch.tensor([0, 3, 127, 128, 300, 1000])
    q, k = _qk(positions.numel())
    q_out, k_out = ours(positions, q, k)
    assert ours.max_cached_position > 1000
    q_ref, k_ref = _hf_rotate(LlamaRotaryEmbedding(_hf_config(d)), llama_apply, positions, q, k)
    torch.testing.assert_close(q_out, q_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(k_out, k_ref, atol=1e-5, rtol=0)
    ours.ensure_cache(5000)
    assert ours.max_cached_position == 5001


def test_huge_context_configs_build_small_tables_and_grow():
    """A 10M-position config (Llama 4's) builds INITIAL_CACHE rows, not 10M; positions past them
    grow the table and rotate as transformers does."""
    from mistralpy.layers.rotary import INITIAL_CACHE

    d = _cfg_dict(10_000_000, {"rope_type": "default", "rope_theta": 500000.0})
    ours = _ours(d, max_model_len=10_000_000)
    assert ours.max_cached_position == INITIAL_CACHE
    positions = torch.tensor([5, INITIAL_CACHE + 7, 3 * INITIAL_CACHE])
    q, k = _qk(positions.numel())
    q_out, k_out = ours(positions, q, k)
    assert INITIAL_CACHE < ours.max_cached_position < 10 * INITIAL_CACHE
    q_ref, k_ref = _hf_rotate(LlamaRotaryEmbedding(_hf_config(d)), llama_apply, positions, q, k)
    torch.testing.assert_close(q_out, q_ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(k_out, k_ref, atol=1e-4, rtol=0)


def test_half_precision_and_flat_layout():
    max_pos, rope = CASES["llama3"]
    ours = _ours(_cfg_dict(max_pos, rope))
    positions = torch.tensor([0, 1, 2, 200, 511])
    q, k = _qk(5)
    q32, k32 = ours(positions, q, k)
    qb, kb = ours(positions, q.bfloat16(), k.bfloat16())
    assert qb.dtype == torch.bfloat16 and kb.dtype == torch.bfloat16
    # rotation in float32, one rounding at the end
    q_ref = ours(positions, q.bfloat16().float(), k.bfloat16().float())[0].bfloat16()
    assert torch.equal(qb, q_ref)
    assert (qb.float() - q32).abs().max() < 0.05
    # [T, H*D] is accepted and equals the [T, H, D] result
    qf, kf = ours(positions, q.reshape(5, -1), k.reshape(5, -1))
    assert torch.equal(qf.view_as(q32), q32) and torch.equal(kf.view_as(k32), k32)
    # model.to(bfloat16) must not lower the cache's precision
    ours.to(torch.bfloat16)
    assert torch.equal(ours(positions, q, k)[0], q32)


def test_compute_inv_freq_rejects_unknown_type():
    with pytest.raises(ModelLoadError):
        compute_inv_freq(32, 10000.0, {"rope_type": "bogus"}, 64)


def test_identical_ropes_are_shared():
    max_pos, rope = CASES["llama3"]
    d = _cfg_dict(max_pos, rope)
    a, b = _ours(d), _ours(d)
    assert a is b  # per-layer get_rope calls share one cos/sin cache
    assert _ours(d, max_model_len=100) is not a
    assert _ours(_cfg_dict(max_pos, CASES["linear"][1])) is not a
