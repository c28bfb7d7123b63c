"""Tokenizer: a Hugging Face `tokenizers` backend plus the bits of tokenizer_config.json we need.

Encoding and decoding follow transformers' `TokenizersBackend` (what `AutoTokenizer` returns in
transformers 5): named special tokens from the config are registered as special added tokens,
`add_bos_token` / `add_eos_token` given explicitly rebuild the post-processor, and decoding cleans
up spaces (`clean_up_tokenization_spaces`) only for non-BPE models. transformers is not imported.

Known difference: for a few slow-tokenizer classes (e.g. `LlamaTokenizer` with SentencePiece
vocabularies) transformers 5 rebuilds the pipeline in Python instead of using tokenizer.json; we use
tokenizer.json as published, as the `tokenizers` library (and mistral.rs) do.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as _HFTokenizer

from mistralpy.errors import ChatTemplateError, ModelLoadError
from mistralpy.tokenizer.chat_template import ChatTemplate

logger = logging.getLogger(__name__)

__all__ = ["Tokenizer"]

# Named special-token attributes of transformers' tokenizers (the chat template context gets these).
SPECIAL_TOKEN_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                            "mask_token")


# Special tokens that transformers' tokenizer classes default to when the config leaves them out.
_CLASS_DEFAULT_TOKENS: dict[str, dict[str, str]] = {
    "GemmaTokenizer": {"unk_token": "<unk>", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
                       "mask_token": "<mask>"},
    "Qwen2Tokenizer": {"unk_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
    "LlamaTokenizer": {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"},
}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e


def _token_content(value: Any) -> str | None:
    """A special token in a config is a string or an AddedToken dict ({"content": ..., ...})."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _added_token(value: Any) -> AddedToken | None:
    content = _token_content(value)
    if content is None:
        return None
    if isinstance(value, dict):
        return AddedToken(content, single_word=bool(value.get("single_word", False)),
                          lstrip=bool(value.get("lstrip", False)), rstrip=bool(value.get("rstrip", False)),
                          normalized=bool(value.get("normalized", False)), special=True)
    return AddedToken(content, special=True, normalized=False)


def _templates_from_config(value: Any) -> dict[str, str]:
    """tokenizer_config's chat_template: a string, or a list of {"name", "template"}."""
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list):
        return {t["name"]: t["template"] for t in value
                if isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)}
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if isinstance(v, str)}
    return {}


def _read_template_override(value: str | Path) -> str:
    """A path to a template file (.jinja / .json / anything), or the template text itself."""
    if isinstance(value, Path) or ("{" not in value and "\n" not in value and len(value) < 4096):
        path = Path(value)
        if not path.is_file():
            raise ModelLoadError(f"chat template file not found: {path}")
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            data = json.loads(text)
            templates = _templates_from_config(data.get("chat_template") if isinstance(data, dict) else data)
            if "default" not in templates:
                raise ModelLoadError(f"{path} has no default chat_template")
            return templates["default"]
        return text
    return value


