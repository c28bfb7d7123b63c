"""Phi-2, Phi-3, StarCoder2, GLM-4 and SmolLM3 in the engine: batch / chunked-prefill / prefix-cache
invariance, ISQ Q8_0 against float, and the family options the shared parity variants leave out
(Phi-3 longrope with both factor sets, Phi-2 qk_layernorm). Logit parity and 32 greedy tokens
against transformers for the base variants are in test_models_parity.py (VARIANTS phi2, phi3,
starcoder2, glm4, smollm3; measured max |logit diff| 0 to 3e-7 on logits of about +-1)."""
from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from fixtures_models import all_logits, build_checkpoint, load_hf
from mistralpy import Engine, SamplingParams
from mistralpy.layers.linear import Linear

FAMILIES = ["phi2", "phi3", "starcoder2", "glm4", "smollm3"]
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
# Every prompt but the 3- and 5-token ones is longer than the variants' sliding windows of 8.
LENGTHS = [5, 37, 64, 3, 20]
# Max |logit - float logit| for ISQ Q8_0 on these tiny models (logits span about +-1). Measured
# 0.0007 (StarCoder2: its tied head stays float) to 0.012 (GLM-4); a wrong scale or block layout
# gives errors of the logits' size.
Q8_0_BOUND = 0.03


def _prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 4096, (n,), generator=g).tolist() for n in lengths]


def _tokens(results) -> list[list[int]]:
    return [r.outputs[0].token_ids for r in results]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory, tokenizer_dir):
    return request.param, build_checkpoint(tmp_path_factory.mktemp(request.param), request.param, tokenizer_dir)


def test_batch_chunked_prefill_and_prefix_cache_give_the_same_tokens(family):
    name, path = family
    prompts = _prompts(LENGTHS)
    system = _prompts([64], seed=5)[0]
    with_prefix = [system + [11, 12, 13], system + [21, 22]]
    with Engine(str(path), dtype="f32", num_kv_blocks=128, max_model_len=512) as engine:
        alone = [_tokens(engine.generate(p, GREEDY))[0] for p in prompts]
        assert _tokens(engine.generate(prompts, GREEDY)) == alone, f"{name}: mixed batch"
        first = engine.generate(with_prefix[0], GREEDY)[0]
        hits = engine.core.kv.pool.prefix_hits
        second = engine.generate(with_prefix[1], GREEDY)[0]
        assert engine.core.kv.pool.prefix_hits - hits == 4 and second.num_cached_tokens == 64, name
    # 16-token steps: every prompt but the shortest is prefilled in chunks; no prefix cache.
    with Engine(str(path), dtype="f32", num_kv_blocks=128, max_model_len=512, max_num_batched_tokens=16,
                enable_prefix_caching=False) as chunked:
        assert _tokens(chunked.generate(prompts, GREEDY)) == alone, f"{name}: chunked prefill"
        assert _tokens(chunked.generate(with_prefix, GREEDY)) == [first.outputs[0].token_ids,
                                                                   second.outputs[0].token_ids], f"{name}: prefix hit"


def test_isq_q8_0_close_to_float(family):
    name, path = family
    ids = _prompts([40], seed=2)[0]
    with Engine(str(path), dtype="f32", num_kv_blocks=64, max_model_len=512) as engine:
        base = all_logits(engine, ids)
    with Engine(str(path), dtype="f32", num_kv_blocks=64, max_model_len=512, isq="Q8_0") as engine:
        model = engine.core.runner.model
        kinds = {m.qkernel.qtype for m in model.modules() if isinstance(m, Linear) and m.qkernel is not None}
        assert kinds == {Q.Q8_0}, name
        logits = all_logits(engine, ids)
        out = engine.generate(ids[:12], GREEDY)[0].outputs[0].token_ids
        assert len(out) == 16
    err = (logits - base).abs().max().item()
    assert 0 < err < Q8_0_BOUND, f"{name}: {err:.4f}"


