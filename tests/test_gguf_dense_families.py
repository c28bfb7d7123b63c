"""GGUF files of the `phi2`, `phi3`, `starcoder2`, `glm4` and `smollm3` llama.cpp architectures.

Tiny random transformers checkpoints (widths of 256 so K-quants apply) are written the way
llama.cpp's converter lays them out (tests/fixtures_gguf.py: partial rotary as
rope.dimension_count, LayerNorm eps, Phi-3's fused attn_qkv / ffn_up and longrope factor tensors,
GLM-4's extra norms, biases), then loaded by us, by llama.cpp (llama-cpp-python) and compared with
transformers on the HF checkpoint itself.
"""
from __future__ import annotations

import pytest
import torch

from fixtures_gguf import GGUF_BASE, llama_cpp_logits, llama_quantize, write_gguf
from fixtures_models import all_logits, build_checkpoint, load_hf
from mistralpy import Engine, SamplingParams

IDS = list(range(100, 140))  # 40 tokens: past the Phi-3 variant's original context of 32

# Phi-3-128k-style longrope (rotary 48 of head_dim 64: 24 factors each), original context 32 of 512:
# every engine here (max_model_len 512, llama.cpp n_ctx 256) and transformers on 40 tokens use the
# long factors and the attention factor sqrt(1 + ln 16 / ln 32).
PHI3_ROPE = dict(rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=0.75,
                 short_factor=[1.0 + 0.1 * i for i in range(24)], long_factor=[1.0 + 0.8 * i for i in range(24)])
VARIANTS = {
    # llama.cpp's phi2 converter writes head_count_kv = head_count and 4 * hidden as the MLP width.
    "phi2": ("phi2", dict(num_key_value_heads=4, intermediate_size=1024)),
    # llama.cpp runs Phi models without their sliding window (llama.cpp PR 13676): none here.
    "phi3": ("phi3", dict(sliding_window=None, original_max_position_embeddings=32, rope_parameters=PHI3_ROPE)),
    "starcoder2": ("starcoder2", dict(sliding_window=None)),
    "glm4": ("glm4", dict(head_dim=64)),
    # 4 layers: the 4th is NoPE (llama.cpp fixes every 4th; the file says nothing about it).
    "smollm3": ("smollm3", dict(num_hidden_layers=4, no_rope_layer_interval=4, use_sliding_window=False,
                                sliding_window=None)),
}
# Ours against llama.cpp on the F32 file: llama.cpp keeps its KV cache in F16. Measured 2.3e-4
# (StarCoder2) to 5.3e-4 (GLM-4) on logits of about +-1.5; a rope or norm mistake costs > 1e-2.
F32_BOUND = 1e-3


def _engine(path, tokenizer_dir, **kw) -> Engine:
    return Engine(str(path), dtype="f32", num_kv_blocks=64, max_model_len=512, tokenizer=str(tokenizer_dir), **kw)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("gguf_dense")
    out = {}
    for name, (variant, extra) in VARIANTS.items():
        hf = build_checkpoint(root / name, variant, tokenizer_dir, **{**GGUF_BASE, **extra})
        out[name] = (hf, write_gguf(hf, root / f"{name}-f32.gguf", "F32"))
    return out


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_f32_gguf_matches_transformers_and_llama_cpp(checkpoints, tokenizer_dir, name):
    hf_dir, path = checkpoints[name]
    hf = load_hf(hf_dir)
    with _engine(path, tokenizer_dir) as engine:
        assert engine.model_config.architecture == hf.config.architectures[0]
        ours = all_logits(engine, IDS)
        out = engine.generate(IDS, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    with torch.no_grad():
        ref = hf(torch.tensor([IDS])).logits[0]
        want = hf.generate(torch.tensor([IDS]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, len(IDS):].tolist()
    assert (ours - ref).abs().max().item() < 2e-4
    assert out[0].outputs[0].token_ids == want
    assert (ours - llama_cpp_logits(path, IDS)).abs().max().item() < F32_BOUND


# Quantized files against llama.cpp, whose CPU matmuls round activations to 8 bits (Q8_0 / Q8_K)
# while ours stay float. Measured max |diff|: Q8_0 0.010-0.023, Q4_K_M 0.015-0.034 on logits of
# about +-1.5, where the quantization error itself (ours against the F32 file) is 0.01-0.025 for
# Q8_0 and 0.07-0.30 for Q4_K_M.
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K_M"])
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_quantized_gguf_matches_llama_cpp(checkpoints, tokenizer_dir, tmp_path, name, qtype):
    hf_dir, f32_path = checkpoints[name]
    if qtype == "Q8_0":
        path = write_gguf(hf_dir, tmp_path / f"{name}-{qtype}.gguf", qtype)
    else:
        path = llama_quantize(f32_path, tmp_path / f"{name}-{qtype}.gguf", qtype)
    ref = llama_cpp_logits(path, IDS)
    with _engine(path, tokenizer_dir) as engine:
        ours = all_logits(engine, IDS)
    err = (ours - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err < 0.03 * max(scale, 1.0), f"{name} {qtype}: max diff {err:.4f} (logit scale {scale:.2f})"
    agree = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= 0.85, f"{name} {qtype}: argmax agreement {agree:.2f}"


@pytest.mark.parametrize("name", ["phi2", "glm4"])
def test_fused_attn_qkv_loads_like_separate_tensors(checkpoints, tokenizer_dir, tmp_path, name):
    """Original Phi-2 checkpoints convert to one `attn_qkv` tensor (llama.cpp accepts it for GLM-4
    too): split on load, it gives exactly the separate tensors' logits, and llama.cpp's."""
    hf_dir, separate = checkpoints[name]
    fused = write_gguf(hf_dir, tmp_path / f"{name}-fused.gguf", "F32", fuse_qkv=True)
    with _engine(separate, tokenizer_dir) as a, _engine(fused, tokenizer_dir) as b:
        want, got = all_logits(a, IDS), all_logits(b, IDS)
    assert torch.equal(got, want)
    assert (got - llama_cpp_logits(fused, IDS)).abs().max().item() < F32_BOUND


def test_phi3_sliding_window_gguf_follows_transformers(tmp_path, tokenizer_dir):
    """The GGUF's phi3.attention.sliding_window is applied as transformers applies config.json's
    (llama.cpp ignores it for Phi models, so it is not the reference here)."""
    rope = dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=1.0)
    hf_dir = build_checkpoint(tmp_path / "phi3_swa", "phi3", tokenizer_dir, **GGUF_BASE, sliding_window=16,
                              rope_parameters=rope)
    path = write_gguf(hf_dir, tmp_path / "phi3_swa.gguf", "F32")
    with _engine(path, tokenizer_dir) as engine:
        assert engine.model_config.hf_config["sliding_window"] == 16
        ours = all_logits(engine, IDS)
    with torch.no_grad():
        ref = load_hf(hf_dir)(torch.tensor([IDS])).logits[0]
    assert (ours - ref).abs().max().item() < 2e-4
