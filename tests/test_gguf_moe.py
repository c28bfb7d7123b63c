"""GGUF mixture-of-experts files: Mixtral (arch `llama` with experts) and Qwen3-MoE (`qwen3moe`).

Tiny checkpoints (widths 256/512 so K-quants apply, 4 experts, top-2) are written the way
llama.cpp's converter lays out MoE models: stacked `ffn_{gate,up,down}_exps` [E, out, in] and an
F32 router `ffn_gate_inp`. Our logits are compared with transformers (float files) and with
llama.cpp on the same file.
"""
from __future__ import annotations

import gguf
import pytest
import torch
from fixtures_gguf import GGUF_BASE, llama_cpp_logits, llama_quantize, write_gguf
from fixtures_models import all_logits, build_checkpoint, load_hf
from test_models_moe import ExpertUse

from mistralpy import Engine, SamplingParams
from mistralpy.layers.moe import FusedExperts
from mistralpy.loading.gguf_loader import hf_config_from_gguf

IDS = list(range(100, 140))
VARIANTS = {
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    # llama.cpp always renormalises Qwen3-MoE's top-k weights (as the released models do).
    "qwen3_moe": {"head_dim": 64, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 256,
                  "norm_topk_prob": True},
}
ARCH = {"mixtral": ("llama", "MixtralForCausalLM"), "qwen3_moe": ("qwen3moe", "Qwen3MoeForCausalLM")}
# Measured max |ours - llama.cpp| on the F32 files: 3.8e-4 (mixtral), 6.5e-4 (qwen3_moe); llama.cpp
# differs from transformers by the same amounts, ours from transformers by 1.1e-6 / 1.2e-6.
F32_LLAMA_CPP_TOL = 2e-3
# Quantized files: llama.cpp quantizes activations to 8 bits in its matmuls, ours stay float.
# Measured (Q8_0): 0.014 (mixtral), 0.018 (qwen3_moe) on logits spanning about +-1.5.
QUANT_TOL = 0.04


def _engine(path, tokenizer_dir, **kw) -> Engine:
    return Engine(str(path), dtype="f32", num_kv_blocks=64, max_model_len=512, tokenizer=str(tokenizer_dir), **kw)


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("gguf_moe")
    out = {}
    for name, extra in VARIANTS.items():
        hf = build_checkpoint(root / name, name, tokenizer_dir, **GGUF_BASE, **extra)
        out[name] = (hf, write_gguf(hf, root / f"{name}-f32.gguf", "F32"))
    return out


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_layout_is_llama_cpp_s(files, name):
    _, path = files[name]
    reader = gguf.GGUFReader(str(path))
    arch = ARCH[name][0]
    assert reader.fields["general.architecture"].contents() == arch
    assert reader.fields[f"{arch}.expert_count"].contents() == 4
    tensors = {t.name: t for t in reader.tensors}
    gate = tensors["blk.0.ffn_gate_exps.weight"]
    inter = 512 if name == "mixtral" else 256
    assert [int(d) for d in gate.shape] == [256, inter, 4]  # GGUF order: fastest dim first
    assert [int(d) for d in tensors["blk.1.ffn_down_exps.weight"].shape] == [inter, 256, 4]
    assert "blk.0.ffn_gate.weight" not in tensors


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_f32_gguf_matches_transformers_and_llama_cpp(files, tokenizer_dir, name):
    hf_dir, path = files[name]
    hf = load_hf(hf_dir)
    with _engine(path, tokenizer_dir) as engine:
        model = engine.core.runner.model
        assert type(model).__name__ == ARCH[name][1]
        with ExpertUse(model) as use:
            ours = all_logits(engine, IDS)
        use.assert_all_used()
        out = engine.generate(IDS[:20], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    with torch.no_grad():
        ref = hf(torch.tensor([IDS])).logits[0]
        want = hf.generate(torch.tensor([IDS[:20]]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, 20:].tolist()
    assert (ours - ref).abs().max().item() < 2e-4
    assert out[0].outputs[0].token_ids == want
    assert (ours - llama_cpp_logits(path, IDS)).abs().max().item() < F32_LLAMA_CPP_TOL


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_q8_0_gguf_matches_llama_cpp(files, tokenizer_dir, tmp_path, name):
    hf_dir, _ = files[name]
    path = write_gguf(hf_dir, tmp_path / f"{name}-q8_0.gguf", "Q8_0")
    ref = llama_cpp_logits(path, IDS)
    with _engine(path, tokenizer_dir) as engine:
        model = engine.core.runner.model
        experts = [e for block in model.modules() if isinstance(block, FusedExperts) for e in block]
        assert experts and all(e.gate_up_proj.qkernel is not None and e.down_proj.qkernel is not None
                               for e in experts)  # kept in Q8_0 blocks, one kernel per expert
        ours = all_logits(engine, IDS)
    err = (ours - ref).abs().max().item()
    assert err < QUANT_TOL, f"{name}: {err:.4f}"
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.9


def test_q4_k_m_by_llama_cpp_with_mixed_expert_types(files, tokenizer_dir, tmp_path):
    """llama.cpp's Q4_K_M keeps some `ffn_down_exps` in Q6_K: per-expert kernels of both types.

    Its 8-bit activations flip an expert choice at a few positions (measured: 2 of 40, error ~0.2
    there, 0.013-0.021 elsewhere), so most positions, not all, must be close."""
    _, f32_path = files["mixtral"]
    path = llama_quantize(f32_path, tmp_path / "mixtral-q4_k_m.gguf", "Q4_K_M")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert {types["blk.0.ffn_gate_exps.weight"], types["blk.1.ffn_down_exps.weight"]} == {"Q4_K", "Q6_K"}
    ref = llama_cpp_logits(path, IDS)
    with _engine(path, tokenizer_dir) as engine:
        ours = all_logits(engine, IDS)
    per_position = (ours - ref).abs().amax(-1)
    assert (per_position < 0.03).float().mean().item() >= 0.9, per_position
    assert per_position.max().item() < 0.5
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.9


def test_qwen3moe_config_from_metadata():
    """Layers without a router (no `ffn_gate_inp`) become dense `mlp_only_layers`."""
    meta = {"general.architecture": "qwen3moe", "qwen3moe.embedding_length": 256,
            "qwen3moe.attention.head_count": 4, "qwen3moe.feed_forward_length": 512,
            "qwen3moe.block_count": 3, "qwen3moe.vocab_size": 4096, "qwen3moe.expert_count": 8,
            "qwen3moe.expert_used_count": 2, "qwen3moe.expert_feed_forward_length": 128}
    names = {"blk.0.ffn_gate_inp.weight", "blk.2.ffn_gate_inp.weight", "blk.1.ffn_gate.weight"}
    cfg = hf_config_from_gguf(meta, names)
    assert cfg["architectures"] == ["Qwen3MoeForCausalLM"]
    assert (cfg["num_local_experts"], cfg["num_experts_per_tok"], cfg["moe_intermediate_size"]) == (8, 2, 128)
    assert cfg["mlp_only_layers"] == [1] and cfg["norm_topk_prob"] is True
    dense = hf_config_from_gguf({**meta, "general.architecture": "llama",
                                 **{k.replace("qwen3moe.", "llama."): v for k, v in meta.items()
                                    if k.startswith("qwen3moe.") and "expert" not in k}}, set())
    assert dense["architectures"] == ["LlamaForCausalLM"] and "num_local_experts" not in dense
