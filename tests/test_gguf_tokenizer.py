"""GGUF tokenizer metadata -> Tokenizer: ids equal llama.cpp's and the original tokenizer.json's.

Three sources: the real SmolLM2 GGUF (gpt2 / smollm), and vocab-only GGUF files written here from
the real Llama 3 (gpt2 / llama-bpe), Qwen3 (gpt2 / qwen2) and Gemma 3 (SentencePiece "llama")
tokenizers with the recipe of llama.cpp's convert_hf_to_gguf.py. Gemma's tokenizer.json carries
merges, not SentencePiece scores; we derive each token's score from the rank of the first merge that
makes it, which is what a score-ordered SentencePiece BPE model encodes.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from assets import REPO_ROOT, real_tokenizer_dir, smollm2_gguf_path

gguf = pytest.importorskip("gguf")
from tokenizers import Tokenizer as HFTokenizer  # noqa: E402

from mistralpy.errors import ModelLoadError  # noqa: E402
from mistralpy.tokenizer.gguf_tokenizer import pretokenizer_regexes, tokenizer_from_gguf  # noqa: E402
from mistralpy.tokenizer.tokenizer import Tokenizer  # noqa: E402

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

HARD_TEXTS = [
    "Hello world",
    "  leading spaces\tand\ttabs\n\n\nnewlines  ",
    "a  b   c    d\t\te",
    "日本語のテキスト 中文 한국어",
    "emoji 🎉👍🏽 ok 🤷‍♀️",
    "def f(x):\n    return x**2  # comment\n\tpass\r\n",
    "1234567 3.14159 1,000,000 007",
    "Café naïve résumé Ωmega Straße",
    "don't I'll WE'RE you've",
    "   ",
    "\n",
    "x" * 40,
    "a\u00a0b\u200bc",
    "Привет, мир! مرحبا",
    "<html><body class=\"x\">&amp;</body></html>",
    "   indented\n        more",
]


def _llama(path: Path):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


def _load(path: Path, **kwargs) -> Tokenizer:
    return tokenizer_from_gguf(gguf.GGUFReader(str(path)), **kwargs)


# ------------------------------------------------------------------------------ GGUF writer
def _looks_special(text: str) -> bool:
    """convert_hf_to_gguf's does_token_look_special."""
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))
            or (text.startswith("<unused") and text.endswith(">")))


def _vocab_table(tokenizer_json: dict) -> tuple[list[str], list[int], dict[int, dict]]:
    """Tokens by id and their GGUF types, as the converter assigns them (added tokens override)."""
    vocab = tokenizer_json["model"]["vocab"]
    added = {a["id"]: a for a in tokenizer_json["added_tokens"]}
    size = max(max(vocab.values()), max(added, default=0)) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [UNUSED] * size
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = BYTE if text.startswith("<0x") and text.endswith(">") and len(text) == 6 else NORMAL
    for i, a in added.items():
        text = a["content"]
        if a["special"] or _looks_special(text):
            types[i] = CONTROL
        else:
            types[i] = USER_DEFINED
            text = text.replace("\u2581", " ")  # the converter pre-normalizes user-defined spaces
        tokens[i] = text
    return tokens, types, added


def _spm_scores(tokenizer_json: dict, tokens: list[str]) -> list[float]:
    """Score = minus the rank of the first merge that makes the token (best first), as in SentencePiece."""
    first: dict[str, int] = {}
    for rank, m in enumerate(tokenizer_json["model"]["merges"]):
        a, b = m if isinstance(m, list) else m.split(" ", 1)
        first.setdefault(a + b, rank)
    floor = float(len(tokenizer_json["model"]["merges"]) + 1)
    return [-float(first[t]) if t in first else -floor for t in tokens]


