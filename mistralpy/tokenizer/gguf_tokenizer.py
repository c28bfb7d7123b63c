"""Build a `Tokenizer` from the tokenizer stored in a GGUF file's metadata.

The result tokenizes the way llama.cpp does (src/llama-vocab.cpp), expressed as a Hugging Face
`tokenizers` pipeline:

* ``tokenizer.ggml.model == "gpt2"``: byte-level BPE over the GGUF merges; the pre-tokenizer is the
  regex list llama.cpp uses for ``tokenizer.ggml.pre`` (each regex splits the pieces further and the
  text between matches is kept, which is `Split(..., "isolated")`).
* ``tokenizer.ggml.model == "llama"``: SentencePiece vocabularies. llama.cpp merges adjacent symbols
  greedily, always taking the pair whose concatenation is the vocabulary entry with the highest
  score. That is BPE with one merge per (left, right) split of each token, ranked by the score of
  the token it makes, so we build those merges. Spaces become U+2581, `add_space_prefix` prepends
  one to every text fragment (llama.cpp does so after each special token too, as a normalizer does
  on each segment between added tokens), characters outside the vocabulary fall back to <0xNN>.

Control and unknown tokens become special added tokens, user-defined ones plain added tokens: both
are matched whole in the raw text before the model runs, as llama.cpp's special-token partition
does (our encode always parses special tokens, like llama.cpp's ``parse_special=True``).

Known differences: llama.cpp breaks ties between equal SPM scores by position, BPE merges by rank;
tokenizers' regex engine (Oniguruma) and llama.cpp's Unicode tables may disagree on rare code
points. Vocabulary types "t5" (Unigram), "bert" (WordPiece), "rwkv" and others are not supported.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers.models import BPE

from mistralpy.errors import ModelLoadError
from mistralpy.tokenizer.tokenizer import Tokenizer, _read_template_override

if TYPE_CHECKING:
    import gguf

logger = logging.getLogger(__name__)

__all__ = ["tokenizer_from_gguf", "pretokenizer_regexes"]

# GGUF token types (gguf.TokenType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_SPACE = "\u2581"  # SentencePiece's visible space

# ------------------------------------------------------------------------------ pre-tokenizers
# Regexes of llama.cpp's llm_tokenizer_bpe. Where llama.cpp rewrote a tokenizer.json regex for its
# own engine (case-insensitive groups, Unicode classes) we keep the original: Oniguruma runs it.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
          r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
          r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
_DEEPSEEK_LLM_LETTERS = (
    "\\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"
    "\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5"
    "\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba"
    "\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45"
    "\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe"
    "\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc"
    "\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139"
    "\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3"
    "\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06"
    "\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"
    "\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df"
    "\U0001e900-\U0001e943]+")
_DEEPSEEK_V3_MAIN = (r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"""
                     r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_BLOOM = r" ?[^(\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+"

