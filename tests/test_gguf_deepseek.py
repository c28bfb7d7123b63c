"""GGUF `deepseek2` files (DeepSeek V2 / V3) written from tiny checkpoints the way llama.cpp's
converter lays them out: against transformers on the float weights and against llama.cpp on the
same file.

Configs differ from test_models_deepseek's in two places, both for llama.cpp's sake: yarn with
mscale == mscale_all_dim (llama.cpp rotates with an attention factor of 1, as every DeepSeek config
implies), and the V2 file without expert groups (llama.cpp ranks groups V3's way, by the sum of
their two best scores, where V2 takes the best one; our loader follows V2 = transformers).
"""
from __future__ import annotations

import pytest
import torch

from fixtures_gguf import llama_cpp_logits, write_gguf
from fixtures_models import DEEPSEEK_YARN, all_logits, load_hf
from mistralpy import Engine, SamplingParams
from test_models_deepseek import build_deepseek

CONFIGS = {
    "v2_lite": ("deepseek_v2_lite", {"n_group": 1, "topk_group": 1, "topk_method": "greedy"}),
    "v2_groups": ("deepseek_v2", {}),
    "v3": ("deepseek_v3", {"q_lora_rank": 32}),  # 32: Q8_0 blocks fit q_b_proj's rows
}
IDS = torch.randint(3, 4096, (40,), generator=torch.Generator().manual_seed(0)).tolist()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer_dir):
    out = {}
    for key, (variant, extra) in CONFIGS.items():
        path = build_deepseek(tmp_path_factory.mktemp(key), variant, tokenizer_dir, rope_parameters=DEEPSEEK_YARN,
                              **extra)
        with torch.no_grad():
            out[key] = path, load_hf(path)(torch.tensor([IDS])).logits[0]
    return out


def _ours(path) -> tuple[torch.Tensor, str]:
    with Engine(str(path), dtype="f32", num_kv_blocks=64) as engine:
        return all_logits(engine, IDS), type(engine.core.runner.model).__name__


@pytest.mark.parametrize("key, legacy_kv_b", [("v2_lite", False), ("v2_lite", True), ("v3", False), ("v3", True)])
def test_f32_file_matches_transformers_and_llama_cpp(checkpoints, tmp_path, key, legacy_kv_b):
    """legacy_kv_b: one attn_kv_b (converters before llama.cpp's MLA); else attn_k_b + attn_v_b."""
    hf_dir, ref = checkpoints[key]
    path = write_gguf(hf_dir, tmp_path / "model.gguf", legacy_kv_b=legacy_kv_b)
    ours, cls = _ours(path)
    assert cls == ("DeepseekV3ForCausalLM" if key == "v3" else "DeepseekV2ForCausalLM")
    assert (ours - ref).abs().max().item() < 2e-4  # measured ~1.3e-6
    llama = llama_cpp_logits(path, IDS)
    assert (ours - llama).abs().max().item() < 3e-3  # measured 0.7e-3..1.2e-3 (llama.cpp vs HF alike)


def test_v2_expert_groups_follow_transformers(checkpoints, tmp_path):
    hf_dir, ref = checkpoints["v2_groups"]
    ours, _ = _ours(write_gguf(hf_dir, tmp_path / "model.gguf"))
    assert (ours - ref).abs().max().item() < 2e-4


def test_f32_file_greedy_tokens_match_transformers(checkpoints, tmp_path):
    hf_dir, _ = checkpoints["v3"]
    path = write_gguf(hf_dir, tmp_path / "model.gguf")
    ids = IDS[:20]
    with Engine(str(path), dtype="f32", num_kv_blocks=64) as engine:
        got = engine.generate(ids, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))[0].outputs[0]
    with torch.no_grad():
        ref = load_hf(hf_dir).generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                       eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    assert got.token_ids == ref


@pytest.mark.parametrize("key", ["v2_lite", "v3"])
def test_q8_0_file_matches_llama_cpp(checkpoints, tmp_path, key):
    hf_dir, _ = checkpoints[key]
    path = write_gguf(hf_dir, tmp_path / "model.gguf", weight_type="Q8_0")
    ours, _ = _ours(path)
    llama = llama_cpp_logits(path, IDS)
    # llama.cpp quantizes activations to 8 bits in its Q8_0 products: measured 0.038 / 0.040
    assert (ours - llama).abs().max().item() < 0.1