def write_vocab_gguf(path: Path, folder: Path, *, model: str, pre: str | None = None,
                     add_space_prefix: bool | None = None, templates: list[dict] | None = None,
                     tokenizer_model_override: str | None = None) -> Path:
    """A vocab-only GGUF (arch llama, tiny hyper-parameters) of a Hugging Face tokenizer folder."""
    tj = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    tokens, types, _ = _vocab_table(tj)
    ids = {t: i for i, t in enumerate(tokens)}

    w = gguf.GGUFWriter(str(path), arch="llama")
    for add, value in ((w.add_context_length, 4096), (w.add_embedding_length, 64), (w.add_block_count, 1),
                       (w.add_feed_forward_length, 128), (w.add_head_count, 4), (w.add_head_count_kv, 4),
                       (w.add_rope_dimension_count, 16)):
        add(value)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model(tokenizer_model_override or model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if model == "gpt2":
        w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"]])
    else:
        w.add_token_scores(_spm_scores(tj, tokens))
    for key, add in (("bos_token", w.add_bos_token_id), ("eos_token", w.add_eos_token_id),
                     ("unk_token", w.add_unk_token_id), ("pad_token", w.add_pad_token_id)):
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str) and value in ids:
            add(ids[value])
    if "add_bos_token" in config:
        w.add_add_bos_token(bool(config["add_bos_token"]))
    if add_space_prefix is not None:
        w.add_add_space_prefix(add_space_prefix)
    if templates is not None:  # [{"name": ..., "template": ...}]: the converter's named templates
        w.add_chat_template(templates)
    elif isinstance(config.get("chat_template"), str):
        w.add_chat_template(config["chat_template"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def smollm2():
    """(path, reader, tokenizer); GGUFReader takes ~2 s on this file, so it is read once."""
    path = smollm2_gguf_path()
    reader = gguf.GGUFReader(str(path))
    return path, reader, tokenizer_from_gguf(reader)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """name -> (gguf path, our tokenizer, original tokenizers.Tokenizer), built once per module."""
    cache: dict[str, tuple[Path, Tokenizer, HFTokenizer]] = {}
    specs = {"llama3": dict(model="gpt2", pre="llama-bpe"), "qwen3": dict(model="gpt2", pre="qwen2"),
             "gemma3": dict(model="llama", add_space_prefix=False)}

    def get(name: str):
        if name not in cache:
            folder = real_tokenizer_dir(name)
            path = write_vocab_gguf(tmp_path_factory.mktemp(name) / f"{name}.gguf", folder, **specs[name])
            cache[name] = (path, _load(path), HFTokenizer.from_file(str(folder / "tokenizer.json")))
        return cache[name]
    return get


def _check_ids(tok: Tokenizer, llama, texts: list[str], oracle: HFTokenizer | None = None,
               exact_roundtrip: bool = True) -> None:
    """ids == llama.cpp's (with and without BOS) and the original's; decoding gives the text back.

    With a SentencePiece space prefix, the space put after a special token stays in the decoded text
    (in llama.cpp and transformers too): `exact_roundtrip=False` then compares with the original's decode.
    """
    specials = [tok.id_to_token(i) for i in tok.all_special_ids]
    for text in texts:
        ours = tok.encode(text, add_special_tokens=False)
        assert ours == llama.tokenize(text.encode(), add_bos=False, special=True), text
        # add_special_tokens=True follows the GGUF's add_bos/add_eos flags, as llama.cpp does.
        assert tok.encode(text) == llama.tokenize(text.encode(), add_bos=True, special=True), text
        if oracle is not None:
            assert ours == oracle.encode(text, add_special_tokens=False).ids, text
        decoded = tok.decode(ours, skip_special_tokens=False)
        if oracle is not None:
            assert decoded == oracle.decode(ours, skip_special_tokens=False), text
        if exact_roundtrip or not any(t in text for t in specials):
            assert decoded == text, text


# ------------------------------------------------------------------------------ SmolLM2 (real GGUF)
SMOL_TEXTS = HARD_TEXTS + ["<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
                           "text<|endoftext|>more", "<|im_start|><|im_end|>"]


def test_smollm2_ids_match_llama_cpp(smollm2):
    path, _, tok = smollm2
    _check_ids(tok, _llama(path), SMOL_TEXTS)


def test_smollm2_special_tokens_and_flags(smollm2):
    _, _, tok = smollm2
    assert tok.bos_token == "<|im_start|>" and tok.eos_token == "<|im_end|>"
    assert tok.unk_token == "<|endoftext|>" and tok.pad_token == "<|im_end|>"
    assert tok.add_bos_token is False and tok.add_eos_token is False
    # <|im_end|> (eos) and <|endoftext|> (end of generation by text, as llama.cpp) both stop.
    assert tok.eos_token_ids == {tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")}
    ids = tok.encode("<|im_start|>user\nHi<|im_end|>")
    assert ids[0] == tok.token_to_id("<|im_start|>") and ids[-1] == tok.token_to_id("<|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "user\nHi"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nHi<|im_end|>"


def test_smollm2_chat_template_and_override(smollm2, tmp_path):
    _, reader, tok = smollm2
    stored = reader.fields["tokenizer.chat_template"].contents()
    assert tok.chat_template is not None and tok.chat_template.source == stored
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert "<|im_start|>user\nHi<|im_end|>" in prompt and prompt.endswith("<|im_start|>assistant\n")

    text = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    by_text = tokenizer_from_gguf(reader, chat_template_override=text)
    assert by_text.apply_chat_template([{"role": "user", "content": "Hi"}]) == "[user] Hi\n"
    file = tmp_path / "t.jinja"
    file.write_text(text, encoding="utf-8")
    by_file = tokenizer_from_gguf(reader, chat_template_override=file)
    assert list(by_file.chat_templates) == ["default"]
    assert by_file.apply_chat_template([{"role": "user", "content": "Hi"}]) == "[user] Hi\n"
    with pytest.raises(ModelLoadError):
        tokenizer_from_gguf(reader, chat_template_override=tmp_path / "missing.jinja")


# ------------------------------------------------------------------------------ written GGUFs
def test_small_bpe_gguf_matches_llama_cpp_and_original(tokenizer_dir, tmp_path):
    """The 4k-token byte-level BPE of the test fixtures, pre-tokenizer gpt-2, named chat templates."""
    templates = [{"name": "default", "template": "{{ messages[0]['content'] }}"},
                 {"name": "tool_use", "template": "TOOLS {{ messages[0]['content'] }}"}]
    path = write_vocab_gguf(tmp_path / "small.gguf", tokenizer_dir, model="gpt2", pre="gpt-2",
                            templates=templates)
    tok = _load(path)
    oracle = HFTokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    _check_ids(tok, _llama(path), HARD_TEXTS + ["<|im_start|>user\nHi<|im_end|>"], oracle)
    assert set(tok.chat_templates) == {"default", "tool_use"}
    msgs = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(msgs) == "Hi"
    assert tok.apply_chat_template(msgs, tools=[{"type": "function"}]) == "TOOLS Hi"
    assert Tokenizer.from_gguf(path).encode("Hi there") == tok.encode("Hi there")


def test_unknown_pre_tokenizer_warns_and_uses_gpt2(tokenizer_dir, tmp_path, caplog):
    path = write_vocab_gguf(tmp_path / "odd.gguf", tokenizer_dir, model="gpt2", pre="no-such-pre")
    with caplog.at_level(logging.WARNING, logger="mistralpy.tokenizer.gguf_tokenizer"):
        tok = _load(path)
    assert any("no-such-pre" in r.getMessage() for r in caplog.records)
    assert pretokenizer_regexes("no-such-pre") == pretokenizer_regexes("gpt-2")
    oracle = HFTokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    for text in HARD_TEXTS:
        assert tok.encode(text, add_special_tokens=False) == oracle.encode(text, add_special_tokens=False).ids


def test_pretokenizer_names_map_to_llama_cpp_groups():
    assert pretokenizer_regexes("llama-bpe") == pretokenizer_regexes("dbrx") == pretokenizer_regexes("smaug-bpe")
    assert pretokenizer_regexes("smollm") == pretokenizer_regexes("starcoder") == pretokenizer_regexes("refact")
    assert pretokenizer_regexes("smollm") == pretokenizer_regexes("command-r")
    assert pretokenizer_regexes("olmo") == pretokenizer_regexes("gpt-2")
    assert pretokenizer_regexes("qwen2") != pretokenizer_regexes("llama-bpe")
    assert len(pretokenizer_regexes("default")) == 4 and len(pretokenizer_regexes("deepseek-llm")) == 6
    for name in ("falcon", "deepseek-coder", "tekken", "gpt-4o", "bloom", "deepseek-v3"):
        from tokenizers import Regex
        for r in pretokenizer_regexes(name):
            Regex(r)  # compiles in Oniguruma


@pytest.mark.parametrize("model", ["t5", "bert", "rwkv"])
def test_unsupported_tokenizer_model_is_a_clear_error(tokenizer_dir, tmp_path, model):
    path = write_vocab_gguf(tmp_path / f"{model}.gguf", tokenizer_dir, model="gpt2", pre="gpt-2",
                            tokenizer_model_override=model)
    with pytest.raises(ModelLoadError, match=model):
        _load(path)


@pytest.mark.slow
def test_llama3_gguf(written):
    """gpt2 + llama-bpe (~12 s, mostly GGUFReader on 400k strings): ignore_merges, BOS added by default (the file has no add_bos_token)."""
    path, tok, oracle = written("llama3")
    texts = HARD_TEXTS + ["<|begin_of_text|>Hi<|eot_id|>", "<|start_header_id|>user<|end_header_id|>\n\nx"]
    _check_ids(tok, _llama(path), texts, oracle)
    assert tok.add_bos_token and tok.bos_token == "<|begin_of_text|>"
    assert tok.encode("Hi")[0] == tok.token_to_id("<|begin_of_text|>")
    assert tok.token_to_id("<|eot_id|>") in tok.eos_token_ids
    assert "<|start_header_id|>" in tok.chat_template.source


@pytest.mark.slow
def test_qwen3_gguf(written):
    """gpt2 + qwen2: single digits, user-defined <think> tokens, no BOS."""
    path, tok, oracle = written("qwen3")
    texts = HARD_TEXTS + ["<|im_start|>user\nHi<|im_end|>", "<think>\nhmm</think>\n<tool_call>{}</tool_call>"]
    _check_ids(tok, _llama(path), texts, oracle)
    assert not tok.add_bos_token and tok.eos_token == "<|im_end|>"
    think = tok.token_to_id("<think>")
    assert think not in tok.special_added_ids  # user-defined: kept when skipping special tokens
    assert tok.decode(tok.encode("<think>x</think><|im_end|>")) == "<think>x</think>"


@pytest.mark.slow
def test_gemma3_spm_gguf(written):
    """SentencePiece "llama" vocabulary with scores, byte fallback, no space prefix, 262k tokens."""
    path, tok, oracle = written("gemma3")
    texts = HARD_TEXTS + ["<start_of_turn>user\nHi<end_of_turn>", "\x00\x01 control chars \x7f", "tab\t\t\tx"]
    _check_ids(tok, _llama(path), texts, oracle)
    assert tok.add_bos_token and tok.bos_token == "<bos>" and tok.encode("x")[0] == tok.token_to_id("<bos>")
    assert tok.token_to_id("<end_of_turn>") in tok.eos_token_ids
    # a character outside the vocabulary falls back to <0xNN> bytes and decodes back
    rare = "\U0001d11e\U000e0001"
    ids = tok.encode(rare, add_special_tokens=False)
    assert tok.decode(ids) == rare


# ------------------------------------------------------------------------------ small SentencePiece
def _train_spm(folder: Path) -> Path:
    """A Llama-2-style tokenizer.json (▁ spaces, prefix space, byte fallback), trained on our own sources."""
    from tokenizers import models, pre_tokenizers, trainers

    texts = [p.read_text(encoding="utf-8") for p in sorted((REPO_ROOT / "mistralpy").rglob("*.py"))[:60]]
    tok = HFTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=1500, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(texts, trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    for b in range(256):  # SentencePiece byte pieces
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    # llama.cpp's SPM merges over the whole fragment: no word split, as in Llama 2's tokenizer.json
    data["pre_tokenizer"] = None
    data["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"},
                          {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
    data["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"},
        {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
              "chat_template": "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def test_small_spm_gguf_matches_llama_cpp_and_original(tmp_path):
    """SentencePiece "llama" vocabulary with scores and the default space prefix (Llama 2 / Mistral style)."""
    folder = _train_spm(tmp_path / "spm")
    path = write_vocab_gguf(tmp_path / "spm.gguf", folder, model="llama")
    tok = _load(path)
    oracle = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    texts = HARD_TEXTS + ["<s>[INST] Hi [/INST]</s>", "x</s> after special", "\x00\x01 \x7f"]
    _check_ids(tok, _llama(path), texts, oracle, exact_roundtrip=False)
    assert tok.add_bos_token and tok.bos_token == "<s>" and tok.eos_token == "</s>" and tok.unk_token == "<unk>"
    assert tok.encode("Hi")[0] == tok.token_to_id("<s>")
    assert tok.decode(tok.encode("<s>Hi</s>")) == "Hi"
