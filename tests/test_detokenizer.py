"""Incremental detokenizer: streamed deltas add up to decode(), UTF-8 safe, stop strings never leak."""
from __future__ import annotations

import random

import pytest
from assets import REAL_TOKENIZERS, load_mistralpy, real_tokenizer_dir

from mistralpy.engine.detokenizer import IncrementalDetokenizer

TEXTS = [
    "Hello, world! Here is some code:\n```python\ndef f(x):\n    return x * 2\n```\n",
    "日本語のテキストと中文文本。한국어도 있어요.",
    "Emoji: 😀🎉👍🏽 👨‍👩‍👧 🇫🇷 and math ∑∫√ and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢.",
    "   leading spaces,\ttabs\t\tand trailing   \n\n",
    " The capital of France is Paris. Ça va? naïve café",
]


def _stream(tok, ids, rng=None, **kwargs) -> tuple[list[str], IncrementalDetokenizer]:
    """Push ids in random-size chunks; return the non-final deltas plus the final one."""
    rng = rng or random.Random(0)
    d = IncrementalDetokenizer(tok, [1, 2, 3], **kwargs)
    deltas = []
    i = 0
    while i < len(ids):
        k = rng.randint(1, 3)
        d.push(ids[i:i + k])
        i += k
        deltas.append(d.take_delta())
    deltas.append(d.take_delta(final=True))
    return deltas, d


def _tok(name: str):
    return load_mistralpy(str(real_tokenizer_dir(name)))


@pytest.fixture(scope="module")
def fixture_tok(tokenizer_dir):
    return load_mistralpy(str(tokenizer_dir))


@pytest.mark.parametrize("name", REAL_TOKENIZERS + ("fixture",))
def test_deltas_concatenate_to_decode(name, request):
    tok = request.getfixturevalue("fixture_tok") if name == "fixture" else _tok(name)
    rng = random.Random(42)
    specials = sorted(tok.all_special_ids)
    sequences = [tok.encode(t, add_special_tokens=False) for t in TEXTS]
    for _ in range(60):  # random ids, with special tokens sprinkled in
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 30))]
        for _ in range(rng.randint(0, 3)):
            ids.insert(rng.randrange(len(ids) + 1), rng.choice(specials))
        sequences.append(ids)
    for ids in sequences:
        for skip in (True, False):
            deltas, d = _stream(tok, ids, rng, skip_special_tokens=skip)
            expected = tok.decode(ids, skip_special_tokens=skip)
            assert "".join(deltas) == expected == d.output_text, (ids, skip)
            assert d.output_ids == ids


@pytest.mark.parametrize("name", REAL_TOKENIZERS)
def test_no_replacement_char_mid_stream(name):
    """Multi-byte characters split across tokens are held back until complete."""
    tok = _tok(name)
    split_somewhere = False
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        split_somewhere |= any("\ufffd" in tok.decode([i]) for i in ids)
        d = IncrementalDetokenizer(tok, [])
        out = []
        for i in ids:  # one token at a time, the engine's usual case
            d.push([i])
            delta = d.take_delta()
            assert "\ufffd" not in delta, (text, out, delta)
            out.append(delta)
        out.append(d.take_delta(final=True))
        assert "".join(out) == text
    assert split_somewhere or name == "gemma3", "test texts should split a character across tokens"


def test_gemma_byte_fallback_and_spaces():
    tok = _tok("gemma3")
    byte_ids = [tok.token_to_id(f"<0x{b:02X}>") for b in "日😀".encode()]
    assert None not in byte_ids
    hello = tok.encode(" Hello world", add_special_tokens=False)
    assert tok.id_to_token(hello[0]).startswith("▁")
    ids = hello + byte_ids + tok.encode(" again", add_special_tokens=False)
    d = IncrementalDetokenizer(tok, tok.encode("prompt"))
    deltas = []
    for i in ids:
        d.push([i])
        deltas.append(d.take_delta())
    deltas.append(d.take_delta(final=True))
    assert "".join(deltas) == tok.decode(ids) == " Hello world日😀 again"
    assert "日" in deltas and "😀" in deltas  # each character appears whole, when its last byte arrives
    assert all("\ufffd" not in x for x in deltas)
    # An unfinished byte sequence is flushed as U+FFFD only at the end, as decode() does.
    d = IncrementalDetokenizer(tok, [])
    d.push(byte_ids[:2])
    assert d.take_delta() == ""
    assert d.take_delta(final=True) == tok.decode(byte_ids[:2])


def test_invalid_bytes_do_not_stall_forever():
    tok = _tok("gemma3")
    junk = [tok.token_to_id("<0x80>")] * 20 + tok.encode(" ok", add_special_tokens=False)
    deltas, _ = _stream(tok, junk)
    assert "".join(deltas) == tok.decode(junk)
    assert "".join(deltas[:-1]), "text should be released before the final flush"


