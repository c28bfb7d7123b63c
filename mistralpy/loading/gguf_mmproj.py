"""llama.cpp's multimodal projector files (``mmproj*.gguf``, read by libmtmd's clip.cpp) for LLaVA 1.5;
Gemma 3, Qwen2-VL / Qwen2.5-VL and SmolVLM / Idefics3 projectors: loading/gguf_mmproj_families.py
(``read_mmproj`` and the functions below dispatch on ``MMProj.family``).

A LLaVA GGUF is two files: the text model, a plain ``llama`` GGUF, and an mmproj with the CLIP tower
and the two-layer projector (``clip.projector_type`` "mlp"). This module turns the mmproj into what
``models/llava.py`` reads: an HF-style config (vision_config, feature layer, projector activation), a
preprocessor dict for ``multimodal/processors/llava.py`` and the tensors under HF checkpoint names.

llama.cpp conventions followed (tools/mtmd/clip.cpp, models/llava.cpp, legacy-models/
convert_image_encoder_to_gguf.py):
- ``clip.vision.block_count`` counts the layers stored, which the converter already cut after the
  selected one. ``clip.vision.feature_layer`` lists non-negative hidden-state indices (0 = the
  embeddings after pre_ln); without it clip.cpp runs ``block_count - 1`` layers and reads the last.
- The CLS row is dropped (``patches`` skip it): strategy "default". A ``v.post_ln`` is applied by
  clip.cpp to the deepest state; HF LLaVA never applies post_layernorm, and the converter drops it,
  so a file with one is refused rather than run differently.
- The tower's MLP activation is quick_gelu unless ``clip.use_gelu``; the projector's is GELU. clip.cpp
  computes it with the tanh approximation (and an fp16 table); the checkpoints were trained with
  erf GELU (nn.GELU in LLaVA, "gelu" in llava-hf), which we keep.
- Older files name fc1 / fc2 ``ffn_down`` / ``ffn_up``; like clip.cpp we tell them apart by shape.

Preprocessing: clip.cpp letterboxes the image into image_size x image_size (pad colour (122, 116, 104),
the mean), as LLaVA 1.5's own "pad" aspect mode does; the processor gets ``do_pad`` for that.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

from mistralpy.errors import ModelLoadError
from mistralpy.loading.gguf_file import GGUFFile
from mistralpy.loading.gguf_loader import metadata
from mistralpy.loading.gguf_mmproj_families import (
    FAMILIES,
    IMAGE_TOKENS,
    PROCESSORS,
    expand_markers,
    family_config,
    iter_family_tensors,
    read_family,
)

log = logging.getLogger(__name__)

MMPROJ_GLOB = "*mmproj*.gguf"
# The text a prompt writes for one image: libmtmd's default media marker (mtmd_default_marker()).
MEDIA_MARKER = "<__media__>"

_FIXED = {
    "v.class_embd": "embeddings.class_embedding",
    "v.patch_embd.weight": "embeddings.patch_embedding.weight",
    "v.position_embd.weight": "embeddings.position_embedding.weight",
    "v.pre_ln.weight": "pre_layrnorm.weight",
    "v.pre_ln.bias": "pre_layrnorm.bias",
}
_LAYER = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_out": "self_attn.out_proj", "ln1": "layer_norm1", "ln2": "layer_norm2",
          "ffn_up": "mlp.fc1", "ffn_down": "mlp.fc2"}
_LAYER_RE = re.compile(r"^v\.blk\.(\d+)\.([a-z_0-9]+)\.(weight|bias)$")
_PROJ = {"mm.0.weight": "linear_1.weight", "mm.0.bias": "linear_1.bias",
         "mm.2.weight": "linear_2.weight", "mm.2.bias": "linear_2.bias"}


@dataclass(slots=True)
class MMProj:
    path: Path
    reader: GGUFFile
    config: dict[str, Any]        # the LLaVA keys beside text_config: vision_config, feature layer, ...
    preprocessor: dict[str, Any]  # preprocessor_config.json-like, for processors/llava.py
    projection_dim: int           # width of the projector's output (the text model's hidden size)
    family: str = "llava"         # "llava" or a key of gguf_mmproj_families.PROCESSORS


def find_mmproj(model_path: Path) -> Path | None:
    """The one ``*mmproj*.gguf`` beside a model file (None without one; several are an error)."""
    found = sorted(p for p in model_path.parent.glob(MMPROJ_GLOB) if p.resolve() != model_path.resolve())
    if len(found) > 1:
        raise ModelLoadError(f"several projector files beside {model_path.name}: {[p.name for p in found]}; "
                             "choose one with --mmproj")
    return found[0] if found else None


def _shape(t: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists the fastest dimension first


def read_mmproj(path: str | Path) -> MMProj:
    """Read an mmproj file's header; refuses what models/llava.py cannot run as clip.cpp does."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"mmproj file {str(path)!r} not found")
    try:
        reader = GGUFFile(path)
    except ModelLoadError:
        raise
    except Exception as exc:  # a corrupt header raises struct/index errors
        raise ModelLoadError(f"cannot read mmproj file {path}: {exc}") from exc
    meta = metadata(reader)
    if meta.get("general.architecture") != "clip" or not meta.get("clip.has_vision_encoder", False):
        raise ModelLoadError(f"{path.name} is not a llama.cpp vision projector (general.architecture "
                             f"{meta.get('general.architecture')!r})")
    proj = meta.get("clip.projector_type") or meta.get("clip.vision.projector_type") or "mlp"
    if proj in FAMILIES:
        shapes = {t.name: _shape(t) for t in reader.tensors}
        config, pre, width = read_family(FAMILIES[proj], path.name, meta, shapes)
        return MMProj(path, reader, config, pre, width, FAMILIES[proj])
    if proj != "mlp":
        raise ModelLoadError(f"{path.name}: projector type {proj!r} is not supported (LLaVA 1.5's 'mlp', "
                             f"{', '.join(repr(k) for k in FAMILIES)})")
    if meta.get("clip.vision.image_grid_pinpoints"):
        raise ModelLoadError(f"{path.name}: LLaVA-NeXT (grid pinpoints) projectors are not supported yet")
    shapes = {t.name: _shape(t) for t in reader.tensors}
    if "v.post_ln.weight" in shapes:
        raise ModelLoadError(f"{path.name} has a post-layernorm (v.post_ln), which LLaVA does not apply")
    missing = [n for n in ("v.patch_embd.weight", "v.position_embd.weight", "mm.0.weight", "mm.2.weight")
               if n not in shapes]
    if missing:
        raise ModelLoadError(f"{path.name} lacks {missing}")

    def need(key: str) -> Any:
        if key not in meta:
            raise ModelLoadError(f"{path.name} lacks {key}")
        return meta[key]

    n_layer = int(need("clip.vision.block_count"))
    stored = {int(m.group(1)) for n in shapes if (m := _LAYER_RE.match(n))}
    if stored != set(range(n_layer)):
        raise ModelLoadError(f"{path.name}: block_count {n_layer} but layers {sorted(stored)} are stored")
    layers = [int(v) for v in meta.get("clip.vision.feature_layer") or []]
    # clip.cpp: no feature_layer key -> the output of layer block_count - 1 (an index past 0)
    layers = layers or [n_layer - 1]
    if any(not 0 <= i <= n_layer for i in layers):
        raise ModelLoadError(f"{path.name}: feature layers {layers} outside 0..{n_layer}")
    if meta.get("clip.use_silu"):
        raise ModelLoadError(f"{path.name}: a SiLU CLIP tower is not supported")
    hidden = int(need("clip.vision.embedding_length"))
    size, patch = int(need("clip.vision.image_size")), int(need("clip.vision.patch_size"))
    if shapes["v.position_embd.weight"][0] != (size // patch) ** 2 + ("v.class_embd" in shapes):
        raise ModelLoadError(f"{path.name}: position embeddings do not fit image_size {size} / patch {patch}")
    if "v.class_embd" not in shapes:
        raise ModelLoadError(f"{path.name}: a CLIP tower without a class embedding is not supported")
    vision = {
        "model_type": "clip_vision_model",
        "hidden_size": hidden,
        "intermediate_size": int(need("clip.vision.feed_forward_length")),
        "num_hidden_layers": n_layer,
        "num_attention_heads": int(need("clip.vision.attention.head_count")),
        "image_size": size,
        "patch_size": patch,
        "num_channels": shapes["v.patch_embd.weight"][1],
        "layer_norm_eps": float(meta.get("clip.vision.attention.layer_norm_epsilon", 1e-5)),
        "hidden_act": "gelu" if meta.get("clip.use_gelu") else "quick_gelu",
    }
    config = {
        "vision_config": vision,
        "vision_feature_layer": layers[0] if len(layers) == 1 else layers,
        "vision_feature_select_strategy": "default",
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": "mm.0.bias" in shapes,
    }
    mean = [float(v) for v in meta.get("clip.vision.image_mean") or [0.48145466, 0.4578275, 0.40821073]]
    std = [float(v) for v in meta.get("clip.vision.image_std") or [0.26862954, 0.26130258, 0.27577711]]
    pre = {"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size}, "do_pad": True,
           "do_resize": True, "do_center_crop": True, "resample": 3, "image_mean": mean[:3], "image_std": std[:3]}
    return MMProj(path, reader, config, pre, shapes["mm.2.weight"][0])


def llava_config(text_cfg: dict[str, Any], mm: MMProj, image_token_id: int) -> dict[str, Any]:
    """The whole HF-style LLaVA config: the GGUF's text config and the mmproj's vision side."""
    if mm.projection_dim != text_cfg["hidden_size"]:
        raise ModelLoadError(f"{mm.path.name} projects to {mm.projection_dim} but the text model's hidden size "
                             f"is {text_cfg['hidden_size']}: the projector belongs to another model")
    if mm.family != "llava":
        return family_config(text_cfg, mm, image_token_id)
    return {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
            "text_config": text_cfg, **mm.config, "image_token_index": image_token_id}


def _float(t: Any) -> torch.Tensor:
    from mistralpy.quant.gguf.dequant import dequantize

    shape = _shape(t)
    raw = torch.from_numpy(np.array(t.data, copy=True)).view(torch.uint8)
    return dequantize(raw, Q(t.tensor_type), shape)


def hf_mmproj_name(name: str) -> str | None:
    """mmproj tensor name -> the HF LLaVA checkpoint name models/llava.py maps; None: not used."""
    if name in _FIXED:
        return "vision_tower.vision_model." + _FIXED[name]
    if name in _PROJ:
        return "multi_modal_projector." + _PROJ[name]
    m = _LAYER_RE.match(name)
    if m and m.group(2) in _LAYER:
        return f"vision_tower.vision_model.encoder.layers.{m.group(1)}.{_LAYER[m.group(2)]}.{m.group(3)}"
    raise ModelLoadError(f"mmproj tensor {name!r} has no place in a LLaVA 1.5 model")


def iter_mmproj_tensors(mm: MMProj) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, float32 tensor) for every tensor of the mmproj. The tower stays float (models list
    it under isq_skip_prefixes), so quantized mmproj tensors are dequantized here."""
    if mm.family != "llava":
        yield from iter_family_tensors(mm, ((t.name, _float(t)) for t in mm.reader.tensors))
        return
    hidden = mm.config["vision_config"]["hidden_size"]
    # fc1 reads the hidden width: a layer whose ffn_down does has the legacy (swapped) names; clip.cpp
    # tests exactly this (so with intermediate == hidden it swaps too, and so do we)
    swapped = {m.group(1) for t in mm.reader.tensors
               if (m := _LAYER_RE.match(t.name)) and m.group(2) == "ffn_down" and m.group(3) == "weight"
               and int(t.shape[0]) == hidden}
    for t in mm.reader.tensors:
        name = t.name
        m = _LAYER_RE.match(name)
        if m and m.group(1) in swapped and m.group(2) in ("ffn_up", "ffn_down"):
            name = name.replace("ffn_up", "ffn_tmp").replace("ffn_down", "ffn_up").replace("ffn_tmp", "ffn_down")
        hf = hf_mmproj_name(name)
        if hf is not None:
            yield hf, _float(t)


# ---- the image marker and the processor -------------------------------------------------------------
# llama.cpp's LLaVA 1.5 text models have no image token: libmtmd cuts the prompt at each marker and
# splices the image rows between the text chunks. Here the marker is a special token added to the
# GGUF tokenizer (an id past the model's vocabulary that only lives between tokenizing and `expand`);
# `expand` turns each marker into num_embeds positions of an id inside the vocabulary (`<image>` when
# the vocabulary has it, as llava-hf conversions do, else 0) whose embedding rows the model runner
# overwrites with the image rows, so the id itself never reaches the language model. A vocabulary
# `<image>` is accepted as a marker too (HF-style prompts and chat templates).

def add_media_marker(tokenizer: Any) -> int:
    """Add MEDIA_MARKER as a special token to a GGUF tokenizer (once); returns its id."""
    from tokenizers import AddedToken

    existing = tokenizer.token_to_id(MEDIA_MARKER)
    if existing is not None:
        return int(existing)
    tokenizer.backend.add_special_tokens([AddedToken(MEDIA_MARKER, special=True, normalized=False)])
    marker = int(tokenizer.token_to_id(MEDIA_MARKER))
    # keep the wrapper's special-id sets in step (decode skips it, grammars never emit it)
    tokenizer.special_added_ids = tokenizer.special_added_ids | {marker}
    tokenizer.all_special_ids = tokenizer.all_special_ids | {marker}
    tokenizer._token_texts = None
    return marker


def placeholder_token_id(tokenizer: Any, vocab_size: int) -> int:
    """The in-vocabulary id the expanded image positions carry (see above): the vocabulary's image
    token (Gemma 3 `<image_soft_token>`, Qwen2-VL `<|image_pad|>`, LLaVA / SmolVLM `<image>`, tried
    in that order), else 0."""
    for token in (*dict.fromkeys(IMAGE_TOKENS.values()), "<image>"):
        image = tokenizer.token_to_id(token)
        if image is not None and image < vocab_size:
            return int(image)
    return 0


def marker_ids(tokenizer: Any) -> list[int]:
    """The ids `expand` takes for one image: the added marker and a vocabulary `<image>`."""
    ids = [tokenizer.token_to_id(MEDIA_MARKER), tokenizer.token_to_id("<image>")]
    return [int(i) for i in ids if i is not None]


def gguf_llava_processor(hf_config: dict[str, Any], tokenizer: Any) -> Any:
    """The processor of a GGUF + mmproj model (hf_config as the builder wrote it): LLaVA's, or the
    family's libmtmd-style one (gguf_mmproj_families)."""
    from mistralpy.multimodal.processors.llava import LlavaProcessor

    family = hf_config["gguf_mmproj"]["preprocessor"].get("family", "llava")
    if family != "llava":
        return PROCESSORS[family](hf_config, tokenizer, MEDIA_MARKER)

    class GGUFLlavaProcessor(LlavaProcessor):
        image_placeholder = MEDIA_MARKER

        def __init__(self) -> None:
            super().__init__(hf_config["gguf_mmproj"]["preprocessor"], hf_config, tokenizer)
            self.markers = frozenset(hf_config["gguf_mmproj"]["marker_ids"])

        def expand(self, token_ids: list[int], items: list) -> list[int]:
            # every marker becomes the item's run of image tokens, all of them taking rows
            return expand_markers(self, token_ids, items,
                                  lambda item: ([self.image_token_id] * item.num_embeds, (True,) * item.num_embeds))

    return GGUFLlavaProcessor()
