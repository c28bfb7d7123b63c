"""Tokenizer: ids and text identical to transformers' AutoTokenizer (the oracle)."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from assets import REAL_TOKENIZERS, load_hf, load_mistralpy, real_tokenizer_dir

from mistralpy.errors import ChatTemplateError, ModelLoadError
from mistralpy.tokenizer.tokenizer import Tokenizer

HARD_STRINGS = [
    "",
    "Hello world",
    " leading space",
    "   three leading spaces and trailing   ",
    "tabs\t\tand\n\n\nnewlines \r\n  mixed \u00a0nbsp \u200b zero-width",
    "日本語のテキスト、中文文本。한국어 텍스트",
    "emoji 😀🎉👍🏽 family 👨‍👩‍👧 flag 🇫🇷",
    "def f(x: int) -> int:\n    return x ** 2  # squared\n\n\nclass A:\n\tpass\n",
    "<|im_start|>user\nhi<|im_end|> <bos><end_of_turn> <|begin_of_text|><|eot_id|> <mask> <start_of_image>",
    "I'm sure they'll say \"don't\" . , ? ! it's",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∑∫√ café naïve Ångström",
    "1234567890 3.14159 -42 1e-9 0xFF",
    "    ",
    "\n",
]


def _check_parity(ours: Tokenizer, hf, rng: random.Random, n_random: int = 150) -> None:
    for text in HARD_STRINGS:
        for special in (True, False):
            assert ours.encode(text, add_special_tokens=special) == hf.encode(text, add_special_tokens=special), \
                (text, special)
        ids = hf.encode(text)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), \
                (text, skip)
    specials = sorted(ours.all_special_ids)
    for _ in range(n_random):
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randrange(1, 24))]
        if specials and rng.random() < 0.5:
            ids.insert(rng.randrange(len(ids) + 1), rng.choice(specials))
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), \
                (ids, skip)


def _check_attributes(ours: Tokenizer, hf) -> None:
    assert ours.vocab_size == len(hf)
    assert ours.bos_token == hf.bos_token and ours.bos_token_id == hf.bos_token_id
    assert ours.eos_token == hf.eos_token and ours.eos_token_id == hf.eos_token_id
    assert ours.eos_token_id in ours.eos_token_ids
    # HF's all_special_ids are the named ones; ours add every special added token.
    assert set(hf.all_special_ids) <= ours.all_special_ids
    for i in (0, 1, ours.vocab_size // 2, ours.vocab_size - 1):
        assert ours.id_to_token(i) == hf.convert_ids_to_tokens(i)


def test_fixture_tokenizer_matches_transformers(tokenizer_dir):
    ours, hf = load_mistralpy(str(tokenizer_dir)), load_hf(str(tokenizer_dir))
    _check_attributes(ours, hf)
    assert ours.eos_token == "<|im_end|>" and ours.bos_token is None and ours.bos_token_id is None
    assert ours.pad_token == "<|endoftext|>"
    _check_parity(ours, hf, random.Random(0))


@pytest.mark.parametrize("name", REAL_TOKENIZERS)
def test_real_tokenizer_matches_transformers(name):
    path = str(real_tokenizer_dir(name))
    ours, hf = load_mistralpy(path), load_hf(path)
    _check_attributes(ours, hf)
    _check_parity(ours, hf, random.Random(hash(name) & 0xFFFF))


def test_real_tokenizer_specials():
    gemma = load_mistralpy(str(real_tokenizer_dir("gemma3")))
    assert gemma.encode("hi")[0] == gemma.bos_token_id == 2 and gemma.add_bos_token
    assert gemma.encode("hi", add_special_tokens=False)[0] != 2
    assert gemma.decode(gemma.encode("a <mask> b")) == "a  b"  # class default mask_token is special
    qwen = load_mistralpy(str(real_tokenizer_dir("qwen3")))
    assert qwen.bos_token_id is None and qwen.encode("hi") == qwen.encode("hi", add_special_tokens=False)
    assert qwen.token_to_id("<|im_start|>") in qwen.all_special_ids
    llama = load_mistralpy(str(real_tokenizer_dir("llama3")))
    # Special tokens written in text are parsed as such (as transformers does).
    assert llama.encode("<|eot_id|>", add_special_tokens=False) == [llama.token_to_id("<|eot_id|>")]


def test_token_texts(tokenizer_dir):
    tok = load_mistralpy(str(tokenizer_dir))
    texts = tok.token_texts()
    assert len(texts) == tok.vocab_size and tok.token_texts() is texts  # cached
    for i in range(0, tok.vocab_size, 97):
        assert texts[i] == tok.decode([i], skip_special_tokens=False)
    assert texts[tok.eos_token_id] == "<|im_end|>"


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def _copy(tokenizer_dir: Path, dst: Path) -> Path:
    shutil.copytree(tokenizer_dir, dst)
    return dst


def test_config_variants_match_transformers(tokenizer_dir, tmp_path):
    """AddedToken dicts, add_bos/add_eos flags, generation_config eos ids, template list + files."""
    d = _copy(tokenizer_dir, tmp_path / "tok")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["bos_token"] = {"content": "<|im_start|>", "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": True, "__type": "AddedToken"}
    cfg["add_bos_token"] = True
    cfg["add_eos_token"] = True
    cfg["chat_template"] = [{"name": "default", "template": "{{ bos_token }}D{{ messages[0]['content'] }}"},
                            {"name": "tool_use", "template": "T{{ tools | length }}"}]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    ours = Tokenizer.from_dir(d)
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(d))
    for text in HARD_STRINGS[:6]:
        assert ours.encode(text) == hf.encode(text)
        assert ours.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)
    # transformers 5 ignores add_bos/eos_token when tokenizer.json exists (its post-processor rules).
    assert ours.bos_token_id == 1 and ours.encode("x") == ours.encode("x", add_special_tokens=False)
    assert not ours.add_bos_token and not ours.add_eos_token
    assert ours.eos_token_ids == frozenset({0, 2})
    msgs = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(msgs) == "<|im_start|>Dhi" == hf.apply_chat_template(msgs, tokenize=False)
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert ours.apply_chat_template(msgs, tools=tools) == "T1" == \
        hf.apply_chat_template(msgs, tools=tools, tokenize=False)

    # chat_template.jinja replaces the config's templates.
    (d / "chat_template.jinja").write_text("J{{ messages | length }}")
    assert Tokenizer.from_dir(d).apply_chat_template(msgs) == "J1"


def test_chat_template_override_and_missing(tokenizer_dir, tmp_path):
    msgs = [{"role": "user", "content": "hi"}]
    assert Tokenizer.from_dir(tokenizer_dir, chat_template_override="X{{ messages[0].content }}") \
        .apply_chat_template(msgs) == "Xhi"
    f = tmp_path / "t.jinja"
    f.write_text("F{{ messages[0].content }}")
    assert Tokenizer.from_dir(tokenizer_dir, chat_template_override=f).apply_chat_template(msgs) == "Fhi"
    assert Tokenizer.from_dir(tokenizer_dir, chat_template_override=str(f)).apply_chat_template(msgs) == "Fhi"
    with pytest.raises(ModelLoadError):
        Tokenizer.from_dir(tokenizer_dir, chat_template_override=str(tmp_path / "absent.jinja"))

    d = _copy(tokenizer_dir, tmp_path / "notemplate")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer.from_dir(d)
    assert tok.chat_template is None
    with pytest.raises(ChatTemplateError):
        tok.apply_chat_template(msgs)
    # A broken template does not stop the model from loading; using it says why.
    cfg["chat_template"] = "{% if %}"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer.from_dir(d)
    with pytest.raises(ChatTemplateError, match="syntax"):
        tok.apply_chat_template(msgs)


def test_from_tokenizers(tokenizer_dir):
    from tokenizers import Tokenizer as HFTokenizer

    backend = HFTokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    tok = Tokenizer.from_tokenizers(backend, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                    chat_template="{{ bos_token }}{{ messages[0].content }}{{ eos_token }}",
                                    add_bos_token=True, extra_eos_token_ids=[1])
    assert tok.bos_token_id == 0 and tok.eos_token_id == 2 and tok.eos_token_ids == frozenset({1, 2})
    ids = tok.encode("hello")
    assert ids[0] == 0 and ids[1:] == tok.encode("hello", add_special_tokens=False)
    assert tok.decode(ids) == "hello"
    assert tok.apply_chat_template([{"role": "user", "content": "q"}]) == "<|endoftext|>q<|im_end|>"
