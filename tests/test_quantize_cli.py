"""`mistralpy quantize`: HF checkpoints written as GGUF files that llama.cpp and mistralpy both load.

Tiny random llama / qwen3 checkpoints (widths of 256 so K-quants apply) go through the CLI in
process; llama.cpp's logits on the file must match ours on the same file (up to its 8-bit
activations) and the float model's within the type's error; float exports match transformers.
"""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
import torch
from fixtures_gguf import GGUF_BASE, llama_cpp_logits
from fixtures_models import all_logits, build_checkpoint, load_hf
from fixtures_tokenizer import CHATML_TEMPLATE

from mistralpy import Engine
from mistralpy.cli.main import main

IDS = list(range(100, 140))
HARD_TEXTS = ["Hello world", "  leading spaces and\ttabs\n\nnew lines", "def f(x):\n    return x**2  # ok\r\n",
              "héllo wörld café 日本語 😀🎉 ∑∫√", "<|im_start|>user\nhi<|im_end|>\n", "1234567 numbers 3.14",
              "don't I'll we've", ""]
# max |logits - float model| per type (logits of these models reach about 1.5)
HF_BOUND = {"Q8_0": 0.06, "Q4K": 0.5}


def _quantize(src: Path, out: Path, qtype: str, *extra: str) -> Path:
    assert main(["quantize", "-m", str(src), "--isq", qtype, "-o", str(out), *extra]) == 0
    return out


def _hf_logits(hf_dir: Path) -> torch.Tensor:
    with torch.no_grad():
        return load_hf(hf_dir)(torch.tensor([IDS])).logits[0]


def _ours(path: Path) -> torch.Tensor:
    with Engine(str(path), dtype="f32", num_kv_blocks=64) as engine:  # tokenizer from the file itself
        return all_logits(engine, IDS)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("quantize")
    out = {}
    for variant, extra in (("llama", {}), ("qwen3", {"head_dim": 64})):
        hf = build_checkpoint(root / variant, variant, tokenizer_dir, **GGUF_BASE, **extra)
        out[variant] = (hf, _hf_logits(hf))
    return out


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4K"])
@pytest.mark.parametrize("variant", ["llama", "qwen3"])
def test_quantized_file_runs_in_llama_cpp_and_mistralpy(models, tmp_path, variant, qtype, capsys):
    hf_dir, ref = models[variant]
    path = _quantize(hf_dir, tmp_path / f"{variant}.gguf", qtype)
    assert "tensors" in capsys.readouterr().out
    theirs, ours = llama_cpp_logits(path, IDS), _ours(path)
    assert (theirs - ours).abs().max().item() < 0.04
    assert (ours - ref).abs().max().item() < HF_BOUND[qtype]
    reader = gguf.GGUFReader(str(path))
    types = {t.name: gguf.GGMLQuantizationType(t.tensor_type).name for t in reader.tensors}
    linear = "Q4_K" if qtype == "Q4K" else "Q8_0"
    assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_down.weight"] == linear
    assert types["token_embd.weight"] == types["output.weight"] == "Q8_0"
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert reader.fields["general.quantization_version"].contents() == 2


@pytest.mark.parametrize("variant", ["llama", "qwen3", "llama3_rope", "llama_linear_rope"])
def test_f16_export_matches_transformers_in_llama_cpp(models, tmp_path, tokenizer_dir, variant):
    if variant in models:
        hf_dir, ref = models[variant]
    else:  # rope scaling: llama.cpp reads the scaling keys / the rope_freqs tensor we write
        hf_dir = build_checkpoint(tmp_path / variant, variant, tokenizer_dir, **GGUF_BASE)
        ref = _hf_logits(hf_dir)
    path = _quantize(hf_dir, tmp_path / "f16.gguf", "F16")
    assert (llama_cpp_logits(path, IDS) - ref).abs().max().item() < 2e-3
    names = {t.name for t in gguf.GGUFReader(str(path)).tensors}
    assert ("rope_freqs.weight" in names) == (variant == "llama3_rope")
    if variant in models:
        assert (_ours(path) - ref).abs().max().item() < 2e-3


def test_sharded_checkpoint_writes_the_same_tensors(models, tmp_path, tokenizer_dir):
    hf_dir, _ = models["llama"]
    sharded = build_checkpoint(tmp_path / "sharded", "llama", tokenizer_dir, max_shard_size="1MB", **GGUF_BASE)
    assert len(list(sharded.glob("*.safetensors"))) > 1
    a = gguf.GGUFReader(str(_quantize(hf_dir, tmp_path / "one.gguf", "Q8_0")))
    b = gguf.GGUFReader(str(_quantize(sharded, tmp_path / "sharded.gguf", "Q8_0")))
    tensors = {t.name: t.data for t in a.tensors}
    assert len(tensors) == len(b.tensors)
    for t in b.tensors:
        assert (tensors[t.name] == t.data).all(), t.name


