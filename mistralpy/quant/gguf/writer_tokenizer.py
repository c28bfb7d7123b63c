"""Hugging Face tokenizer files -> GGUF `tokenizer.*` metadata, laid out as llama.cpp's converter does.

* Byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM) -> `tokenizer.ggml.model = gpt2` with tokens, types
  and merges. llama.cpp picks its pre-tokenizer regexes by `tokenizer.ggml.pre`; its converter finds
  the name by hashing a test string's tokens, we recognise the regexes of tokenizer.json instead.
* SentencePiece-style tokenizer.json (BPE over U+2581 with byte fallback, or Unigram) -> `llama`
  with scores. A BPE model has no scores: a token's score is minus the rank of the first merge that
  makes it, which is what a score-ordered SentencePiece model encodes.

Added tokens: special ones (or ones that look special, like `<|...|>`) become CONTROL, the others
USER_DEFINED (matched whole in the raw text); gaps in the id range and the padding up to the
model's vocabulary size become `[PADn]` UNUSED tokens.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mistralpy.errors import ModelLoadError
from mistralpy.tokenizer.gguf_tokenizer import pretokenizer_regexes

log = logging.getLogger(__name__)

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_SPACE = "\u2581"
# llama.cpp pre-tokenizer names whose regexes we can recognise in a tokenizer.json Split.
_PRE_CANDIDATES = ("llama-bpe", "qwen2", "tekken", "gpt-4o", "deepseek-v3", "deepseek-llm",
                   "deepseek-coder", "falcon", "bloom", "viking")


@dataclass(slots=True)
class TokenizerFields:
    """What goes into the GGUF file (ids index `tokens`)."""
    model: str  # "gpt2" | "llama"
    pre: str | None
    tokens: list[str]
    types: list[int]
    merges: list[str] | None = None
    scores: list[float] | None = None
    ids: dict[str, int] = field(default_factory=dict)  # bos / eos / unk / pad
    flags: dict[str, bool] = field(default_factory=dict)  # add_bos_token, add_eos_token, add_space_prefix
    chat_template: str | list[dict[str, str]] | None = None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc


def _looks_special(text: str) -> bool:
    """The converter's `does_token_look_special`: such added tokens are CONTROL even if not flagged."""
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))
            or (text.startswith("<unused") and text.endswith(">")))


def _is_byte_token(text: str) -> bool:
    return len(text) == 6 and text.startswith("<0x") and text.endswith(">")


def _vocab(model: dict[str, Any]) -> dict[str, int]:
    vocab = model.get("vocab")
    if isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        return {piece: i for i, (piece, _) in enumerate(vocab)}
    return dict(vocab)


