"""Placeholder expansion on token ids, shared by the processors whose HF counterparts replace a
placeholder in the *text* and tokenize the result (Idefics2/3, SmolVLM, Gemma 3, Pixtral, Llama 4).

``TokenSplicer`` does such expansions on token ids. HF replaces the placeholder in the *text* and
tokenizes the result; added tokens (markers, placeholders) split the text into pieces that are
tokenized alone, so only a text piece that touches an expansion can tokenize differently from the
prompt's own ids (e.g. Gemma 3's "\\n\\n" merging with the user's text in BPE). The splicer re-encodes
exactly those pieces: the prompt's ids there are decoded, joined with the expansion's text and
encoded between the same neighbouring added tokens HF's text has (so offset-sensitive pre-tokenizers
and lstrip/rstrip tokens behave as in HF). Known limits: a run of the prompt's ids whose decoded text
does not tokenize back to the same ids (a lossy normalizer, e.g. NFKC) is kept as it is and the
expansion's text tokenized beside it, which can differ from HF at that boundary; and a leading BOS
is taken as the post-processor's (outside the text) whenever the tokenizer adds one, so a literal
"<bos>" written by a template and encoded without special tokens is seen as the text's start (this
matters only to pre-tokenizers that treat the text's first piece differently, e.g. Metaspace
"first"; Gemma 3's tokenizer does not).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mistralpy.errors import ModelLoadError
from mistralpy.multimodal.inputs import MediaError, MMItem, PlaceholderRange
from mistralpy.multimodal.processors.base import MultimodalProcessor

Piece = int | str   # an added token's id (marker, placeholder) or text that HF's text would hold


@dataclass(slots=True)
class SpliceElement:
    """One piece of the prompt being expanded. ``kind``: "bar" (an added token: it splits HF's text),
    "ids" (a run of the prompt's own non-added ids; ``text`` caches its decoded text) or "text"
    (text of an expansion, or inserted by a clean-up)."""

    kind: str
    ids: list[int] = field(default_factory=list)
    text: str = ""
    owner: int = -1                            # item index; -1: the prompt's own or a boundary
    ctx: tuple[int | None, int | None] = (None, None)   # "ids": original neighbouring added ids


class TokenSplicer:
    """Splices per-item expansions into token ids as HF's text replacement + tokenization does."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        backend = getattr(tokenizer, "backend", None)
        if backend is None:
            raise ModelLoadError("multimodal processors need mistralpy's Tokenizer (with a tokenizers backend)")
        self.backend = backend
        self.added: dict[int, str] = {i: t.content for i, t in backend.get_added_tokens_decoder().items()}
        self._added_by_content = {c: i for i, c in self.added.items()}
        # BOS / EOS the post-processor adds are not in HF's text: they stay outside the text pieces.
        self.head_id = tokenizer.bos_token_id if getattr(tokenizer, "add_bos_token", False) else None
        self.tail_id = tokenizer.eos_token_id if getattr(tokenizer, "add_eos_token", False) else None
        self._cache: dict[tuple[str, int | None, int | None], list[int]] = {}
        self.missing: list[str] = []   # tokens required_id could not find

    # -------------------------------------------------------------------------------- pieces
    def marker(self, text: str) -> Piece:
        """An added token's id, or the text itself (tokenized in context) when it is not one."""
        i = self._added_by_content.get(text)
        return text if i is None else i

    def required_id(self, text: str, config_id: Any = None) -> int:
        """The id of a token an expansion must hold as one token (placeholder, embedding slot): the
        tokenizer's added token ``text`` (what prompts hold; config.json carries class defaults such
        as 255999 even for other vocabularies), else ``config_id`` when it is an added token. A
        missing one is recorded (the model still serves text; ``check_usable`` refuses images)."""
        i = self._added_by_content.get(text)
        if i is None and isinstance(config_id, int) and config_id in self.added:
            i = config_id
        if i is None:
            self.missing.append(text)
            return -1   # never a token id
        return int(i)

    def check_usable(self) -> None:
        if self.missing:
            raise MediaError(f"this model's tokenizer has no {', '.join(map(repr, self.missing))} token(s): "
                             "it cannot take images", "images")

    # ------------------------------------------------------------------------- encode / decode
    def encode_ctx(self, text: str, prev: int | None, nxt: int | None) -> list[int]:
        """``text`` tokenized as HF tokenizes it between added tokens ``prev`` and ``nxt`` (None: the
        start / end of the text)."""
        key = (text, prev, nxt)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        s = (self.added[prev] if prev is not None else "") + text + (self.added[nxt] if nxt is not None else "")
        ids = self.backend.encode(s, add_special_tokens=False).ids
        ok = True
        if prev is not None:
            ok = bool(ids) and ids[0] == prev
            ids = ids[1:]
        if nxt is not None:
            ok = ok and bool(ids) and ids[-1] == nxt
            ids = ids[:-1]
        if not ok:   # the neighbours did not come back as themselves: tokenize the text alone
            ids = self.backend.encode(text, add_special_tokens=False).ids
        if len(text) <= 256:   # the fixed pieces recur; long user text would only bloat the cache
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache[key] = ids
        return ids

    def user_text(self, el: SpliceElement) -> str | None:
        """Text of a run of the prompt's own ids that tokenizes back to exactly those ids where they
        stood, or None. Decoded after its preceding added token (Metaspace decoders drop a leading
        space only at the very start) or alone (a Prepend("▁") normalizer's "▁" is no user space)."""
        if el.text or el.kind != "ids":
            return el.text
        prev = el.ctx[0]
        candidates = []
        if prev is not None:
            s = self.backend.decode([prev, *el.ids], skip_special_tokens=False)
            if s.startswith(self.added[prev]):
                candidates.append(s[len(self.added[prev]):])
        candidates.append(self.backend.decode(el.ids, skip_special_tokens=False))
        for text in dict.fromkeys(candidates):
            if self.encode_ctx(text, *el.ctx) == el.ids:
                el.text = text
                return text
        return None

    def element_text(self, el: SpliceElement) -> str:
        """The text HF's prompt holds for an element (best effort for a run that does not round-trip)."""
        if el.kind == "bar":
            return self.added.get(el.ids[0], "")
        text = self.user_text(el)
        return self.backend.decode(el.ids, skip_special_tokens=False) if text is None else text

    # ---------------------------------------------------------------------------------- splice
    def splice(self, token_ids: Sequence[int], placeholder_id: int, expansions: Sequence[Sequence[Piece]],
               embed_id: int, normalize: Callable[[list[SpliceElement]], list[SpliceElement]] | None = None,
               ) -> tuple[list[int], list[PlaceholderRange]] | int:
        """Expand each ``placeholder_id`` (in order) into ``expansions[k]``. Returns the ids and one
        range per item (first to last added token of its expansion; ``embed_mask`` marks
        ``embed_id``), or the number of placeholders found when it differs from len(expansions).
        ``normalize`` may rewrite the element list first (Idefics2's text clean-ups)."""
        ids = list(token_ids)
        lo, hi = 0, len(ids)
        if self.head_id is not None and hi > 0 and ids[0] == self.head_id:
            lo = 1
        if self.tail_id is not None and hi > lo and ids[-1] == self.tail_id:
            hi -= 1
        found = sum(1 for i in range(lo, hi) if ids[i] == placeholder_id)
        if found != len(expansions):
            return found
        if not expansions and normalize is None:
            return ids, []

        elements = self._elements(ids, lo, hi, placeholder_id, expansions)
        if normalize is not None:
            elements = normalize(elements)
        body, spans = self._emit(elements)

        out = ids[:lo] + body + ids[hi:]
        first: dict[int, int] = {}
        last: dict[int, int] = {}
        pos = lo
        for el, n in spans:
            if el.kind == "bar" and el.owner >= 0:
                first.setdefault(el.owner, pos)
                last[el.owner] = pos
            pos += n
        ranges = []
        for k in range(len(expansions)):
            a, b = first[k], last[k] + 1
            mask = tuple(t == embed_id for t in out[a:b])
            ranges.append(PlaceholderRange(a, b - a, None if all(mask) else mask))
        return out, ranges

    def _elements(self, ids: list[int], lo: int, hi: int, placeholder_id: int,
                  expansions: Sequence[Sequence[Piece]]) -> list[SpliceElement]:
        elements: list[SpliceElement] = []
        k = 0
        run_start = lo
        prev_bar: int | None = None

        def flush(end: int, nxt: int | None) -> None:
            if end > run_start:
                elements.append(SpliceElement("ids", ids[run_start:end], ctx=(prev_bar, nxt)))

        for i in range(lo, hi):
            t = ids[i]
            if t not in self.added:
                continue
            flush(i, t)
            if t == placeholder_id:
                for p in expansions[k]:
                    if isinstance(p, str):
                        elements.append(SpliceElement("text", text=p, owner=k))
                    elif p in self.added:
                        elements.append(SpliceElement("bar", [p], owner=k))
                    else:   # a plain vocabulary id: HF's text would hold its string
                        elements.append(SpliceElement("text", text=self.backend.decode([p], skip_special_tokens=False),
                                                      owner=k))
                k += 1
            else:
                elements.append(SpliceElement("bar", [t]))
            prev_bar = t
            run_start = i + 1
        flush(hi, None)
        return elements

    def _emit(self, elements: list[SpliceElement]) -> tuple[list[int], list[tuple[SpliceElement, int]]]:
        """Ids of the elements; each maximal group of non-added pieces that holds expansion text is
        re-encoded as one text piece, as HF's tokenizer sees it."""
        out: list[int] = []
        spans: list[tuple[SpliceElement, int]] = []
        i = 0
        while i < len(elements):
            el = elements[i]
            if el.kind == "bar":
                out.extend(el.ids)
                spans.append((el, 1))
                i += 1
                continue
            j = i
            while j < len(elements) and elements[j].kind != "bar":
                j += 1
            group = elements[i:j]
            prev = elements[i - 1].ids[0] if i > 0 else None
            nxt = elements[j].ids[0] if j < len(elements) else None
            for el2, ids in self._encode_group(group, prev, nxt):
                out.extend(ids)
                spans.append((el2, len(ids)))
            i = j
        return out, spans

    def _encode_group(self, group: list[SpliceElement], prev: int | None, nxt: int | None,
                      ) -> list[tuple[SpliceElement, list[int]]]:
        if all(el.kind == "ids" for el in group):
            return [(el, el.ids) for el in group]
        owners = {el.owner for el in group}
        owner = owners.pop() if len(owners) == 1 else -1
        # The prompt's ids must come back from their text, else joining would change them.
        texts = [self.user_text(el) for el in group]
        if all(t is not None for t in texts):
            joined = "".join(t for t in texts if t is not None)
            return [(SpliceElement("text", owner=owner), self.encode_ctx(joined, prev, nxt))]
        # Not round-trippable (a lossy decoder): keep the prompt's ids, tokenize the expansion text
        # beside them; may differ from HF at this boundary.
        res = []
        for n, el in enumerate(group):
            if el.kind == "ids":
                res.append((el, el.ids))
            else:
                res.append((el, self.encode_ctx(el.text, prev if n == 0 else None,
                                                nxt if n == len(group) - 1 else None)))
        return res


def expand_with(processor: MultimodalProcessor, splicer: TokenSplicer, token_ids: list[int], items: list[MMItem],
                placeholder_id: int, embed_id: int, expansions: list[list[Piece]],
                normalize: Callable[[list[SpliceElement]], list[SpliceElement]] | None = None) -> list[int]:
    """The shared body of ``expand``: splice, check counts, set each item's placeholder range."""
    if splicer.missing:
        if items:
            splicer.check_usable()
        return list(token_ids)
    res = splicer.splice(token_ids, placeholder_id, expansions, embed_id, normalize)
    if isinstance(res, int):
        raise processor.placeholder_count_error(res, len(items))
    out, ranges = res
    for item, rng in zip(items, ranges):
        if rng.num_embeds != item.num_embeds:   # a processor bug, not a request error
            raise AssertionError(f"expansion holds {rng.num_embeds} embedding slots, the item has {item.num_embeds}")
        item.placeholder = rng
    return out