def test_tokenizer_and_template_round_trip(models, tmp_path, tokenizer_dir):
    import llama_cpp
    from tokenizers import Tokenizer as HFTokenizer

    from mistralpy.tokenizer.gguf_tokenizer import tokenizer_from_gguf

    path = _quantize(models["llama"][0], tmp_path / "tok.gguf", "Q8_0")
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert reader.fields["tokenizer.chat_template"].contents() == CHATML_TEMPLATE
    oracle = HFTokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    ours = tokenizer_from_gguf(reader)
    llama = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        for text in HARD_TEXTS:
            want = oracle.encode(text, add_special_tokens=False).ids
            assert ours.encode(text, add_special_tokens=False) == want, text
            assert llama.tokenize(text.encode(), add_bos=False, special=True) == want, text
    finally:
        llama.close()
    assert ours.eos_token == "<|im_end|>"


def _spm_folder(folder: Path) -> Path:
    """A Llama-2-style tokenizer.json: U+2581 spaces, a prefix space, byte fallback, no scores."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models as tm
    from tokenizers import pre_tokenizers, trainers

    texts = [p.read_text(encoding="utf-8") for p in sorted(Path(__file__).parent.glob("test_*.py"))[:20]]
    tok = HFTokenizer(tm.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(texts, trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    data["pre_tokenizer"] = None  # SentencePiece merges over the whole text, as Llama 2's tokenizer.json
    data["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"},
                          {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
    data["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"},
        {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (folder / "chat_template.jinja").write_text("{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}")
    return folder


def test_sentencepiece_tokenizer_round_trips(tmp_path):
    import llama_cpp
    from tokenizers import Tokenizer as HFTokenizer

    from mistralpy.tokenizer.gguf_tokenizer import tokenizer_from_gguf

    tok_dir = _spm_folder(tmp_path / "spm")
    size = HFTokenizer.from_file(str(tok_dir / "tokenizer.json")).get_vocab_size()
    hf = build_checkpoint(tmp_path / "model", "llama", tok_dir, vocab_size=size + 4, bos_token_id=1, eos_token_id=2)
    path = _quantize(hf, tmp_path / "spm.gguf", "F32")
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["tokenizer.ggml.model"].contents() == "llama"
    assert reader.fields["tokenizer.chat_template"].contents().startswith("{% for m in messages %}")
    oracle = HFTokenizer.from_file(str(tok_dir / "tokenizer.json"))
    ours = tokenizer_from_gguf(reader)
    llama = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        for text in ["Hello world", "def f(x):\n    return x  # ok", "assert (a == b).all()", "x</s> after"]:
            want = oracle.encode(text, add_special_tokens=False).ids
            assert ours.encode(text, add_special_tokens=False) == want, text
            assert llama.tokenize(text.encode(), add_bos=False, special=True) == want, text
    finally:
        llama.close()
    assert ours.add_bos_token and ours.bos_token == "<s>" and ours.encode("Hi")[0] == 1


def test_errors(models, tmp_path, capsys):
    hf_dir, _ = models["llama"]
    out = tmp_path / "x.gguf"
    assert main(["quantize", "-m", str(hf_dir), "--isq", "Q7K", "-o", str(out)]) == 2
    assert "unknown ISQ type 'Q7K'" in capsys.readouterr().err
    assert main(["quantize", "-m", str(hf_dir), "--isq", "Q4K", "-o", str(out), "--arch", "GPT2LMHeadModel"]) == 2
    assert "GPT2LMHeadModel" in capsys.readouterr().err and not out.exists()
    out.write_bytes(b"keep")
    assert main(["quantize", "-m", str(hf_dir), "--isq", "Q8_0", "-o", str(out)]) == 2
    assert "--force" in capsys.readouterr().err and out.read_bytes() == b"keep"
    assert main(["quantize", "-m", str(tmp_path / "missing"), "--isq", "Q8_0", "-o", str(tmp_path / "y.gguf")]) == 2
    assert not list(tmp_path.glob("*.partial"))
    with pytest.raises(SystemExit):
        main(["quantize", "-m", str(hf_dir), "-o", str(out)])  # --isq is required
