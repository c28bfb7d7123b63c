"""In-situ quantization: names, width fallbacks, error against float per type, memory, stability."""
from __future__ import annotations

import pytest
from gguf import GGMLQuantizationType as Q

from fixtures_gguf import GGUF_BASE
from fixtures_models import all_logits, build_checkpoint
from mistralpy import Engine, SamplingParams
from mistralpy.errors import InvalidRequestError
from mistralpy.layers.linear import Linear
from mistralpy.loading.model_loader import weight_bytes
from mistralpy.quant.isq import parse_isq, type_for_width

IDS = list(range(100, 140))

# Max |logit - float logit| allowed per type on the tiny random model (logits span ~+-1.5).
# Measured: Q8_0 0.02, Q8K 0.023, HQQ8 0.020, FP8 0.086, HQQ4 0.30, Q6K 0.07, Q5K 0.14, Q4K 0.24,
# Q4_0 0.30, IQ4_XS 0.28, Q3K 0.46, Q2K 0.95.
BOUNDS = {"Q8K": 0.05, "HQQ8": 0.05, "FP8": 0.2, "HQQ4": 0.5, "Q8_0": 0.05,
          "Q6K": 0.15, "Q5K": 0.3, "Q4K": 0.45, "Q4_0": 0.5, "IQ4_XS": 0.5, "Q3K": 0.8, "Q2K": 1.6}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer_dir):
    return build_checkpoint(tmp_path_factory.mktemp("isq"), "llama", tokenizer_dir, **GGUF_BASE)


@pytest.fixture(scope="module")
def float_run(checkpoint):
    with Engine(str(checkpoint), dtype="f32", num_kv_blocks=64) as engine:
        return all_logits(engine, IDS), weight_bytes(engine.core.runner.model)


def test_names_and_shorthand():
    assert parse_isq("Q4K") == Q.Q4_K
    assert parse_isq("q4_k") == Q.Q4_K
    assert parse_isq("Q8_0") == Q.Q8_0
    assert parse_isq(4) == Q.Q4_K and parse_isq("8") == Q.Q8_0 and parse_isq("2") == Q.Q2_K
    assert parse_isq(None) is None
    assert parse_isq("Q8K") == Q.Q8_K and parse_isq("HQQ4").name == "HQQ4" and parse_isq("F8E4M3").name == "FP8"
    with pytest.raises(InvalidRequestError, match="not supported yet"):
        parse_isq("AFQ4")
    with pytest.raises(InvalidRequestError, match="unknown ISQ type"):
        parse_isq("Q7K")


def test_width_fallbacks_follow_llama_cpp():
    assert type_for_width(Q.Q4_K, 512) == Q.Q4_K
    assert type_for_width(Q.Q4_K, 576) == Q.Q5_0
    assert type_for_width(Q.Q6_K, 576) == Q.Q8_0
    assert type_for_width(Q.Q2_K, 96) == Q.IQ4_NL
    assert type_for_width(Q.Q4_0, 48) is None


@pytest.mark.parametrize("isq", sorted(BOUNDS))
def test_error_against_float_within_bounds(checkpoint, float_run, isq):
    base, float_bytes = float_run
    with Engine(str(checkpoint), dtype="f32", num_kv_blocks=64, isq=isq) as engine:
        model = engine.core.runner.model
        kinds = {m.qkernel.qtype for m in model.modules() if isinstance(m, Linear) and m.qkernel is not None}
        assert kinds == {parse_isq(isq)}  # widths of 256/512: no fallback, every linear layer quantized
        assert model.model.embed_tokens.weight is not None  # the embedding stays in float
        logits = all_logits(engine, IDS)
        err = (logits - base).abs().max().item()
        assert err < BOUNDS[isq], f"{isq}: {err:.3f}"
        assert weight_bytes(model) < float_bytes
        # Greedy decoding of a quantized model is deterministic across runs and batch shapes.
        sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
        alone = engine.generate(IDS[:24], sp)[0].outputs[0].token_ids
        batched = engine.generate([IDS[:24], IDS[5:30], IDS[:7]], sp)[0].outputs[0].token_ids
        assert alone == batched


def test_q8_0_keeps_greedy_tokens(checkpoint, float_run):
    base, _ = float_run
    with Engine(str(checkpoint), dtype="f32", num_kv_blocks=64, isq="Q8_0") as engine:
        agree = (all_logits(engine, IDS).argmax(-1) == base.argmax(-1)).float().mean().item()
    assert agree >= 0.95


def test_narrow_model_falls_back(tmp_path, tokenizer_dir):
    path = build_checkpoint(tmp_path / "narrow", "llama", tokenizer_dir)  # hidden 64, ffn 128
    with Engine(str(path), dtype="f32", num_kv_blocks=64, isq="Q4K") as engine:
        kinds = {m.qkernel.qtype for m in engine.core.runner.model.modules()
                 if isinstance(m, Linear) and m.qkernel is not None}
        assert kinds == {Q.Q5_0}
        out = engine.generate(IDS[:10], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
        assert len(out[0].outputs[0].token_ids) == 4


def test_topology_ranges_and_regexes(checkpoint, tmp_path):
    from mistralpy.quant.topology import Topology

    (tmp_path / "topo.yml").write_text(
        "0-1:\n  isq: Q4K\n1-2:\n  isq: Q8_0\n'/mlp\\.down_proj/':\n  isq: Q6K\n'/layers\\.1\\.self_attn\\.o_proj/':\n"
        "  isq: none\n")
    topo = Topology.from_file(tmp_path / "topo.yml")
    assert topo.isq_for("model.layers.0.self_attn.qkv_proj", None) == Q.Q4_K
    assert topo.isq_for("model.layers.1.self_attn.qkv_proj", None) == Q.Q8_0
    assert topo.isq_for("model.layers.0.mlp.down_proj", Q.Q2_K) == Q.Q6_K
    assert topo.isq_for("model.layers.1.self_attn.o_proj", Q.Q2_K) is None
    with Engine(str(checkpoint), dtype="f32", num_kv_blocks=64, topology=str(tmp_path / "topo.yml")) as engine:
        kinds = {name: (m.qkernel.qtype if m.qkernel is not None else None)
                 for name, m in engine.core.runner.model.named_modules() if isinstance(m, Linear)}
        assert kinds["model.layers.0.self_attn.qkv_proj"] == Q.Q4_K
        assert kinds["model.layers.1.mlp.gate_up_proj"] == Q.Q8_0
        assert kinds["model.layers.1.mlp.down_proj"] == Q.Q6_K
        assert kinds["model.layers.1.self_attn.o_proj"] is None
        assert len(engine.generate(IDS[:8], SamplingParams(max_tokens=3, ignore_eos=True))[0].outputs[0].token_ids) == 3


@pytest.mark.parametrize("text, match", [
    ("0-4: Q4K\n", "must be a mapping"),
    ("4-2:\n  isq: Q4K\n", "neither a layer range"),
    ("'/[/':\n  isq: Q4K\n", "regex"),
    ("0-4:\n  isq: Q9K\n", "unknown ISQ type"),
    ("0-4:\n  bits: 4\n", "unknown keys"),
    ("0-4:\n  device: cuda[1]\n", "not supported yet"),
])
def test_bad_topology_is_a_clear_error(checkpoint, tmp_path, text, match):
    (tmp_path / "t.yml").write_text(text)
    with pytest.raises(InvalidRequestError, match=match):
        Engine(str(checkpoint), dtype="f32", num_kv_blocks=64, topology=str(tmp_path / "t.yml"))