def test_window_stays_small(fixture_tok):
    """Each step decodes a bounded window, not the whole output."""
    tok = fixture_tok
    ids = tok.encode(TEXTS[0] * 40, add_special_tokens=False)
    sizes = []

    class Spy:
        special_added_ids = tok.special_added_ids

        def decode(self, window, skip_special_tokens=True):
            sizes.append(len(window))
            return tok.decode(window, skip_special_tokens=skip_special_tokens)

    d = IncrementalDetokenizer(Spy(), [])
    for i in ids:
        d.push([i])
    assert d.take_delta(final=True) == tok.decode(ids)
    assert len(ids) > 500 and max(sizes) <= 8


@pytest.mark.parametrize("name", ["qwen3", "gemma3"])
def test_stop_string_across_tokens(name):
    tok = _tok(name)
    text = "The answer is 42.\n###END### and more text after"
    ids = tok.encode(text, add_special_tokens=False)
    stop = "\n###END###"
    # The stop string must span several tokens for this test to mean anything.
    assert not any(stop in tok.decode([i]) for i in ids)
    for include in (False, True):
        d = IncrementalDetokenizer(tok, [], stop=["never", stop], include_stop_str_in_output=include)
        streamed, matched = "", None
        for i in ids:
            matched = d.push([i])
            streamed += d.take_delta()
            assert not streamed.endswith("\n#") or include, "a possible stop start must be withheld"
            if matched:
                break
        streamed += d.take_delta(final=True)
        assert matched == stop == d.stop_reason
        want = "The answer is 42." + (stop if include else "")
        assert streamed == d.output_text == want
        assert d.push(tok.encode(" extra", add_special_tokens=False)) is None  # finished: no more text
        assert d.take_delta(final=True) == ""


def test_stop_prefix_released_when_it_diverges(fixture_tok):
    tok = fixture_tok
    d = IncrementalDetokenizer(tok, [], stop=["STOP", "</answer>"])
    seen = ""
    for piece in ["Go ", "ST", "AR", "T", " </ans", "wer", "s> ", "ST"]:
        assert d.push(tok.encode(piece, add_special_tokens=False)) is None
        seen += d.take_delta()
        assert not seen.endswith("ST") and not seen.endswith("</ans")
    assert seen == "Go STAR" + "T </answers> "
    assert d.take_delta(final=True) == "ST"  # the withheld prefix is output after all
    assert d.output_text == "Go STAR" + "T </answers> ST"


def test_earliest_stop_wins_and_specials(fixture_tok):
    tok = fixture_tok
    ids = tok.encode("a b c d", add_special_tokens=False)
    d = IncrementalDetokenizer(tok, [], stop=["c", "b c"])
    assert d.push(ids) == "b c"
    assert d.take_delta() + d.take_delta(final=True) == "a "
    # Special tokens: skipped by default, kept as text when asked.
    eos = tok.eos_token_id
    for skip, want in ((True, "hi"), (False, "hi<|im_end|>")):
        d = IncrementalDetokenizer(tok, [], skip_special_tokens=skip)
        d.push(tok.encode("hi", add_special_tokens=False) + [eos])
        assert d.take_delta(final=True) == want
    # A stop string made of a special token's text is matched when specials are kept.
    d = IncrementalDetokenizer(tok, [], skip_special_tokens=False, stop=["<|im_end|>"])
    assert d.push(tok.encode("yes", add_special_tokens=False) + [eos]) == "<|im_end|>"
    assert d.take_delta(final=True) == "yes"


def _sentencepiece_strip_tokenizer():
    """A Llama 2 / Mistral style tokenizer: Metaspace with a decoder that strips the leading space."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers, trainers

    from mistralpy.tokenizer.tokenizer import Tokenizer

    tok = HFTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(["The capital of France is Paris. Paris is big."] * 50, trainer=trainer)
    return Tokenizer.from_tokenizers(tok, bos_token="<s>", eos_token="</s>", chat_template=None)


def test_first_output_token_keeps_its_leading_space_after_a_prompt():
    tok = _sentencepiece_strip_tokenizer()
    prompt = tok.encode("The capital of France is", add_special_tokens=False)
    output = tok.encode("Paris.", add_special_tokens=False)  # "▁Paris." as the model would emit it
    assert tok.decode(output) == "Paris."  # decoding alone strips the space ...
    d = IncrementalDetokenizer(tok, prompt)
    d.push(output)
    assert d.take_delta(final=True) == " Paris."  # ... but after the prompt it is part of the text
    assert tok.decode(prompt + output) == "The capital of France is Paris."
