"""Idefics3 / SmolVLM preprocessing, and the token-id splicer the Idefics and Gemma 3 families share.

Pixels follow transformers' ``Idefics3ImageProcessorPil`` (SmolVLM's is the same code): resize the
longest edge to ``size.longest_edge`` (even short side), round both sides up to multiples of
``max_image_size.longest_edge``, cut that grid into square tiles and append the whole image resized
to one tile (the "global" image); small images are one tile and no grid.

Text follows ``Idefics3Processor.replace_image_token``: per tile ``<fake_token_around_image>
<row_r_col_c>`` + ``<image>`` x image_seq_len, "\\n" after each grid row, then "\\n<fake_token_around_
image><global-img>" + ``<image>`` x image_seq_len + ``<fake_token_around_image>``.

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

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from mistralpy.errors import ModelLoadError
from mistralpy.multimodal.inputs import MediaError, MMItem, PlaceholderRange, content_hash
from mistralpy.multimodal.processors import image_ops
from mistralpy.multimodal.processors.base import MultimodalProcessor, register_processor

Piece = int | str   # an added token's id (marker, placeholder) or text that HF's text would hold

MAX_IMAGE_SIZE = 4096   # transformers' absolute cap on an Idefics3 image side


# ----------------------------------------------------------------------------- token-id splicing
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


# ---------------------------------------------------------------------------------- shared pixels
def pad_tiles(tiles: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 [C, h, w] tiles -> ([n, C, H, W] zero-padded at the bottom / right, [n, H, W] bool mask
    of real pixels), H, W the largest tile sides (transformers' Idefics pad for one image)."""
    h = max(t.shape[1] for t in tiles)
    w = max(t.shape[2] for t in tiles)
    pixels = np.zeros((len(tiles), tiles[0].shape[0], h, w), dtype=np.float32)
    mask = np.zeros((len(tiles), h, w), dtype=bool)
    for n, t in enumerate(tiles):
        pixels[n, :, :t.shape[1], :t.shape[2]] = t
        mask[n, :t.shape[1], :t.shape[2]] = True
    return torch.from_numpy(pixels), torch.from_numpy(mask)


def rescale_normalize(image: np.ndarray, pp: dict[str, Any]) -> np.ndarray:
    """transformers' rescale then normalize, each where the config enables it; float32 out."""
    out: np.ndarray = image
    if pp.get("do_rescale", True):
        out = image_ops.rescale(out, float(pp.get("rescale_factor", 1 / 255)))
    if pp.get("do_normalize", True):
        mean = pp.get("image_mean") or image_ops.IMAGENET_STANDARD_MEAN
        std = pp.get("image_std") or image_ops.IMAGENET_STANDARD_STD
        # A config may give one number for all channels.
        mean, std = ([v] * out.shape[0] if isinstance(v, (int, float)) else v for v in (mean, std))
        out = image_ops.normalize(out, mean, std)
    return out.astype(np.float32, copy=False)


def _edge(value: Any, default: int) -> int:
    """``{"longest_edge": n}`` or a bare int from a preprocessor config."""
    if isinstance(value, dict):
        value = value.get("longest_edge")
    return int(value) if isinstance(value, (int, float)) and value else default


# ----------------------------------------------------------------------------------- Idefics3 pixels
def _rescale_to_max_len(height: int, width: int, max_len: int) -> tuple[int, int]:
    """Longest side -> max_len, the other by the aspect ratio, rounded up to even, at least 1."""
    aspect = width / height
    if width >= height:
        width = max_len
        height = int(width / aspect)
        height += height % 2
    else:
        height = max_len
        width = int(height * aspect)
        width += width % 2
    return max(height, 1), max(width, 1)


def _scale_below(height: int, width: int, max_len: int) -> tuple[int, int]:
    aspect = width / height
    if width >= height and width > max_len:
        width = max_len
        height = int(width / aspect)
    elif height > width and height > max_len:
        height = max_len
        width = int(height * aspect)
    return max(height, 1), max(width, 1)