_REGEXES: dict[str, list[str]] = {
    "default": [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]"],
    "gpt2": [_GPT2],
    "llama3": [_LLAMA3],
    "qwen2": [_QWEN2],
    "starcoder": [r"\p{N}", _GPT2],
    "falcon": [r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, "[0-9][0-9][0-9]"],
    "deepseek-llm": ["[\r\n]", _DEEPSEEK_LLM_LETTERS, "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
                     "\\s+$", _CJK, r"\p{N}+"],
    "deepseek-coder": ["[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK, r"\p{N}"],
    "deepseek-v3": [r"\p{N}{1,3}", "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+", _DEEPSEEK_V3_MAIN],
    "tekken": [_TEKKEN],
    "gpt-4o": [_GPT4O],
    "bloom": [_BLOOM],
    "viking": [_BLOOM, r"\p{N}"],
}


@dataclass(frozen=True)
class _PreType:
    regexes: str  # key of _REGEXES
    ignore_merges: bool = False  # a word that is itself a token skips the merges
    add_bos: bool = False  # llama.cpp's default when tokenizer.ggml.add_bos_token is absent


def _pre_table() -> dict[str, _PreType]:
    """`tokenizer.ggml.pre` name -> pre-tokenizer, as llama.cpp's `llama_vocab::impl::load` maps them."""
    groups: list[tuple[_PreType, tuple[str, ...]]] = [
        (_PreType("llama3", ignore_merges=True, add_bos=True),
         ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2")),
        (_PreType("llama3"), ("dbrx", "smaug-bpe", "chatglm-bpe", "glm4")),
        (_PreType("deepseek-llm"), ("deepseek-llm",)),
        (_PreType("deepseek-coder"), ("deepseek-coder",)),
        (_PreType("deepseek-v3"), ("deepseek-v3",)),
        (_PreType("falcon"), ("falcon",)),
        (_PreType("gpt2"), ("gpt-2", "gpt2", "mpt", "phi-2", "olmo", "jais", "jina-es", "jina-de", "jina-v2-es",
                            "jina-v2-de", "jina-v1-en", "jina-v2-code", "roberta-bpe", "gigachat", "a.x-4.0",
                            "mellum", "exaone4", "trillion", "granite-docling", "modern-bert")),
        (_PreType("starcoder"), ("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone",
                                 "minerva-7b")),
        (_PreType("qwen2"), ("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez", "hunyuan", "kormo")),
        (_PreType("tekken", ignore_merges=True, add_bos=True), ("tekken",)),
        (_PreType("gpt-4o"), ("gpt-4o", "llama4", "kanana2")),
        (_PreType("bloom"), ("bloom", "poro-chat", "gpt3-finnish")),
        (_PreType("viking"), ("viking",)),
        (_PreType("default"), ("default", "")),
    ]
    return {name: pre for pre, names in groups for name in names}


_PRE_TYPES = _pre_table()


def _pre_type(name: str) -> _PreType:
    pre = _PRE_TYPES.get(name)
    if pre is None:
        logger.warning("unknown GGUF pre-tokenizer %r: using the gpt-2 regex; tokenization may differ "
                       "from the original model", name)
        return _PreType("gpt2")
    if not name:
        logger.warning("GGUF file names no pre-tokenizer (tokenizer.ggml.pre): using llama.cpp's default "
                       "regexes; consider re-converting the model")
    return pre


def pretokenizer_regexes(pre_name: str) -> list[str]:
    """The split regexes used for a `tokenizer.ggml.pre` name (unknown names: gpt-2)."""
    return list(_REGEXES[_pre_type(pre_name).regexes])


# ------------------------------------------------------------------------------ GGUF metadata
@dataclass
class _Vocab:
    model: str
    pre: str
    tokens: list[str]
    types: list[int]
    scores: list[float] | None
    merges: list[str] | None
    ints: dict[str, int] = field(default_factory=dict)  # special ids
    flags: dict[str, bool] = field(default_factory=dict)  # add_bos_token, add_space_prefix, ...
    templates: dict[str, str] = field(default_factory=dict)


def _field(reader: gguf.GGUFReader, key: str) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return None
    try:
        return f.contents()
    except UnicodeDecodeError:  # a token that is not valid UTF-8: keep the rest readable
        if not f.data:
            return None
        values = [bytes(f.parts[i]).decode("utf-8", errors="replace") for i in f.data]
        return values if len(f.types) > 1 else values[0]


def _read_vocab(reader: gguf.GGUFReader) -> _Vocab:
    model = _field(reader, "tokenizer.ggml.model")
    if model is None:
        raise ModelLoadError("GGUF file has no tokenizer (tokenizer.ggml.model is missing)")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if not tokens:
        raise ModelLoadError("GGUF file has no tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if len(types) < len(tokens):
        raise ModelLoadError(f"tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    scores = _field(reader, "tokenizer.ggml.scores")
    if scores is not None and len(scores) < len(tokens):
        raise ModelLoadError(f"tokenizer.ggml.scores has {len(scores)} entries for {len(tokens)} tokens")
    vocab = _Vocab(model=str(model), pre=str(_field(reader, "tokenizer.ggml.pre") or ""), tokens=list(tokens),
                   types=[int(t) for t in types[:len(tokens)]],
                   scores=[float(s) for s in scores[:len(tokens)]] if scores is not None else None,
                   merges=_field(reader, "tokenizer.ggml.merges"))
    for name in ("bos", "eos", "unknown", "padding", "eot", "eom", "seperator", "mask"):
        value = _field(reader, f"tokenizer.ggml.{name}_token_id")
        if value is not None:
            vocab.ints[name] = int(value)
    for name in ("add_bos_token", "add_eos_token", "add_space_prefix", "remove_extra_whitespaces"):
        value = _field(reader, f"tokenizer.ggml.{name}")
        if value is not None:
            vocab.flags[name] = bool(value)
    vocab.templates = _read_templates(reader)
    return vocab


def _read_templates(reader: gguf.GGUFReader) -> dict[str, str]:
    """`tokenizer.chat_template` plus the named ones (`tokenizer.chat_template.<name>`)."""
    templates: dict[str, str] = {}
    default = _field(reader, "tokenizer.chat_template")
    if isinstance(default, str) and default:
        templates["default"] = default
    names = _field(reader, "tokenizer.chat_templates") or []
    prefix = "tokenizer.chat_template."
    names = list(names) + [k[len(prefix):] for k in reader.fields if k.startswith(prefix)]
    for name in names:
        text = _field(reader, prefix + name)
        if isinstance(text, str) and text and name not in templates:
            templates[name] = text
    return templates


def _dedupe_tokens(tokens: list[str]) -> list[str]:
    """Empty and repeated texts get placeholders so that every id keeps its own vocabulary entry."""
    seen: set[str] = set()
    out = []
    for i, text in enumerate(tokens):
        if not text:
            text = f"[EMPTY_{i}]"  # llama.cpp's name for it
        elif text in seen:
            logger.warning("duplicate token %r at id %d in the GGUF vocabulary; it can only be decoded", text, i)
            text = f"[DUPLICATE_{i}]"
        seen.add(text)
        out.append(text)
    return out


# ------------------------------------------------------------------------------ models
def _bpe_from_merges(vocab: _Vocab, pre: _PreType) -> _HFTokenizer:
    if not vocab.merges:
        raise ModelLoadError("GGUF gpt2 tokenizer has no tokenizer.ggml.merges")
    merges = []
    for line in vocab.merges:
        # llama.cpp splits at the first space after the first character.
        pos = line.find(" ", 1)
        if pos > 0:
            merges.append((line[:pos], line[pos + 1:]))
    ids = {t: i for i, t in enumerate(vocab.tokens)}
    merges = [m for m in merges if m[0] in ids and m[1] in ids and m[0] + m[1] in ids]
    tok = _HFTokenizer(BPE(ids, merges, ignore_merges=pre.ignore_merges, fuse_unk=False, byte_fallback=False))
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in _REGEXES[pre.regexes]]
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def _spm_merges(vocab: _Vocab) -> list[tuple[str, str]]:
    """One merge per way of splitting a token into two tokens, ranked by the token's score (high first).

    llama.cpp's SPM loop merges any adjacent pair whose concatenation is in the vocabulary, picking the
    best-scored result first; control, unknown and byte tokens are matched before it runs.
    """
    ids = {t: i for i, t in enumerate(vocab.tokens)}
    scores = vocab.scores or [0.0] * len(vocab.tokens)
    skip = (CONTROL, UNKNOWN, BYTE)
    get = ids.get
    ranked: list[tuple[float, int, int, str, str]] = []
    for i, text in enumerate(vocab.tokens):
        if len(text) < 2 or vocab.types[i] in skip:
            continue
        score = -scores[i]
        for cut in range(1, len(text)):
            left = text[:cut]
            li = get(left)
            if li is None:
                continue
            right = text[cut:]
            ri = get(right)
            if ri is not None:
                ranked.append((score, li, ri, left, right))
    ranked.sort()  # (score, left id, right id) decide: a pair of ids names one split
    return [(m[3], m[4]) for m in ranked]


def _bpe_from_scores(vocab: _Vocab, add_space_prefix: bool, unk_id: int | None) -> _HFTokenizer:
    ids = {t: i for i, t in enumerate(vocab.tokens)}
    unk = vocab.tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(vocab.tokens) else None
    model = BPE(ids, _spm_merges(vocab), unk_token=unk, fuse_unk=True, byte_fallback=True)
    tok = _HFTokenizer(model)
    steps = [normalizers.Replace(" ", _SPACE)]
    if add_space_prefix:  # llama.cpp puts a space before every text fragment that follows a token
        steps.insert(0, normalizers.Prepend(_SPACE))
    tok.normalizer = normalizers.Sequence(steps)
    dec = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
    return tok


def _add_token_types(tok: _HFTokenizer, vocab: _Vocab) -> None:
    """Control/unknown tokens -> special added tokens; user-defined -> added tokens (raw-text matches)."""
    special, plain = [], []
    for text, kind in zip(vocab.tokens, vocab.types):
        if kind in (CONTROL, UNKNOWN):
            special.append(AddedToken(text, special=True, normalized=False))
        elif kind == USER_DEFINED:
            plain.append(AddedToken(text, special=False, normalized=False))
    if special:
        tok.add_special_tokens(special)
    if plain:
        tok.add_tokens(plain)


# ------------------------------------------------------------------------------ special tokens
# Token texts llama.cpp treats as end of generation, whatever the metadata says.
_EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>", "<EOT>",
              "_<EOT>", "<|end_of_text|>", "<end_of_utterance>", "<\uff5cend\u2581of\u2581sentence\uff5c>")


def _valid_id(vocab: _Vocab, i: int | None) -> int | None:
    if i is None:
        return None
    if not 0 <= i < len(vocab.tokens):
        logger.warning("GGUF special token id %d is outside the vocabulary (%d tokens); ignored",
                       i, len(vocab.tokens))
        return None
    return i


def _eog_ids(vocab: _Vocab) -> list[int]:
    found = [vocab.ints.get("eot"), vocab.ints.get("eom")]
    index = {t: i for i, t in enumerate(vocab.tokens) if t in _EOG_TEXTS}
    # gpt-oss (harmony): "<|end|>" ends a message, not the generation.
    if "<|return|>" in vocab.tokens and "<|call|>" in vocab.tokens:
        index.pop("<|end|>", None)
    found.extend(index.values())
    return [i for i in (_valid_id(vocab, j) for j in found) if i is not None]


def _text(vocab: _Vocab, i: int | None) -> str | None:
    return None if i is None else vocab.tokens[i]


# ------------------------------------------------------------------------------ entry point
def tokenizer_from_gguf(reader: gguf.GGUFReader, *,
                        chat_template_override: str | Path | None = None) -> Tokenizer:
    """The tokenizer of a GGUF file (llama.cpp-compatible ids), with its special tokens and chat templates.

    `chat_template_override` is a template file (.jinja, or .json with a `chat_template` key) or the
    template text itself; it replaces the file's templates.
    """
    vocab = _read_vocab(reader)
    vocab.tokens = _dedupe_tokens(vocab.tokens)
    if vocab.model == "gpt2":
        pre = _pre_type(vocab.pre)
        backend = _bpe_from_merges(vocab, pre)
        default_ids: dict[str, int | None] = {}
        default_add_bos, add_space_prefix = pre.add_bos, False
    elif vocab.model == "llama":
        if vocab.scores is None:
            logger.warning("GGUF SentencePiece vocabulary has no scores: merges follow token order only")
        default_ids = {"bos": 1, "eos": 2, "unknown": 0}  # llama.cpp's SPM defaults
        default_add_bos = True
        add_space_prefix = vocab.flags.get("add_space_prefix", True)
        if vocab.flags.get("remove_extra_whitespaces"):
            logger.warning("tokenizer.ggml.remove_extra_whitespaces is not supported; whitespace is kept")
        unk = _valid_id(vocab, vocab.ints.get("unknown", default_ids["unknown"]))
        backend = _bpe_from_scores(vocab, add_space_prefix, unk)
    else:
        raise ModelLoadError(
            f"GGUF tokenizer model {vocab.model!r} is not supported (supported: 'gpt2' byte-level BPE and "
            "'llama' SentencePiece); pass a Hugging Face tokenizer folder instead")
    _add_token_types(backend, vocab)

    def special(name: str) -> int | None:
        return _valid_id(vocab, vocab.ints.get(name, default_ids.get(name)))

    bos, eos, unk, pad = special("bos"), special("eos"), special("unknown"), special("padding")
    add_bos = vocab.flags.get("add_bos_token", default_add_bos)
    add_eos = vocab.flags.get("add_eos_token", False)
    if add_bos and bos is None:
        logger.warning("GGUF asks to add BOS but has no BOS token; not adding it")
        add_bos = False
    if add_eos and eos is None:
        add_eos = False

    templates = dict(vocab.templates)
    if chat_template_override is not None:
        templates = {"default": _read_template_override(chat_template_override)}
    special_tokens = {"bos_token": _text(vocab, bos), "eos_token": _text(vocab, eos),
                      "unk_token": _text(vocab, unk), "pad_token": _text(vocab, pad)}
    logger.debug("GGUF tokenizer: model=%s pre=%s tokens=%d add_bos=%s add_space_prefix=%s", vocab.model,
                  vocab.pre, len(vocab.tokens), add_bos, add_space_prefix)
    return Tokenizer(backend, special_tokens=special_tokens, templates=templates, add_bos_token=add_bos,
                     add_eos_token=add_eos, extra_eos_token_ids=_eog_ids(vocab))
