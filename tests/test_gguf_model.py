"""GGUF model files: float files against transformers, quantized files against llama.cpp.

Fixtures: tiny random llama / qwen2 / qwen3 checkpoints (widths of 256 so every K-quant applies)
converted to GGUF the way llama.cpp's converter does (tests/fixtures_gguf.py), then quantized by
gguf (legacy types) or by llama.cpp itself (K- and IQ-quants).
"""
from __future__ import annotations

import pytest
import torch

from fixtures_gguf import GGUF_BASE, llama_cpp_logits, llama_quantize, write_gguf
from fixtures_models import all_logits, build_checkpoint, load_hf
from mistralpy import Engine, SamplingParams
from mistralpy.errors import ModelLoadError

IDS = list(range(100, 140))


def _engine(path, tokenizer_dir, **kw) -> Engine:
    return Engine(str(path), dtype="f32", num_kv_blocks=64, max_model_len=512, tokenizer=str(tokenizer_dir), **kw)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for variant, extra in (("llama", {}), ("qwen2", {}), ("qwen3", {"head_dim": 64})):
        hf = build_checkpoint(root / variant, variant, tokenizer_dir, **GGUF_BASE, **extra)
        out[variant] = (hf, write_gguf(hf, root / f"{variant}-f32.gguf", "F32"))
    return out


@pytest.mark.parametrize("variant", ["llama", "qwen2", "qwen3"])
def test_f32_gguf_matches_transformers(checkpoints, tokenizer_dir, variant):
    hf_dir, gguf_path = checkpoints[variant]
    hf = load_hf(hf_dir)
    with _engine(gguf_path, tokenizer_dir) as engine:
        ours = all_logits(engine, IDS)
        with torch.no_grad():
            ref = hf(torch.tensor([IDS])).logits[0]
        assert (ours - ref).abs().max().item() < 2e-4
        out = engine.generate(IDS[:20], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
        with torch.no_grad():
            want = hf.generate(torch.tensor([IDS[:20]]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[0, 20:].tolist()
        assert out[0].outputs[0].token_ids == want


def test_split_gguf_loads_like_one_file(checkpoints, tokenizer_dir, tmp_path):
    import gguf

    _, single = checkpoints["llama"]
    reader = gguf.GGUFReader(str(single))
    writer = gguf.GGUFWriter(str(tmp_path / "split.gguf"), "llama", split_max_tensors=8)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)
    for t in reader.tensors:
        writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    parts = sorted(tmp_path.glob("split-*-of-*.gguf"))
    assert len(parts) > 1
    with _engine(single, tokenizer_dir) as a, _engine(parts[0], tokenizer_dir) as b:
        assert torch.equal(all_logits(a, IDS), all_logits(b, IDS))
    parts[-1].unlink()
    with pytest.raises(ModelLoadError, match="missing parts"):
        _engine(parts[0], tokenizer_dir)


def test_unknown_architecture_is_a_clear_error(tmp_path, tokenizer_dir):
    import gguf

    writer = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "rwkv6")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="rwkv6"):
        _engine(tmp_path / "x.gguf", tokenizer_dir)


# Legacy types are written by gguf; the rest by llama.cpp's quantizer from the F32 file.
# Tolerance: max |logit difference| against llama.cpp on the same file, whose CPU matmuls quantize
# activations to 8 bits (Q8_0/Q8_K) while ours keep them in float. Measured: 0.017-0.027 for every
# type, on logits spanning about +-1.5; the quantization error itself (ours against the F32 file)
# is 0.02 (Q8_0), 0.08 (Q6_K), 0.17-0.40 (5- to 3-bit) and 0.8 (Q2_K), so a wrong block layout or
# scale would fail by far.
GGUF_WRITTEN = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
LLAMA_WRITTEN = ["Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K", "IQ4_NL", "IQ4_XS"]


@pytest.mark.parametrize("qtype", GGUF_WRITTEN + LLAMA_WRITTEN)
def test_quantized_logits_match_llama_cpp(checkpoints, tokenizer_dir, tmp_path, qtype):
    hf_dir, f32_path = checkpoints["llama"]
    if qtype in GGUF_WRITTEN:
        path = write_gguf(hf_dir, tmp_path / f"{qtype}.gguf", qtype)
    else:
        path = llama_quantize(f32_path, tmp_path / f"{qtype}.gguf", qtype)
    ref = llama_cpp_logits(path, IDS)
    with _engine(path, tokenizer_dir) as engine:
        ours = all_logits(engine, IDS)
    assert ours.shape == ref.shape
    err = (ours - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err < 0.02 * max(scale, 1.0), f"{qtype}: max diff {err:.4f} (logit scale {scale:.2f})"
    # Same argmax at nearly every position.
    agree = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= 0.9, f"{qtype}: argmax agreement {agree:.2f}"


@pytest.mark.parametrize("variant, qtype", [("llama", "Q8_0"), ("llama", "Q4_K_M"), ("qwen2", "Q4_K_M")])
def test_quantized_logits_match_transformers_gguf_loading(checkpoints, tokenizer_dir, tmp_path, variant, qtype):
    """transformers' `gguf_file=` dequantizes the file to float32: with float32 compute our kernels must
    give the same logits (the weights are identical, only summation order may differ). Qwen3 is left
    out: transformers 5.24 ignores `qwen3.attention.key_length` (head_dim) when reading GGUF."""
    import transformers

    hf_dir, f32_path = checkpoints[variant]
    if qtype == "Q8_0":
        path = write_gguf(hf_dir, tmp_path / f"{qtype}.gguf", qtype)
    else:
        path = llama_quantize(f32_path, tmp_path / f"{qtype}.gguf", qtype)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([IDS])).logits[0]
    with _engine(path, tokenizer_dir) as engine:
        ours = all_logits(engine, IDS)
    assert (ours - ref).abs().max().item() < 2e-4


@pytest.mark.parametrize("rope", [
    dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
         original_max_position_embeddings=64),
    dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
         original_max_position_embeddings=8192),  # Llama 3.2's values
])
def test_llama3_rope_freqs_tensor_gives_the_llama3_rope(tmp_path, tokenizer_dir, rope):
    """Llama 3.x GGUFs store their rope scaling as a rope_freqs tensor (written here by our own
    `mistralpy quantize`, as llama.cpp's converter does); loading it must reproduce transformers."""
    from mistralpy.cli.main import main

    hf_dir = build_checkpoint(tmp_path / "l3", "llama", tokenizer_dir, **GGUF_BASE, rope_parameters=rope)
    out = tmp_path / "l3.gguf"
    assert main(["quantize", "-m", str(hf_dir), "--isq", "F32", "-o", str(out)]) == 0
    ids = list(range(100, 300))  # longer than the first case's original context of 64
    hf = load_hf(hf_dir)
    with _engine(out, tokenizer_dir) as engine:
        assert engine.model_config.hf_config["rope_scaling"]["original_max_position_embeddings"] == \
            rope["original_max_position_embeddings"]
        ours = all_logits(engine, ids)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert (ours - ref).abs().max().item() < 2e-4