class Tokenizer:
    """Text <-> token ids, special tokens and the chat template of one model.

    Build it with `from_dir` (a Hugging Face folder) or `from_tokenizers` (a `tokenizers.Tokenizer`
    built elsewhere, e.g. from GGUF metadata).
    """

    def __init__(self, backend: _HFTokenizer, *, special_tokens: dict[str, str | None],
                 templates: dict[str, str], add_bos_token: bool | None = None, add_eos_token: bool | None = None,
                 extra_eos_token_ids: Sequence[int] = (), extra_special_tokens: Sequence[Any] = (),
                 named_token_values: dict[str, Any] | None = None, clean_up_tokenization_spaces: bool = False,
                 template_context: dict[str, str] | None = None) -> None:
        self._backend = backend
        # Named special tokens become special added tokens, as transformers does on load.
        to_add = []
        for attr, content in special_tokens.items():
            if content is None:
                continue
            tok = _added_token((named_token_values or {}).get(attr, content))
            if tok is not None:
                to_add.append(tok)
        for value in extra_special_tokens:
            tok = _added_token(value)
            if tok is not None:
                to_add.append(tok)
        if to_add:
            backend.add_special_tokens(to_add)

        self.bos_token: str | None = special_tokens.get("bos_token")
        self.eos_token: str | None = special_tokens.get("eos_token")
        self.pad_token: str | None = special_tokens.get("pad_token")
        self.unk_token: str | None = special_tokens.get("unk_token")
        self.bos_token_id = self._id_or_none(self.bos_token)
        self.eos_token_id = self._id_or_none(self.eos_token)
        self.pad_token_id = self._id_or_none(self.pad_token)
        self.add_bos_token = bool(add_bos_token)
        self.add_eos_token = bool(add_eos_token)
        if add_bos_token is not None or add_eos_token is not None or backend.post_processor is None:
            self._rebuild_post_processor()
        # What the post-processor really does (it may come from tokenizer.json).
        probe = backend.encode("", add_special_tokens=True).ids
        self.add_bos_token = bool(probe) and probe[0] == self.bos_token_id
        self.add_eos_token = bool(probe) and probe[-1] == self.eos_token_id

        eos = {int(i) for i in extra_eos_token_ids if i is not None}
        if self.eos_token_id is not None:
            eos.add(self.eos_token_id)
        self.eos_token_ids: frozenset[int] = frozenset(eos)

        added = backend.get_added_tokens_decoder()
        # What `decode(..., skip_special_tokens=True)` drops: added tokens flagged special.
        self.special_added_ids: frozenset[int] = frozenset(i for i, t in added.items() if t.special)
        named = {self._id_or_none(v) for v in special_tokens.values()}
        named |= {self._id_or_none(_token_content(v)) for v in extra_special_tokens}
        named.discard(None)
        self.all_special_ids: frozenset[int] = frozenset(self.special_added_ids | named)
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        model_type = type(backend.model).__name__
        # transformers skips the WordPiece-era space clean-up for BPE models (it corrupts their output).
        self._clean_up_spaces = bool(clean_up_tokenization_spaces) and model_type != "BPE"
        self._token_texts: list[str] | None = None

        context = {k: v for k, v in special_tokens.items() if v is not None}
        context.update(template_context or {})
        self.chat_templates: dict[str, ChatTemplate] = {}
        self.chat_template_errors: dict[str, str] = {}
        for name, source in templates.items():
            try:
                self.chat_templates[name] = ChatTemplate(source, bos_token=self.bos_token,
                                                         eos_token=self.eos_token, extra_context=context)
            except ChatTemplateError as e:  # the model still serves completions without it
                logger.warning("chat template %r is unusable: %s", name, e)
                self.chat_template_errors[name] = str(e)
        self.chat_template: ChatTemplate | None = self.chat_templates.get("default")
        if self.chat_template is None and len(self.chat_templates) == 1:
            self.chat_template = next(iter(self.chat_templates.values()))

    # ----------------------------------------------------------------------------------- loading
    @classmethod
    def from_dir(cls, path: str | Path, *, chat_template_override: str | Path | None = None) -> Tokenizer:
        """Load a Hugging Face tokenizer folder (tokenizer.json + optional configs and templates)."""
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ModelLoadError(
                f"no tokenizer.json in {path}: mistralpy needs a fast-tokenizer file (tokenizer.json); "
                "convert slow tokenizers with transformers' `save_pretrained` first")
        try:
            backend = _HFTokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise ModelLoadError(f"cannot parse {tokenizer_file}: {e}") from e

        config: dict = {}
        if (path / "tokenizer_config.json").is_file():
            config = _read_json(path / "tokenizer_config.json") or {}
        special_map: dict = {}
        if (path / "special_tokens_map.json").is_file():
            special_map = _read_json(path / "special_tokens_map.json") or {}

        named_values: dict[str, Any] = {}
        class_defaults = _CLASS_DEFAULT_TOKENS.get(str(config.get("tokenizer_class", "")).removesuffix("Fast"), {})
        for attr in SPECIAL_TOKEN_ATTRIBUTES:
            # transformers: tokenizer_config wins (an explicit null too), then special_tokens_map.json,
            # then the defaults of the tokenizer class's __init__ (only tokens the vocabulary has).
            if attr in config:
                value = config[attr]
            elif attr in special_map:
                value = special_map[attr]
            else:
                value = class_defaults.get(attr)
                if value is not None and backend.token_to_id(value) is None:
                    value = None
            if _token_content(value) is not None:
                named_values[attr] = value
        special_tokens = {attr: _token_content(v) for attr, v in named_values.items()}

        extra: list[Any] = []
        template_context: dict[str, str] = {}
        for key in ("additional_special_tokens", "extra_special_tokens"):
            for source in (config.get(key), special_map.get(key)):
                if isinstance(source, list):
                    extra.extend(source)
                elif isinstance(source, dict):  # {"boi_token": "<start_of_image>", ...}: named extras
                    for name, value in source.items():
                        content = _token_content(value)
                        if content is not None:
                            extra.append(value)
                            template_context.setdefault(name, content)

        templates = _templates_from_config(config.get("chat_template"))
        if (path / "chat_template.json").is_file():
            data = _read_json(path / "chat_template.json")
            for name, source in _templates_from_config(
                    data.get("chat_template") if isinstance(data, dict) else None).items():
                templates.setdefault(name, source)
        files: dict[str, str] = {}
        if (path / "chat_template.jinja").is_file():
            files["default"] = (path / "chat_template.jinja").read_text(encoding="utf-8")
        extra_dir = path / "additional_chat_templates"
        if extra_dir.is_dir():
            for f in sorted(extra_dir.glob("*.jinja")):
                files[f.stem] = f.read_text(encoding="utf-8")
        if files:  # transformers: template files replace the config's templates
            templates = files
        if chat_template_override is not None:
            templates = {"default": _read_template_override(chat_template_override)}

        extra_eos: list[int] = []
        if (path / "generation_config.json").is_file():
            gen = _read_json(path / "generation_config.json") or {}
            eos = gen.get("eos_token_id")
            if isinstance(eos, int):
                extra_eos.append(eos)
            elif isinstance(eos, list):
                extra_eos.extend(int(i) for i in eos if isinstance(i, int))

        return cls(backend, special_tokens=special_tokens, templates=templates,
                   # transformers 5 ignores add_bos_token/add_eos_token when tokenizer.json exists:
                   # its post-processor decides.
                   add_bos_token=None, add_eos_token=None,
                   extra_eos_token_ids=extra_eos, extra_special_tokens=extra, named_token_values=named_values,
                   clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
                   template_context=template_context)

    @classmethod
    def from_tokenizers(cls, tok: _HFTokenizer, *, bos_token: str | None, eos_token: str | None,
                        chat_template: str | None, add_bos_token: bool = False, add_eos_token: bool = False,
                        extra_eos_token_ids: Sequence[int] = (), unk_token: str | None = None,
                        pad_token: str | None = None) -> Tokenizer:
        """Wrap a `tokenizers.Tokenizer` built elsewhere (GGUF); the post-processor follows the flags."""
        special_tokens = {"bos_token": bos_token, "eos_token": eos_token, "unk_token": unk_token,
                          "pad_token": pad_token}
        return cls(tok, special_tokens=special_tokens,
                   templates={"default": chat_template} if chat_template else {},
                   add_bos_token=add_bos_token, add_eos_token=add_eos_token,
                   extra_eos_token_ids=extra_eos_token_ids)

    @classmethod
    def from_gguf(cls, source: Any, *, chat_template_override: str | Path | None = None) -> Tokenizer:
        """The tokenizer in a GGUF file's metadata; `source` is a path, a `GGUFFile` or a `gguf.GGUFReader`."""
        from mistralpy.tokenizer.gguf_tokenizer import tokenizer_from_gguf

        if isinstance(source, (str, Path)):
            from mistralpy.loading.gguf_loader import open_readers

            source = open_readers([Path(source)])[0]
        return tokenizer_from_gguf(source, chat_template_override=chat_template_override)

    def _id_or_none(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    def _rebuild_post_processor(self) -> None:
        # Same template transformers builds in `update_post_processor`.
        add_bos = self.add_bos_token and self.bos_token is not None and self.bos_token_id is not None
        add_eos = self.add_eos_token and self.eos_token is not None and self.eos_token_id is not None
        self.add_bos_token, self.add_eos_token = add_bos, add_eos
        bos, eos = self.bos_token, self.eos_token
        single = f"{(bos + ':0 ') if add_bos else ''}$A:0{(' ' + eos + ':0') if add_eos else ''}"
        pair = f"{single}{(' ' + bos + ':1') if add_bos else ''} $B:1{(' ' + eos + ':1') if add_eos else ''}"
        special = []
        if add_bos:
            special.append((bos, self.bos_token_id))
        if add_eos:
            special.append((eos, self.eos_token_id))
        self._backend.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                                     special_tokens=special)

    # ------------------------------------------------------------------------------ text <-> ids
    @property
    def backend(self) -> _HFTokenizer:
        """The underlying `tokenizers.Tokenizer` (for grammar engines that need the vocabulary)."""
        return self._backend

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with `add_special_tokens`, BOS/EOS as the post-processor adds them."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids` (partial UTF-8 sequences come out as U+FFFD)."""
        text = self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        if self._clean_up_spaces:
            text = _clean_up_tokenization(text)
        return text

    def id_to_token(self, i: int) -> str | None:
        return self._backend.id_to_token(int(i))

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def get_vocab(self) -> dict[str, int]:
        return self._backend.get_vocab(with_added_tokens=True)

    def token_texts(self) -> list[str]:
        """Decoded text of every id, specials included (cached); lone byte tokens give U+FFFD."""
        if self._token_texts is None:
            n = self.vocab_size
            # Added tokens may sit above get_vocab_size(); cover every id that exists.
            top = max([n - 1, *self._backend.get_added_tokens_decoder().keys()])
            self._token_texts = self._backend.decode_batch([[i] for i in range(top + 1)],
                                                           skip_special_tokens=False)
        return self._token_texts

    def __len__(self) -> int:
        return self.vocab_size

    # ------------------------------------------------------------------------------ chat template
    def get_chat_template(self, tools: Sequence[Any] | None = None, name: str | None = None) -> ChatTemplate:
        """The template to render with: `name` if given, else `tool_use` when tools are passed, else default."""
        if name is not None:
            if name not in self.chat_templates:
                raise ChatTemplateError(f"no chat template named {name!r} (have {sorted(self.chat_templates)})")
            return self.chat_templates[name]
        if tools and "tool_use" in self.chat_templates:
            return self.chat_templates["tool_use"]
        if self.chat_template is None:
            why = "; ".join(f"{k}: {v}" for k, v in self.chat_template_errors.items())
            raise ChatTemplateError(
                "this model has no usable chat template" + (f" ({why})" if why else "")
                + "; pass one with --chat-template")
        return self.chat_template

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, **template_kwargs: Any) -> str:
        """Render `messages` with the model's chat template (transformers-compatible)."""
        template = self.get_chat_template(tools, template_kwargs.pop("chat_template_name", None))
        return template.render(messages, add_generation_prompt=add_generation_prompt, tools=tools,
                               **template_kwargs)


def _clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization` (for WordPiece-style vocabularies)."""
    return (text.replace(" .", ".").replace(" ?", "?").replace(" !", "!").replace(" ,", ",")
            .replace(" ' ", "'").replace(" n't", "n't").replace(" 'm", "'m").replace(" 's", "'s")
            .replace(" 've", "'ve").replace(" 're", "'re"))