def _token_table(tj: dict[str, Any], vocab_size: int, spm: bool) -> tuple[list[str], list[int]]:
    vocab = _vocab(tj["model"])
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    size = max(max(vocab.values(), default=-1), max(added, default=-1)) + 1
    if size > vocab_size:
        raise ModelLoadError(f"the tokenizer has {size} tokens but the model's vocabulary is {vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [UNUSED] * vocab_size
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = BYTE if spm and _is_byte_token(text) else NORMAL
    unk = tj["model"].get("unk_token") if tj["model"].get("type") == "BPE" else None
    if spm and isinstance(unk, str) and unk in vocab:
        types[vocab[unk]] = UNKNOWN
    if spm and tj["model"].get("type") == "Unigram" and tj["model"].get("unk_id") is not None:
        types[int(tj["model"]["unk_id"])] = UNKNOWN
    for i, a in added.items():
        text = a["content"]
        if types[i] == UNKNOWN:
            continue
        if a.get("special") or _looks_special(text):
            types[i] = CONTROL
        else:
            types[i] = USER_DEFINED
            if spm:  # the converter stores user-defined pieces with real spaces
                text = text.replace(_SPACE, " ")
        tokens[i] = text
    return tokens, types


def _flatten(node: dict[str, Any] | None, key: str) -> list[dict[str, Any]]:
    """Steps of a (possibly nested) Sequence pre-tokenizer / normalizer / processor."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [s for child in node.get(key, []) for s in _flatten(child, key)]
    return [node]


def _is_byte_level(tj: dict[str, Any]) -> bool:
    steps = _flatten(tj.get("pre_tokenizer"), "pretokenizers") + _flatten(tj.get("decoder"), "decoders")
    return any(s.get("type") == "ByteLevel" for s in steps)


def detect_pre(tj: dict[str, Any]) -> str:
    """llama.cpp's `tokenizer.ggml.pre` name for a byte-level tokenizer.json ("default" if unknown)."""
    steps = _flatten(tj.get("pre_tokenizer"), "pretokenizers")
    splits = [s["pattern"].get("Regex") for s in steps if s.get("type") == "Split"]
    byte_regex = any(s.get("type") == "ByteLevel" and s.get("use_regex", True) for s in steps)
    digits = any(s.get("type") == "Digits" and s.get("individual_digits") for s in steps)
    if not splits and byte_regex:
        return "smollm" if digits else "gpt-2"  # SmolLM splits digits, then applies GPT-2's regex
    if splits and not digits and None not in splits:
        wanted = splits + ([pretokenizer_regexes("gpt-2")[0]] if byte_regex else [])
        for name in _PRE_CANDIDATES:
            if pretokenizer_regexes(name) == wanted:
                return name
    log.warning("unrecognised pre-tokenizer %s: writing tokenizer.ggml.pre = 'default'; llama.cpp may split "
                "text differently from the original tokenizer", [s.get("type") for s in steps])
    return "default"


def _spm_scores(tj: dict[str, Any], tokens: list[str]) -> list[float]:
    model = tj["model"]
    if model["type"] == "Unigram":
        scores = [0.0] * len(tokens)
        for i, (_, score) in enumerate(model["vocab"]):
            scores[i] = float(score)
        return scores
    first: dict[str, int] = {}
    for rank, m in enumerate(model.get("merges", [])):
        a, b = m if isinstance(m, list) else m.split(" ", 1)
        first.setdefault(a + b, rank)
    floor = float(len(first) + 1)  # single characters and bytes rank below every merge
    return [-float(first[t]) if t in first else -floor for t in tokens]


def _add_space_prefix(tj: dict[str, Any]) -> bool:
    for s in _flatten(tj.get("normalizer"), "normalizers"):
        if s.get("type") == "Prepend" and s.get("prepend") == _SPACE:
            return True
    for s in _flatten(tj.get("pre_tokenizer"), "pretokenizers"):
        if s.get("type") == "Metaspace":
            return s.get("prepend_scheme", "always") != "never" and s.get("add_prefix_space", True)
    return False


def _token_text(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value if isinstance(value, str) else None


def _special_ids(cfg: dict[str, Any], model_cfg: dict[str, Any], ids: dict[str, int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for name in ("bos", "eos", "unk", "pad"):
        text = _token_text(cfg.get(f"{name}_token"))
        if text is not None and text in ids:
            out[name] = ids[text]
            continue
        fallback = model_cfg.get(f"{name}_token_id")  # config.json ids (a list: the first)
        if isinstance(fallback, list):
            fallback = fallback[0] if fallback else None
        if isinstance(fallback, int) and 0 <= fallback < len(ids):
            out[name] = fallback
    return out


def _template_flags(tj: dict[str, Any], cfg: dict[str, Any]) -> dict[str, bool]:
    """add_bos/add_eos: tokenizer_config's flags, else what a post-processor template adds.

    With neither, nothing is written and llama.cpp applies its default for the pre-tokenizer
    (BOS for llama-bpe), as its converter leaves it.
    """
    flags: dict[str, bool] = {}
    single: list[dict[str, Any]] | None = None
    for s in _flatten(tj.get("post_processor"), "processors"):
        if s.get("type") == "TemplateProcessing":
            single = s.get("single", [])
    for key, pos in (("add_bos_token", 0), ("add_eos_token", -1)):
        if isinstance(cfg.get(key), bool):
            flags[key] = cfg[key]
        elif single is not None:
            flags[key] = bool(single) and "SpecialToken" in single[pos]
    return flags


def chat_template(folder: Path, cfg: dict[str, Any]) -> str | list[dict[str, str]] | None:
    """tokenizer_config's chat_template (str or named list), else chat_template.jinja / .json."""
    value = cfg.get("chat_template")
    if isinstance(value, str | list) and value:
        return value
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if (folder / "chat_template.json").is_file():
        return _read_json(folder / "chat_template.json").get("chat_template") or None
    return None


def read_tokenizer(folder: Path, model_cfg: dict[str, Any], vocab_size: int) -> TokenizerFields:
    """The GGUF tokenizer of a Hugging Face model folder (tokenizer.json is required)."""
    if not (folder / "tokenizer.json").is_file():
        raise ModelLoadError(f"{folder} has no tokenizer.json (a fast tokenizer is needed to write the GGUF vocabulary)")
    tj = _read_json(folder / "tokenizer.json")
    cfg = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    kind = tj.get("model", {}).get("type")
    if kind == "BPE" and _is_byte_level(tj):
        tokens, types = _token_table(tj, vocab_size, spm=False)
        merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"].get("merges", [])]
        fields = TokenizerFields("gpt2", detect_pre(tj), tokens, types, merges=merges)
    elif kind == "Unigram" or (kind == "BPE" and tj["model"].get("byte_fallback")):
        tokens, types = _token_table(tj, vocab_size, spm=True)
        fields = TokenizerFields("llama", None, tokens, types, scores=_spm_scores(tj, tokens))
        fields.flags["add_space_prefix"] = _add_space_prefix(tj)
    else:
        raise ModelLoadError(f"tokenizer.json model {kind!r} cannot be written to GGUF: supported are byte-level "
                             "BPE (gpt2) and SentencePiece-style BPE with byte fallback or Unigram (llama)")
    ids = {t: i for i, t in enumerate(tokens)}
    fields.ids = _special_ids(cfg, model_cfg, ids)
    fields.flags.update(_template_flags(tj, cfg))
    fields.chat_template = chat_template(folder, cfg)
    return fields


def add_tokenizer(writer: Any, fields: TokenizerFields) -> None:
    """Write `fields` as tokenizer.* keys onto a gguf.GGUFWriter."""
    writer.add_tokenizer_model(fields.model)
    if fields.pre is not None:
        writer.add_tokenizer_pre(fields.pre)
    writer.add_token_list(fields.tokens)
    writer.add_token_types(fields.types)
    if fields.merges is not None:
        writer.add_token_merges(fields.merges)
    if fields.scores is not None:
        writer.add_token_scores(fields.scores)
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unk": writer.add_unk_token_id,
              "pad": writer.add_pad_token_id}
    for name, i in fields.ids.items():
        adders[name](i)
    flag_adders = {"add_bos_token": writer.add_add_bos_token, "add_eos_token": writer.add_add_eos_token,
                   "add_space_prefix": writer.add_add_space_prefix}
    for name, value in fields.flags.items():
        flag_adders[name](value)
    if fields.chat_template:
        writer.add_chat_template(fields.chat_template)