def _parity(path, ids: list[int], max_model_len: int) -> float:
    with Engine(str(path), dtype="f32", num_kv_blocks=64, max_model_len=max_model_len) as engine:
        ours = all_logits(engine, ids)
    with torch.no_grad():
        ref = load_hf(path)(torch.tensor([ids])).logits[0]
    return (ours - ref).abs().max().item()


# Phi-3-128k-style longrope on a tiny scale: rotary_dim 12 of head_dim 16 (6 factors each),
# original context 32 of 512, so the attention factor is sqrt(1 + ln 16 / ln 32) ~ 1.34.
PHI3_LONGROPE = dict(
    original_max_position_embeddings=32,
    rope_parameters=dict(rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=0.75,
                         short_factor=[1.0, 1.05, 1.2, 1.6, 2.5, 4.0],
                         long_factor=[1.0, 1.5, 3.0, 6.0, 12.0, 20.0]))


def test_phi3_longrope_long_and_short_factors_match_transformers(tmp_path, tokenizer_dir):
    """transformers picks the factor set per forward (long past original_max_position_embeddings);
    we pick it once from max_model_len. A 48-token prompt on a 512-token engine uses the long
    factors in both, a 24-token prompt on a 32-token engine the short ones."""
    path = build_checkpoint(tmp_path / "phi3_longrope", "phi3", tokenizer_dir, sliding_window=None, **PHI3_LONGROPE)
    long_ids, short_ids = _prompts([48, 24], seed=7)
    assert _parity(path, long_ids, max_model_len=512) < 2e-4
    assert _parity(path, short_ids, max_model_len=32) < 2e-4
    # The two factor sets give different logits, so each comparison above tells them apart.
    with Engine(str(path), dtype="f32", num_kv_blocks=64, max_model_len=512) as engine:
        long_run = all_logits(engine, short_ids)
    with Engine(str(path), dtype="f32", num_kv_blocks=64, max_model_len=32) as engine:
        short_run = all_logits(engine, short_ids)
    assert (long_run - short_run).abs().max().item() > 1e-3


def test_phi2_qk_layernorm_matches_transformers(tmp_path, tokenizer_dir):
    path = build_checkpoint(tmp_path / "phi_qk", "phi2", tokenizer_dir, qk_layernorm=True)
    assert _parity(path, _prompts([40], seed=3)[0], max_model_len=512) < 2e-4


def _rewrite_config(path, drop: tuple[str, ...], **set_keys) -> None:
    import json

    cfg = json.loads((path / "config.json").read_text())
    for key in drop:
        cfg.pop(key, None)
    cfg.update(set_keys)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("variant, spelling", [
    # microsoft/phi-2: top-level partial_rotary_factor 0.4 (head_dim 16 -> 6 rotated dims) and rope_theta
    ("phi2", dict(partial_rotary_factor=0.4, rope_theta=10000.0, rope_scaling=None)),
    # Phi-3.5-mini: rope_scaling {"type": "longrope", ...} beside top-level original_max_position_embeddings
    # (the older "su" spelling reads the same here, but transformers 5 rejects it)
    ("phi3", dict(rope_theta=10000.0, original_max_position_embeddings=32, sliding_window=None,
                  rope_scaling={"type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0, 4.0],
                                "long_factor": [1.0, 2.0, 4.0, 6.0, 8.0, 10.0, 14.0, 18.0]})),
    # GLM-4-9B-0414: top-level partial_rotary_factor 0.5
    ("glm4", dict(partial_rotary_factor=0.5, rope_theta=10000.0)),
])
def test_published_config_spellings_match_transformers(tmp_path, tokenizer_dir, variant, spelling):
    """Hub config.json files predate transformers 5's rope_parameters: both must read the same."""
    path = build_checkpoint(tmp_path / variant, variant, tokenizer_dir)
    _rewrite_config(path, ("rope_parameters",), **spelling)
    assert _parity(path, _prompts([40], seed=4)[0], max_model_len=512) < 2e-4
