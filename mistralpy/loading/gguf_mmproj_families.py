"""llama.cpp mmproj files beyond LLaVA 1.5: Gemma 3, Qwen2-VL / Qwen2.5-VL and SmolVLM / Idefics3.

``clip.projector_type`` picks the family (tools/mtmd/clip.cpp's PROJECTOR_TYPE_*): "gemma3",
"qwen2vl_merger", "qwen2.5vl_merger", "idefics3". For each, this module builds the HF-style config
of our model class (models/gemma3_vision.py, models/qwen2_vl.py, models/idefics3.py) over the text
GGUF's config, maps the mmproj tensors onto HF checkpoint names and preprocesses images as libmtmd
does (the settings come from the mmproj keys: a GGUF folder has no preprocessor_config.json).

What llama.cpp's converter (conversion/gemma.py, qwenvl.py, smolvlm.py) and clip.cpp do, per family:
- gemma3: SigLIP (``v.*``, post_ln kept) + ``mm.soft_emb_norm`` (stored as 1 + w) and
  ``mm.input_projection`` ([vision, text], F16 in converted files); average pooling by
  ``clip.vision.projector.scale_factor`` (default 4). Images are letterboxed (aspect kept, black
  bars, bilinear) into image_size x image_size; the prompt gets <start_of_image> rows <end_of_image>
  and libmtmd decodes the image rows without the causal mask: our bidirectional image runs, which
  stay opt-in (MISTRALPY_GEMMA3_IMAGE_ATTENTION=bidirectional, models/gemma3_vision.py); the
  default, causal, is transformers without token_type_ids.
- qwen2vl_merger / qwen2.5vl_merger: the Conv3D patch kernel split into ``v.patch_embd.weight`` and
  ``.weight.1`` (temporal slices), q / k / v split out of qkv, the merger's ln_q as ``v.post_ln``,
  ``mm.0`` / ``mm.2`` its MLP. 2.5's window attention: full attention on layers with
  (i + 1) % ``clip.vision.n_wa_pattern`` == 0, windows of 112 px (clip.cpp's fixed size: the file
  does not carry it). Images are letterboxed (bicubic) into the nearest multiple of
  patch * merge within 8 .. 4096 merged tokens, then wrapped in <|vision_start|> ... <|vision_end|>.
- idefics3: SigLIP + ``mm.model.fc`` (the connector, after pixel shuffle by scale_factor). Images are
  resized (Lanczos) to ``clip.vision.preproc_image_size`` on the long side, then to whole tiles of
  image_size; the tiles, row by row, then the whole image at tile size, as transformers does.
GELU: clip.cpp's "use_gelu" towers use the tanh form, as SigLIP's gelu_pytorch_tanh; Qwen2-VL's
merger GELU is erf in transformers and tanh in ggml (kept as transformers, like LLaVA's projector).
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image

from mistralpy.errors import ModelLoadError
from mistralpy.multimodal.inputs import MMItem, PlaceholderRange, content_hash
from mistralpy.multimodal.processors import image_ops
from mistralpy.multimodal.processors.base import MultimodalProcessor

FAMILIES = {"gemma3": "gemma3", "qwen2vl_merger": "qwen2vl", "qwen2.5vl_merger": "qwen2.5vl",
            "idefics3": "idefics3"}
_LAYER_RE = re.compile(r"^v\.blk\.(\d+)\.([a-z_0-9]+)\.(weight|bias)$")
_SIGLIP_LAYER = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                 "attn_out": "self_attn.out_proj", "ln1": "layer_norm1", "ln2": "layer_norm2",
                 "ffn_up": "mlp.fc1", "ffn_down": "mlp.fc2"}
_SIGLIP_FIXED = {"v.patch_embd.weight": "embeddings.patch_embedding.weight",
                 "v.patch_embd.bias": "embeddings.patch_embedding.bias",
                 "v.position_embd.weight": "embeddings.position_embedding.weight",
                 "v.post_ln.weight": "post_layernorm.weight", "v.post_ln.bias": "post_layernorm.bias"}
_QWEN_LAYER = {"attn_out": "attn.proj", "ln1": "norm1", "ln2": "norm2"}
_QWEN_FFN = {"qwen2vl": {"ffn_up": "mlp.fc1", "ffn_down": "mlp.fc2"},
             "qwen2.5vl": {"ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}}
_QWEN_FIXED = {"v.post_ln.weight": "merger.ln_q.weight", "v.post_ln.bias": "merger.ln_q.bias",
               "mm.0.weight": "merger.mlp.0.weight", "mm.0.bias": "merger.mlp.0.bias",
               "mm.2.weight": "merger.mlp.2.weight", "mm.2.bias": "merger.mlp.2.bias"}
# The token ids the expanded positions carry, per family (the vocabulary's own image token).
IMAGE_TOKENS = {"gemma3": "<image_soft_token>", "qwen2vl": "<|image_pad|>", "qwen2.5vl": "<|image_pad|>",
                "idefics3": "<image>"}
QWEN_WINDOW = 112                # clip.cpp's attn_window_size default for Qwen2.5-VL
QWEN_TOKENS_MIN, QWEN_TOKENS_MAX = 8, 4096   # clip.cpp: set_limit_image_tokens(8, 4096)


def _layers(shapes: dict[str, tuple[int, ...]]) -> set[int]:
    return {int(m.group(1)) for n in shapes if (m := _LAYER_RE.match(n))}


class _Keys:
    """An mmproj's keys and tensor shapes, with errors that name the file."""

    def __init__(self, name: str, meta: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> None:
        self.name, self.meta, self.shapes = name, meta, shapes

    def need(self, key: str) -> Any:
        if key not in self.meta:
            raise ModelLoadError(f"{self.name} lacks {key}")
        return self.meta[key]

    def tensors(self, *names: str) -> None:
        missing = [n for n in names if n not in self.shapes]
        if missing:
            raise ModelLoadError(f"{self.name} lacks {missing}")

    def refuse(self, why: str) -> ModelLoadError:
        return ModelLoadError(f"{self.name}: {why}")


def read_family(family: str, name: str, meta: dict[str, Any], shapes: dict[str, tuple[int, ...]]
                ) -> tuple[dict[str, Any], dict[str, Any], int]:
    """(config keys beside text_config, preprocessor settings, projection width) of one mmproj."""
    k = _Keys(name, meta, shapes)
    n_layer = int(k.need("clip.vision.block_count"))
    if _layers(shapes) != set(range(n_layer)):
        raise k.refuse(f"block_count {n_layer} but layers {sorted(_layers(shapes))} are stored")
    pre: dict[str, Any] = {"family": family, "image_size": int(k.need("clip.vision.image_size")),
                           "patch_size": int(k.need("clip.vision.patch_size")),
                           "image_mean": [float(v) for v in k.need("clip.vision.image_mean")][:3],
                           "image_std": [float(v) for v in k.need("clip.vision.image_std")][:3]}
    if family == "gemma3":
        return _gemma3(k, n_layer, pre)
    if family == "idefics3":
        return _idefics3(k, n_layer, pre)
    return _qwen(k, family, n_layer, pre)


def _siglip_vision(k: _Keys, n_layer: int, pre: dict[str, Any]) -> dict[str, Any]:
    """SigLIP's vision_config (Gemma 3's and Idefics3's towers)."""
    size, patch, shapes = pre["image_size"], pre["patch_size"], k.shapes
    k.tensors("v.patch_embd.weight", "v.position_embd.weight", "v.post_ln.weight", "v.blk.0.ffn_up.weight")
    if not k.meta.get("clip.use_gelu"):   # SigLIP's gelu_pytorch_tanh is clip.cpp's "gelu"
        raise k.refuse("a SigLIP tower without clip.use_gelu is not supported")
    if shapes["v.position_embd.weight"][0] != (size // patch) ** 2:
        raise k.refuse(f"position embeddings do not fit image_size {size} / patch {patch}")
    return {"model_type": "siglip_vision_model", "hidden_size": int(k.need("clip.vision.embedding_length")),
            "intermediate_size": shapes["v.blk.0.ffn_up.weight"][0], "num_hidden_layers": n_layer,
            "num_attention_heads": int(k.need("clip.vision.attention.head_count")), "image_size": size,
            "patch_size": patch, "num_channels": shapes["v.patch_embd.weight"][1],
            "layer_norm_eps": float(k.meta.get("clip.vision.attention.layer_norm_epsilon", 1e-6)),
            "hidden_act": "gelu_pytorch_tanh", "vision_use_head": False}


def _gemma3(k: _Keys, n_layer: int, pre: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], int]:
    vision = _siglip_vision(k, n_layer, pre)
    k.tensors("mm.input_projection.weight", "mm.soft_emb_norm.weight")
    merge = int(k.meta.get("clip.vision.projector.scale_factor", 4))   # clip.cpp's default n_merge
    side = pre["image_size"] // pre["patch_size"]
    if side % merge:
        raise k.refuse(f"{side} patches a side do not pool by {merge}")
    tokens = (side // merge) ** 2
    config = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
              "vision_config": vision, "mm_tokens_per_image": tokens}
    return config, pre | {"tokens": tokens, "resample": 2}, k.shapes["mm.input_projection.weight"][1]   # bilinear


def _idefics3(k: _Keys, n_layer: int, pre: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], int]:
    vision = _siglip_vision(k, n_layer, pre)
    k.tensors("mm.model.fc.weight")
    scale = int(k.meta.get("clip.vision.projector.scale_factor", 2))
    config = {"architectures": ["Idefics3ForConditionalGeneration"], "model_type": "idefics3",
              "vision_config": vision, "scale_factor": scale}
    pre |= {"tokens": (pre["image_size"] // pre["patch_size"] // scale) ** 2, "resample": 1,   # Lanczos
            # old files have no preproc_image_size: clip.cpp then sizes by its token limits, which
            # we do not follow (refused below rather than preprocessed differently)
            "longest_edge": int(k.need("clip.vision.preproc_image_size"))}
    return config, pre, k.shapes["mm.model.fc.weight"][0]


def _qwen(k: _Keys, family: str, n_layer: int, pre: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], int]:
    k.tensors("v.patch_embd.weight", "v.patch_embd.weight.1", "mm.0.weight", "mm.2.weight", "v.post_ln.weight",
              "v.blk.0.ffn_up.weight")
    shapes, meta = k.shapes, k.meta
    if "v.patch_embd.bias" in shapes or "v.position_embd.weight" in shapes:
        raise k.refuse("a Qwen2-VL tower with patch bias or position embeddings is not supported")
    hidden, heads = int(k.need("clip.vision.embedding_length")), int(k.need("clip.vision.attention.head_count"))
    merge = int(meta.get("clip.vision.spatial_merge_size", 2))
    out_dim = shapes["mm.2.weight"][0]
    ffn = shapes["v.blk.0.ffn_up.weight"][0]   # (the converter's feed_forward_length is another width)
    if family == "qwen2vl":
        if meta.get("clip.use_silu") or meta.get("clip.use_gelu"):
            raise k.refuse("Qwen2-VL's tower is quick_gelu (clip.cpp's default)")
        vision = {"depth": n_layer, "embed_dim": hidden, "hidden_size": out_dim, "num_heads": heads,
                  "mlp_ratio": ffn / hidden, "hidden_act": "quick_gelu"}
        arch, model_type = "Qwen2VLForConditionalGeneration", "qwen2_vl"
    else:
        if not meta.get("clip.use_silu"):
            raise k.refuse("Qwen2.5-VL's tower is SiLU-gated (clip.use_silu)")
        pattern = int(k.need("clip.vision.n_wa_pattern"))
        full = [i for i in range(n_layer) if (i + 1) % pattern == 0]
        vision = {"depth": n_layer, "hidden_size": hidden, "out_hidden_size": out_dim, "intermediate_size": ffn,
                  "num_heads": heads, "window_size": QWEN_WINDOW, "fullatt_block_indexes": full,
                  "hidden_act": "silu"}
        arch, model_type = "Qwen2_5_VLForConditionalGeneration", "qwen2_5_vl"
    vision |= {"patch_size": pre["patch_size"], "spatial_merge_size": merge, "temporal_patch_size": 2,
               "in_channels": 3}
    area = (pre["patch_size"] * merge) ** 2
    # clip.cpp reads no pixel keys for Qwen-VL: its fixed token limits (--image-min/max-tokens aside)
    pre |= {"merge": merge, "min_pixels": QWEN_TOKENS_MIN * area, "max_pixels": QWEN_TOKENS_MAX * area,
            "resample": 3}   # bicubic
    return {"architectures": [arch], "model_type": model_type, "vision_config": vision}, pre, out_dim