def _multiples_of(height: int, width: int, tile: int) -> tuple[int, int]:
    """transformers' resize_for_vision_encoder size: both sides rounded up to multiples of ``tile``."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return height, width


def idefics3_tiles(image: Image.Image, pp: dict[str, Any]) -> tuple[list[np.ndarray], int, int]:
    """Float32 [3, t, t] tiles (grid row-major, then the global image) and the grid's rows, cols
    (0, 0 when the image is one tile), as Idefics3ImageProcessorPil makes them."""
    resample = pp.get("resample", 1)   # LANCZOS
    tile = _edge(pp.get("max_image_size"), 364)
    img = image_ops.to_rgb_array(image)
    if pp.get("do_resize", True):
        size = pp.get("size") or {}
        if isinstance(size, dict) and not size.get("longest_edge") and size.get("height") and size.get("width"):
            h, w = int(size["height"]), int(size["width"])
        else:
            h, w = _rescale_to_max_len(img.shape[1], img.shape[2], _edge(size, 4 * 364))
            h, w = _scale_below(h, w, MAX_IMAGE_SIZE)
        img = image_ops.resize(img, h, w, resample)
    rows = cols = 0
    if pp.get("do_image_splitting", True):
        h, w = _multiples_of(img.shape[1], img.shape[2], tile)
        img = image_ops.resize(img, h, w, resample)
        if h > tile or w > tile:
            rows, cols = (h - tile) // tile + 1, (w - tile) // tile + 1
            frames = [img[:, r * tile:(r + 1) * tile, c * tile:(c + 1) * tile]
                      for r in range(rows) for c in range(cols)]
            frames.append(image_ops.resize(img, tile, tile, resample))
        else:
            frames = [img]
    else:
        frames = [image_ops.resize(img, tile, tile, resample)]
    return [rescale_normalize(f, pp) for f in frames], rows, cols


def _image_seq_len(processor_config: dict[str, Any], hf_config: dict[str, Any], default: int) -> int:
    """<image> tokens per tile: processor_config's image_seq_len, else (image_size / patch)^2 / scale^2."""
    n = processor_config.get("image_seq_len")
    if isinstance(n, int) and n > 0:
        return n
    vision = hf_config.get("vision_config") or {}
    size, patch, scale = vision.get("image_size"), vision.get("patch_size"), hf_config.get("scale_factor")
    if size and patch and scale:
        return int(((size // patch) ** 2) / (scale ** 2))
    return default


@register_processor("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")
class Idefics3Processor(MultimodalProcessor):
    """Idefics3 and SmolVLM images: tiles + a global image, expanded with row / column markers."""

    image_placeholder = "<image>"
    fake_token = "<fake_token_around_image>"
    global_token = "<global-img>"

    def __init__(self, preprocessor_config: dict[str, Any], hf_config: dict[str, Any], tokenizer: Any,
                 processor_config: dict[str, Any] | None = None) -> None:
        super().__init__(preprocessor_config, hf_config, tokenizer, processor_config)
        self.image_seq_len = _image_seq_len(self.processor_config, hf_config, 169)
        self.splicer = TokenSplicer(tokenizer)
        self.image_id = self.splicer.required_id(self.image_placeholder, hf_config.get("image_token_id"))
        self.fake = self.splicer.marker(self.fake_token)
        self.global_img = self.splicer.marker(self.global_token)
        pp = self.pp
        self._settings = ("idefics3", pp.get("do_resize", True), repr(pp.get("size")),
                          _edge(pp.get("max_image_size"), 364), pp.get("do_image_splitting", True),
                          pp.get("resample", 1), pp.get("do_rescale", True), pp.get("rescale_factor", 1 / 255),
                          pp.get("do_normalize", True), repr(pp.get("image_mean")), repr(pp.get("image_std")))

    def process_image(self, image: Image.Image, image_hash: str) -> MMItem:
        self.splicer.check_usable()
        tiles, rows, cols = idefics3_tiles(image, self.pp)
        pixels, mask = pad_tiles(tiles)
        return MMItem("image", content_hash(image_hash, *self._settings),
                      {"pixel_values": pixels, "pixel_attention_mask": mask},
                      num_embeds=len(tiles) * self.image_seq_len, extra={"rows": rows, "cols": cols})

    def expansion(self, rows: int, cols: int) -> list[Piece]:
        """The pieces of Idefics3Processor.replace_image_token for a rows x cols grid."""
        images: list[Piece] = [self.image_id] * self.image_seq_len
        pieces: list[Piece] = []
        for r in range(rows):
            for c in range(cols):
                pieces += [self.fake, self.splicer.marker(f"<row_{r + 1}_col_{c + 1}>"), *images]
            pieces.append("\n")
        if rows or cols:
            pieces.append("\n")
        return [*pieces, self.fake, self.global_img, *images, self.fake]

    def expand(self, token_ids: list[int], items: list[MMItem]) -> list[int]:
        expansions = [self.expansion(it.extra["rows"], it.extra["cols"]) for it in items]
        return expand_with(self, self.splicer, token_ids, items, self.image_id, self.image_id, expansions)



__all__ = ["Idefics3Processor", "Piece", "SpliceElement", "TokenSplicer", "expand_with", "idefics3_tiles",
           "pad_tiles", "rescale_normalize"]
