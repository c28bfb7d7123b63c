"""Opt-in torch.compile of decode steps (worker/compile.py) gives what the eager path gives.

float32 on tiny checkpoints: the compiled decoder layer (fused norm / rotary / KV write /
attention / activation) must reproduce eager greedy tokens alone and in a mixed batch, across
the single-sequence graph and the batched one. One engine per variant; compiling costs ~10-20 s.
"""
from __future__ import annotations

import pytest

from fixtures_models import build_checkpoint
from mistralpy import Engine, SamplingParams

SP = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
PROMPTS = [list(range(10, 50)), list(range(200, 217)), list(range(900, 905)), list(range(1200, 1290))]


@pytest.mark.parametrize("variant, extra", [("llama_gqa4_headdim", {}), ("mistral_swa", {})])
def test_compiled_decode_matches_eager(tmp_path, tokenizer_dir, variant, extra):
    path = build_checkpoint(tmp_path / variant, variant, tokenizer_dir, **extra)
    with Engine(str(path), dtype="f32", num_kv_blocks=64, max_model_len=256) as eager:
        alone = eager.generate(PROMPTS[0], SP)[0].outputs[0].token_ids
        batch = [r.outputs[0].token_ids for r in eager.generate(PROMPTS, SP)]
    with Engine(str(path), dtype="f32", num_kv_blocks=64, max_model_len=256, compile=True) as compiled:
        assert compiled.generate(PROMPTS[0], SP)[0].outputs[0].token_ids == alone
        assert [r.outputs[0].token_ids for r in compiled.generate(PROMPTS, SP)] == batch
        decode = compiled.core.runner.compiled
        assert decode._graphs == {False, True}  # both graphs really compiled and used
        assert compiled.core.runner.model.model.decode_layers is decode  # no fallback to eager