def family_config(text_cfg: dict[str, Any], mm: Any, image_token_id: int) -> dict[str, Any]:
    """The whole HF-style config of the family's model over the GGUF text config."""
    family = mm.family
    if family.startswith("qwen") and not (text_cfg.get("rope_parameters") or {}).get("mrope_section"):
        raise ModelLoadError(f"{mm.path.name} is a Qwen2-VL projector but the text GGUF has no M-RoPE "
                             "(architecture qwen2vl)")
    cfg = {**mm.config, "text_config": text_cfg, "tie_word_embeddings": bool(text_cfg.get("tie_word_embeddings"))}
    if family == "gemma3":
        cfg["image_token_index"] = image_token_id
    else:
        cfg["image_token_id"] = image_token_id
    return cfg


# ---- tensors -----------------------------------------------------------------------------------------

def iter_family_tensors(mm: Any, tensors: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """(mmproj name, float tensor) -> (HF checkpoint name, tensor) for the family's model class."""
    family = mm.family
    if family in ("gemma3", "idefics3"):
        tower = "vision_tower.vision_model." if family == "gemma3" else "model.vision_model."
        for name, t in tensors:
            if name == "mm.input_projection.weight":
                yield "multi_modal_projector.mm_input_projection_weight", t
            elif name == "mm.soft_emb_norm.weight":
                yield "multi_modal_projector.mm_soft_emb_norm.weight", t - 1.0   # the file holds 1 + w
            elif name == "mm.model.fc.weight":
                yield "model.connector.modality_projection.proj.weight", t
            elif name in _SIGLIP_FIXED:
                yield tower + _SIGLIP_FIXED[name], t
            elif (m := _LAYER_RE.match(name)) and m.group(2) in _SIGLIP_LAYER:
                yield f"{tower}encoder.layers.{m.group(1)}.{_SIGLIP_LAYER[m.group(2)]}.{m.group(3)}", t
            else:
                raise ModelLoadError(f"mmproj tensor {name!r} has no place in a {family} model")
        return
    layer_names = {**_QWEN_LAYER, **_QWEN_FFN[family]}
    patch: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for name, t in tensors:
        if name in ("v.patch_embd.weight", "v.patch_embd.weight.1"):
            patch[name] = t
            if len(patch) == 2:   # the Conv3D kernel, its two temporal slices stacked back
                yield "visual.patch_embed.proj.weight", torch.stack(
                    [patch["v.patch_embd.weight"], patch["v.patch_embd.weight.1"]], dim=2)
        elif name in _QWEN_FIXED:
            yield "visual." + _QWEN_FIXED[name], t
        elif (m := _LAYER_RE.match(name)) and m.group(2) in ("attn_q", "attn_k", "attn_v"):
            parts = qkv.setdefault((m.group(1), m.group(3)), {})
            parts[m.group(2)] = t
            if len(parts) == 3:   # transformers keeps one fused qkv
                yield (f"visual.blocks.{m.group(1)}.attn.qkv.{m.group(3)}",
                       torch.cat([parts["attn_q"], parts["attn_k"], parts["attn_v"]]))
        elif m and m.group(2) in layer_names:
            yield f"visual.blocks.{m.group(1)}.{layer_names[m.group(2)]}.{m.group(3)}", t
        else:
            raise ModelLoadError(f"mmproj tensor {name!r} has no place in a {family} model")


# ---- images ------------------------------------------------------------------------------------------

_F = np.float32   # clip.cpp sizes images in float32 (and rounds halves away from zero)


def letterbox(img: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    """uint8 [C, H, W] -> [C, height, width]: resized with its aspect kept (sides rounded up, as
    clip.cpp's PAD_CEIL), centred on black (offsets rounded down); a same-size image is copied."""
    h, w = img.shape[1:]
    if (h, w) == (height, width):
        return img
    scale = min(_F(width) / _F(w), _F(height) / _F(h))
    nw, nh = min(int(np.ceil(_F(w) * scale)), width), min(int(np.ceil(_F(h) * scale)), height)
    out = np.zeros((img.shape[0], height, width), dtype=np.uint8)
    y, x = (height - nh) // 2, (width - nw) // 2
    out[:, y:y + nh, x:x + nw] = image_ops.resize(img, nh, nw, resample)
    return out


def qwen_size(h: int, w: int, align: int, min_px: int, max_px: int) -> tuple[int, int]:
    """clip.cpp's calc_size_preserved_ratio (transformers' smart_resize, in float32): (height, width)."""
    f = _F(align)

    def by(x: np.float32, op) -> int:
        return int(op(_F(x) / f)) * align

    def nearest(v: np.float32) -> np.float32:   # std::round, not Python's round-half-to-even
        return np.floor(v + _F(0.5))

    hb, wb = max(align, by(_F(h), nearest)), max(align, by(_F(w), nearest))
    if hb * wb > max_px:
        beta = np.sqrt(_F(h) * _F(w) / _F(max_px))
        hb, wb = max(align, by(_F(h) / beta, np.floor)), max(align, by(_F(w) / beta, np.floor))
    elif hb * wb < min_px:
        beta = np.sqrt(_F(min_px) / (_F(h) * _F(w)))
        hb, wb = by(_F(h) * beta, np.ceil), by(_F(w) * beta, np.ceil)
    return hb, wb


def idefics3_views(img: np.ndarray, tile: int, longest: int, resample: int) -> tuple[list[np.ndarray], int, int]:
    """(tiles row by row + the whole image at tile size, rows, cols), as libmtmd's idefics3 path."""
    h, w = img.shape[1:]
    if w >= h:
        rw = longest
        rh = int(longest / (w / h))
        rh += rh % 2
    else:
        rh = longest
        rw = int(longest * (w / h))
        rw += rw % 2
    img = image_ops.resize(img, rh, rw, resample) if (rh, rw) != (h, w) else img
    rows, cols = -(-rh // tile), -(-rw // tile)
    if (rows * tile, cols * tile) != (rh, rw):
        img = image_ops.resize(img, rows * tile, cols * tile, resample)
    tiles = [img[:, y * tile:(y + 1) * tile, x * tile:(x + 1) * tile] for y in range(rows) for x in range(cols)]
    whole = image_ops.resize(img, tile, tile, resample) if img.shape[1:] != (tile, tile) else img
    return [*tiles, whole], rows, cols


def _normalize(img: np.ndarray, pp: dict[str, Any]) -> np.ndarray:
    x = image_ops.normalize(image_ops.rescale(img, 1 / 255), pp["image_mean"], pp["image_std"])
    return np.asarray(x, dtype=np.float32)


class GGUFFamilyProcessor(MultimodalProcessor):
    """Images of a GGUF + mmproj model, prepared as libmtmd does; each `<__media__>` (or the family's
    own image placeholder) becomes libmtmd's token layout for the image."""

    def __init__(self, hf_config: dict[str, Any], tokenizer: Any, media_marker: str) -> None:
        pp = hf_config["gguf_mmproj"]["preprocessor"]
        super().__init__(pp, hf_config, tokenizer)
        self.family = pp["family"]
        self.image_placeholder = media_marker
        self.image_token_id = int(hf_config.get("image_token_index", hf_config.get("image_token_id")))
        self.media_id = self._id(media_marker)
        self.markers = {self.media_id}

    def _id(self, token: str) -> int:
        tid = self.tokenizer.token_to_id(token)
        if tid is None:
            raise ModelLoadError(f"the GGUF vocabulary has no {token!r}, which {self.family} images need")
        return int(tid)

    def _text(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def layout(self, item: MMItem) -> tuple[list[int], tuple[bool, ...]]:
        raise NotImplementedError

    def expand(self, token_ids: list[int], items: list[MMItem]) -> list[int]:
        return expand_markers(self, token_ids, items, self.layout)


def expand_markers(proc: Any, token_ids: list[int], items: list[MMItem],
                   layout: Any) -> list[int]:
    """Replace each of ``proc.markers`` in the prompt by ``layout(item) -> (ids, embed mask)`` and
    set the item's placeholder range over the masked positions (libmtmd's marker expansion)."""
    found = sum(t in proc.markers for t in token_ids)
    if found != len(items):
        raise proc.placeholder_count_error(found, len(items))
    out: list[int] = []
    it = iter(items)
    for t in token_ids:
        if t not in proc.markers:
            out.append(t)
            continue
        item = next(it)
        ids, mask = layout(item)
        lo = mask.index(True)
        hi = len(mask) - mask[::-1].index(True)
        sub = mask[lo:hi]
        item.placeholder = PlaceholderRange(len(out) + lo, hi - lo, None if all(sub) else sub)
        out.extend(ids)
    return out


class Gemma3GGUFProcessor(GGUFFamilyProcessor):
    def __init__(self, hf_config: dict[str, Any], tokenizer: Any, media_marker: str) -> None:
        super().__init__(hf_config, tokenizer, media_marker)
        self.boi, self.eoi = self._id("<start_of_image>"), self._id("<end_of_image>")
        self.markers.add(self.boi)   # what HF-style Gemma 3 prompts write for an image

    def process_image(self, image: Image.Image, image_hash: str) -> MMItem:
        pp = self.pp
        size = pp["image_size"]
        img = letterbox(image_ops.to_rgb_array(image), size, size, pp["resample"])
        pixels = torch.from_numpy(_normalize(img, pp))[None]
        return MMItem("image", content_hash(image_hash, "gguf-gemma3", repr(sorted(pp.items()))),
                      {"pixel_values": pixels}, num_embeds=pp["tokens"], extra={"num_crops": 0})

    def layout(self, item: MMItem) -> tuple[list[int], tuple[bool, ...]]:
        n = item.num_embeds
        return [self.boi, *[self.image_token_id] * n, self.eoi], (False, *[True] * n, False)


class QwenVLGGUFProcessor(GGUFFamilyProcessor):
    def __init__(self, hf_config: dict[str, Any], tokenizer: Any, media_marker: str) -> None:
        super().__init__(hf_config, tokenizer, media_marker)
        self.start, self.end = self._id("<|vision_start|>"), self._id("<|vision_end|>")
        self.pad = self.tokenizer.token_to_id("<|image_pad|>")
        self.version = "qwen2_5_vl" if self.family == "qwen2.5vl" else "qwen2_vl"

    def process_image(self, image: Image.Image, image_hash: str) -> MMItem:
        from mistralpy.multimodal.processors.qwen2_vl import patchify

        pp = self.pp
        img = image_ops.to_rgb_array(image)
        h, w = qwen_size(img.shape[1], img.shape[2], pp["patch_size"] * pp["merge"], pp["min_pixels"], pp["max_pixels"])
        x = _normalize(letterbox(img, h, w, pp["resample"]), pp)
        pixels, _, gh, gw = patchify(x[None], pp["patch_size"], pp["merge"], 2)
        return MMItem("image", content_hash(image_hash, "gguf-qwen-vl", repr(sorted(pp.items()))),
                      {"pixel_values": pixels, "image_grid_thw": torch.tensor([[1, gh, gw]])},
                      num_embeds=gh * gw // pp["merge"] ** 2)

    def layout(self, item: MMItem) -> tuple[list[int], tuple[bool, ...]]:
        n = item.num_embeds
        return [self.start, *[self.image_token_id] * n, self.end], (False, *[True] * n, False)

    def expand(self, token_ids: list[int], items: list[MMItem]) -> list[int]:
        """HF-style prompts (<|vision_start|><|image_pad|><|vision_end|>, or a bare <|image_pad|>)
        mark an image too: each such run is one marker."""
        ids: list[int] = []
        i = 0
        while i < len(token_ids):
            if self.pad is not None and token_ids[i:i + 3] == [self.start, self.pad, self.end]:
                ids.append(self.media_id)
                i += 3
                continue
            ids.append(self.media_id if token_ids[i] == self.pad else token_ids[i])
            i += 1
        return super().expand(ids, items)

    def positions(self, token_ids: list[int], items: list[MMItem]) -> tuple[torch.Tensor, int]:
        """M-RoPE positions: libmtmd's image positions (t = start, h / w = start + row / column; the
        text after an image starts at start + max(rows, cols)) are transformers'."""
        from mistralpy.multimodal.mrope import mrope_positions

        return mrope_positions(token_ids, items, self.pp["merge"], None, self.version)


class Idefics3GGUFProcessor(GGUFFamilyProcessor):
    def __init__(self, hf_config: dict[str, Any], tokenizer: Any, media_marker: str) -> None:
        super().__init__(hf_config, tokenizer, media_marker)
        self.fake, self.glob = self._id("<fake_token_around_image>"), self._id("<global-img>")
        if (image := self.tokenizer.token_to_id("<image>")) is not None:
            self.markers.add(int(image))   # an HF-style "<image>" in the prompt

    def process_image(self, image: Image.Image, image_hash: str) -> MMItem:
        pp = self.pp
        views, rows, cols = idefics3_views(image_ops.to_rgb_array(image), pp["image_size"], pp["longest_edge"],
                                           pp["resample"])
        pixels = torch.from_numpy(np.stack([_normalize(v, pp) for v in views]))
        return MMItem("image", content_hash(image_hash, "gguf-idefics3", repr(sorted(pp.items()))),
                      {"pixel_values": pixels}, num_embeds=len(views) * pp["tokens"],
                      extra={"rows": rows, "cols": cols})

    def layout(self, item: MMItem) -> tuple[list[int], tuple[bool, ...]]:
        """libmtmd's MTMD_SLICE_TMPL_IDEFICS3: "<fake_token_around_image><row_r_col_c>" + rows per tile,
        "\\n" between tile rows, then "\\n\\n<fake_token_around_image><global-img>" + rows +
        "<fake_token_around_image>"."""
        n = self.pp["tokens"]
        ids: list[int] = []
        mask: list[bool] = []

        def text(t: list[int]) -> None:
            ids.extend(t)
            mask.extend([False] * len(t))

        def rows() -> None:
            ids.extend([self.image_token_id] * n)
            mask.extend([True] * n)

        r_n, c_n = item.extra["rows"], item.extra["cols"]
        for r in range(r_n):
            for c in range(c_n):
                text([self.fake, self._id(f"<row_{r + 1}_col_{c + 1}>")])
                rows()
            if r != r_n - 1:
                text(self._text("\n"))
        text([*self._text("\n\n"), self.fake, self.glob])
        rows()
        text([self.fake])
        return ids, tuple(mask)


PROCESSORS: dict[str, type[GGUFFamilyProcessor]] = {
    "gemma3": Gemma3GGUFProcessor, "qwen2vl": QwenVLGGUFProcessor, "qwen2.5vl": QwenVLGGUFProcessor,
    "idefics3": Idefics3GGUFProcessor}
