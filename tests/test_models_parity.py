"""Every architecture variant against transformers in float32: logits and 32 greedy tokens."""
from __future__ import annotations

import pytest
import torch

from fixtures_models import VARIANTS, all_logits as _all_logits, build_checkpoint, load_hf
from mistralpy import Engine, SamplingParams

PROMPT_LEN = 40  # longer than mistral_swa's window of 8, shorter than every rope's original context


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory, tokenizer_dir):
    path = build_checkpoint(tmp_path_factory.mktemp(request.param), request.param, tokenizer_dir)
    engine = Engine(str(path), dtype="f32", num_kv_blocks=64, max_model_len=512)
    yield request.param, path, engine, load_hf(path)
    engine.shutdown()


def _prompt(seed: int = 0, n: int = PROMPT_LEN) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 4096, (n,), generator=g).tolist()


def test_logits_match_transformers(variant):
    name, _, engine, hf = variant
    ids = _prompt()
    ours = _all_logits(engine, ids)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert (ours - ref).abs().max().item() < 2e-4, name


def test_greedy_32_tokens_match_transformers(variant):
    name, _, engine, hf = variant
    ids = _prompt(1, 24)
    out = engine.generate(ids, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))[0].outputs[0]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    assert out.token_ids == ref, name
    assert out.finish_reason == "length"
