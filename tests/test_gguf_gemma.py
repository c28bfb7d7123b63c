"""Gemma GGUF files (`gemma`, `gemma2`, `gemma3`): tiny checkpoints converted the way llama.cpp's
converter does (norms stored as 1 + w, soft-caps and window in the metadata) against transformers
and llama.cpp, and the real Gemma-3-270M Q4_K_M file against llama.cpp.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from assets import gemma3_270m_gguf_path
from fixtures_gguf import GGUF_BASE, llama_cpp_logits, llama_quantize, write_gguf
from fixtures_models import all_logits, build_checkpoint, load_hf
from mistralpy import Engine, SamplingParams

IDS = list(range(100, 140))  # longer than the window of 8
# What llama.cpp can express: queries scaled by 1/sqrt(head_dim) (query_pre_attn_scalar = head_dim),
# Gemma 3's local rope base 10000 and one global layer in six (so 6 layers, default layer_types).
EXTRA = {
    "gemma": dict(head_dim=64),
    "gemma2": dict(head_dim=64, sliding_window=8, query_pre_attn_scalar=64, attn_logit_softcapping=1.0,
                   final_logit_softcapping=1.0),
    "gemma3": dict(head_dim=64, sliding_window=8, query_pre_attn_scalar=64, num_hidden_layers=6, layer_types=None,
                   rope_parameters={"sliding_attention": dict(rope_type="default", rope_theta=10000.0),
                                    "full_attention": dict(rope_type="linear", rope_theta=1e6, factor=2.0)}),
}


def _engine(path, tokenizer_dir, **kw) -> Engine:
    return Engine(str(path), dtype="f32", num_kv_blocks=64, max_model_len=512, tokenizer=str(tokenizer_dir), **kw)


def _sharpen_qk(hf_dir, factor: float = 10.0) -> None:
    """Scale q/k weights so attention scores reach a few units and the soft-cap of 1.0 acts."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(hf_dir / "model.safetensors"))
    state = {k: v * factor if (".q_proj." in k or ".k_proj." in k) else v for k, v in state.items()}
    save_file(state, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("gguf_gemma")
    out = {}
    for variant, extra in EXTRA.items():
        hf = build_checkpoint(root / variant, variant, tokenizer_dir, **{**GGUF_BASE, **extra})
        if variant == "gemma2":
            _sharpen_qk(hf)
        out[variant] = (hf, write_gguf(hf, root / f"{variant}-f32.gguf", "F32"))
    return out


@pytest.mark.parametrize("variant", sorted(EXTRA))
def test_f32_gguf_matches_transformers_and_llama_cpp(checkpoints, tokenizer_dir, variant):
    """Measured max |diff|: ours vs transformers 1e-6..4e-6; ours vs llama.cpp 1.7e-4 (gemma),
    8e-4 (gemma2), 1.4e-3 (gemma3), on logits of scale 1-5.6, and transformers vs llama.cpp is the
    same amount (llama.cpp's own float path: its GELU goes through an f16 table)."""
    hf_dir, path = checkpoints[variant]
    hf = load_hf(hf_dir)
    with torch.no_grad():
        ref = hf(torch.tensor([IDS])).logits[0]
    with _engine(path, tokenizer_dir) as engine:
        ours = all_logits(engine, IDS)
        out = engine.generate(IDS[:20], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    assert (ours - ref).abs().max().item() < 2e-4
    with torch.no_grad():
        want = hf.generate(torch.tensor([IDS[:20]]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, 20:].tolist()
    assert out[0].outputs[0].token_ids == want
    assert (ours - llama_cpp_logits(path, IDS)).abs().max().item() < 3e-3


def test_config_and_norms_from_gguf(checkpoints, tokenizer_dir):
    """The hyper-parameters llama.cpp keeps implicit come back as transformers has them, and norms
    lose the 1 the converter added."""
    for variant, (hf_dir, path) in checkpoints.items():
        hf = load_hf(hf_dir)
        with _engine(path, tokenizer_dir) as engine:
            cfg = engine.model_config.hf_config
            model = engine.core.runner.model
            assert cfg["architectures"] == [type(hf).__name__]
            layers = model.model.layers
            assert [layer.self_attn.spec.sliding_window for layer in layers] == \
                [8 if t == "sliding_attention" else None for t in getattr(hf.config, "layer_types", None)
                 or ["full_attention"] * len(layers)]
            assert [layer.self_attn.spec.logit_softcap for layer in layers] == \
                [1.0 if variant == "gemma2" else None] * len(layers)
            assert model.final_logit_softcapping == (1.0 if variant == "gemma2" else None)
            for name in ("model.norm.weight", "model.layers.1.input_layernorm.weight",
                         "model.layers.1.post_attention_layernorm.weight"):
                ours, theirs = dict(model.named_parameters())[name], hf.state_dict()[name]
                assert (ours - theirs).abs().max().item() < 1e-6, (variant, name)  # (1 + w) - 1 rounds
            if variant == "gemma3":
                assert cfg["rope_parameters"]["full_attention"] == \
                    {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}
                assert cfg["rope_parameters"]["sliding_attention"]["rope_theta"] == 10000.0


def _meta(arch: str, layers: int, hidden: int, heads: int, **extra) -> dict:
    keys = {"embedding_length": hidden, "attention.head_count": heads, "attention.head_count_kv": heads // 2,
            "attention.key_length": 128, "feed_forward_length": 4 * hidden, "block_count": layers,
            "vocab_size": 256, **extra}
    return {"general.architecture": arch, **{f"{arch}.{k}": v for k, v in keys.items()}}


def test_llama_cpp_implicit_hyper_parameters():
    """llama.cpp's fixed rules for what Gemma files leave out: the 27B models scale queries by
    hidden / heads (Gemma 2: 4608 / 32 = 144, Gemma 3: 5376 / 32 = 168), others by head_dim; Gemma 2
    alternates local/global with defaults window 4096 and caps 50 / 30; Gemma 3 has one global layer
    in six (or a per-layer pattern), local rope base 10000, and no local layers without a window."""
    from mistralpy.loading.gguf_loader import hf_config_from_gguf

    cfg = hf_config_from_gguf(_meta("gemma2", 46, 4608, 32), set())
    assert cfg["query_pre_attn_scalar"] == 144 and cfg["sliding_window"] == 4096
    assert (cfg["attn_logit_softcapping"], cfg["final_logit_softcapping"]) == (50.0, 30.0)
    assert cfg["layer_types"][:3] == ["sliding_attention", "full_attention", "sliding_attention"]
    cfg = hf_config_from_gguf(_meta("gemma2", 26, 2304, 8), set())
    assert cfg["query_pre_attn_scalar"] == 128
    cfg = hf_config_from_gguf(_meta("gemma3", 62, 5376, 32, **{"attention.sliding_window": 1024,
                                                               "rope.freq_base": 1e6}), set())
    assert cfg["query_pre_attn_scalar"] == 168 and cfg["final_logit_softcapping"] is None
    assert cfg["layer_types"][4:7] == ["sliding_attention", "full_attention", "sliding_attention"]
    assert cfg["rope_parameters"] == {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                      "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
    pattern = [True, False, False, True]
    cfg = hf_config_from_gguf(_meta("gemma3", 4, 640, 4, **{"attention.sliding_window": 512,
                                                            "attention.sliding_window_pattern": pattern}), set())
    assert cfg["layer_types"] == ["sliding_attention", "full_attention", "full_attention", "sliding_attention"]
    cfg = hf_config_from_gguf(_meta("gemma3", 4, 640, 4), set())
    assert cfg["layer_types"] == ["full_attention"] * 4


def _hf_on_gguf_weights(hf_dir, path):
    """transformers' model with every weight replaced by the GGUF file's (dequantized by gguf, norms
    less the converter's 1): the exact float reference for computing with the file's weights."""
    import gguf

    hf = load_hf(hf_dir)
    reader = gguf.GGUFReader(str(path))
    arch = gguf.MODEL_ARCH[reader.fields["general.architecture"].contents().upper()]
    name_map = gguf.get_tensor_name_map(arch, hf.config.num_hidden_layers)
    tensors = {t.name: t for t in reader.tensors}
    with torch.no_grad():
        for name, param in hf.named_parameters():
            t = tensors[name_map.get_name(name, try_suffixes=(".weight", ".bias"))]
            value = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32))
            param.copy_(value.reshape(param.shape) - (1.0 if name.endswith("norm.weight") else 0.0))
    return hf


# Quantized files (Q8_0 written by gguf, Q4_K_M by llama.cpp's quantizer from the F32 file).
# Against transformers on the file's own weights dequantized by gguf: measured bitwise equal.
# Against llama.cpp, whose matmuls round activations to 8 bits: measured max |diff| 0.009 / 0.055 /
# 0.042 (Q8_0: gemma, gemma2, gemma3) and 0.015 / 0.128 / 0.058 (Q4_K_M), on logits of scale 5.6 /
# 0.9 / 1.5, where quantizing the weights itself moves our logits by 0.012 / 0.10 / 0.044 (Q8_0) and
# 0.064 / 0.57 / 0.57 (Q4_K_M). Gemma 2/3's post-attention norms rescale the small attention outputs
# of random weights to unit size, and with them any rounding noise; the sharp Gemma 2 more so.
@pytest.mark.parametrize("variant, qtype", [("gemma", "Q8_0"), ("gemma2", "Q8_0"), ("gemma3", "Q8_0"),
                                            ("gemma", "Q4_K_M"), ("gemma2", "Q4_K_M"), ("gemma3", "Q4_K_M")])
def test_quantized_gguf_matches_transformers_and_llama_cpp(checkpoints, tokenizer_dir, tmp_path, variant, qtype):
    hf_dir, f32_path = checkpoints[variant]
    if qtype == "Q8_0":
        path = write_gguf(hf_dir, tmp_path / f"{qtype}.gguf", qtype)
    else:
        path = llama_quantize(f32_path, tmp_path / f"{qtype}.gguf", qtype)
    with _engine(path, tokenizer_dir) as engine:
        ours = all_logits(engine, IDS)
    with torch.no_grad():
        exact = _hf_on_gguf_weights(hf_dir, path)(torch.tensor([IDS])).logits[0]
    assert (ours - exact).abs().max().item() < 2e-4
    ref = llama_cpp_logits(path, IDS)
    err = (ours - ref).abs().max().item()
    assert err < 0.2, f"{variant} {qtype}: max diff {err:.4f} (logit scale {ref.abs().max().item():.2f})"
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.9


# ---- the real Gemma-3-270M (base) Q4_K_M file ------------------------------------------------------

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def gemma3_270m():
    path = gemma3_270m_gguf_path()
    # bf16: the int4 kernels' path (float32 would expand the 262k-row Q8_0 head every step).
    with Engine(str(path), dtype="bf16", max_model_len=256, num_kv_blocks=32) as engine:
        yield path, engine


def test_gemma3_270m_continues_like_llama_cpp(gemma3_270m):
    """Loads with no other file (SentencePiece vocabulary from the GGUF) and greedy-continues like
    llama.cpp. Measured: both give " the capital of the country of France. It is the largest city in
    France" for 15 tokens (the 16th differs: " and" for us in bf16 and f32 alike, "." for llama.cpp,
    whose matmuls round activations to 8 bits), and the same first-step top 5 in the same order,
    logits 19.00/18.50/18.38/18.00/17.75 (ours, bf16) against 19.00/18.49/18.32/18.10/17.70."""
    import llama_cpp

    path, engine = gemma3_270m
    ids = engine.tokenize(PROMPT)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, logits_all=True, verbose=False)
    try:
        assert llm.tokenize(PROMPT.encode(), add_bos=True, special=True) == ids
        assert ids[0] == 2  # <bos>, added as the file's add_bos_token says
        llm.eval(ids)
        ref_first = np.array(llm.scores[len(ids) - 1])
        ref_tokens = []
        for _ in range(8):
            ref_tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([ref_tokens[-1]])
    finally:
        llm.close()
    out = engine.generate(PROMPT, SamplingParams(temperature=0, max_tokens=8))[0].outputs[0]
    assert out.token_ids == ref_tokens, (out.text, ref_tokens)
    assert out.text.startswith(" the capital of")
    ours_first = all_logits(engine, ids)[-1]
    assert set(ours_first.topk(5).indices.tolist()) == set(np.argsort(-ref_first)[:5].tolist())
    assert abs(ours_first.max().item() - float(ref_first.max())) < 0.5
