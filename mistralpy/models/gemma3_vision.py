"""Gemma 3 as a vision-language model (``Gemma3ForConditionalGeneration``): a SigLIP tower
(multimodal/encoders/siglip.py), Gemma3MultiModalProjector (average-pool the patch grid to
``mm_tokens_per_image``, (1 + w) RMSNorm, a [vision, text] projection) and our Gemma 3 text model
(models/gemma3.py). Each view of an image (the image, then any pan-and-scan crops:
multimodal/processors/gemma3.py) gives mm_tokens_per_image rows for its ``<image_soft_token>`` run.
Image rows are not scaled by sqrt(hidden); text embeddings are (``embed_input_ids``).

Attention among an image's soft tokens. transformers makes each run of soft tokens bidirectional
during prefill when ``token_type_ids`` are passed (what its processor returns, and how the model was
trained): OR(causal, same run) on global layers, AND(window, OR(causal, same run)) on local ones;
decode steps are causal. Our paged attention backend masks causally by position (plus a window), so
``ImageRunAttention`` recomputes the soft-token query rows of each prefill chunk with the keys of
their own run in that chunk visible. That equals transformers whenever each image's run is computed
in one step, which ``keep_media_whole`` asks of the scheduler (core/scheduler.py: a chunk never ends
inside an image; a prefix-cache hit may end inside a run whose cached part was so computed).
``MISTRALPY_GEMMA3_IMAGE_ATTENTION=causal`` opts out (plain causal masks: equal to transformers
called without ``token_type_ids``; chunks may then cut images anywhere).

A ``Gemma3ForConditionalGeneration`` config without ``vision_config`` builds the text part only
(models/gemma3.py), as before this class existed.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mistralpy.attention.backend import AttentionBackend, AttentionSpec
from mistralpy.attention.torch_ref import TorchRefBackend
from mistralpy.layers.norm import RMSNorm
from mistralpy.models.vlm import VisionLanguageModel
from mistralpy.models.gemma3 import TEXT_DEFAULTS, Gemma3ForCausalLM
from mistralpy.models.gemma3 import Gemma3ForConditionalGeneration as Gemma3TextOnly
from mistralpy.multimodal.encoders.siglip import SiglipVisionTransformer, map_siglip_name, siglip_config

log = logging.getLogger(__name__)

# transformers' SiglipVisionConfig sizes (Gemma3Config's vision_config falls back to them).
VISION_DEFAULTS: dict[str, Any] = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                                   "num_attention_heads": 12, "image_size": 224, "patch_size": 16}
TOP_DEFAULTS: dict[str, Any] = {"mm_tokens_per_image": 256, "boi_token_index": 255_999, "eoi_token_index": 256_000,
                                "image_token_index": 262_144}
IMAGE_ATTENTION_ENV = "MISTRALPY_GEMMA3_IMAGE_ATTENTION"   # "bidirectional" (default) | "causal"


class Gemma3MultiModalProjector(nn.Module):
    def __init__(self, vcfg: dict[str, Any], text_hidden: int, tokens_per_image: int) -> None:
        super().__init__()
        vh = vcfg["hidden_size"]
        self.mm_input_projection_weight = nn.Parameter(torch.empty(vh, text_hidden), requires_grad=False)
        self.mm_soft_emb_norm = RMSNorm(vh, vcfg["layer_norm_eps"], offset=1.0)
        self.patches_per_side = vcfg["image_size"] // vcfg["patch_size"]
        tokens_per_side = int(tokens_per_image ** 0.5)
        self.kernel = self.patches_per_side // tokens_per_side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, patches, vision hidden] -> [B, tokens_per_image, text hidden]."""
        b, _, d = x.shape
        grid = x.transpose(1, 2).reshape(b, d, self.patches_per_side, self.patches_per_side)
        pooled = F.avg_pool2d(grid, self.kernel, self.kernel).flatten(2).transpose(1, 2)
        return torch.matmul(self.mm_soft_emb_norm(pooled), self.mm_input_projection_weight).type_as(x)


class ImageRunAttention:
    """The text model's attention backend with bidirectional image runs (the default, see the module
    doc). ``runs`` is set by the model for one forward: (prefill seq of the metadata, first row, end
    row) of each run of two or more soft tokens in a prefill chunk. The inner backend attends as
    usual (and writes the cache); then those query rows are redone over the sequence's cached keys
    with OR(causal, same run) [AND window]. Needs the torch reference backend's metadata."""

    def __init__(self, inner: AttentionBackend) -> None:
        self.inner = inner
        self.name = f"{inner.name}+image_runs"
        self.runs: list[tuple[Any, int, int]] = []

    def build_metadata(self, batch: Any) -> Any:
        return self.inner.build_metadata(batch)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, md: Any, spec: AttentionSpec) -> torch.Tensor:
        out = self.inner.forward(q, k, v, k_cache, v_cache, md, spec)
        hk, d, dv = k_cache.shape[2], k_cache.shape[3], v_cache.shape[3]
        for seq, lo, hi in self.runs:
            keys = k_cache.index_select(0, seq.blocks).view(-1, hk, d)[:seq.seq_len]
            vals = v_cache.index_select(0, seq.blocks).view(-1, hk, dv)[:seq.seq_len]
            off = seq.seq_len - seq.q_end          # row r of this chunk is sequence position r + off
            q_pos = torch.arange(lo + off, hi + off, device=q.device)[:, None]
            k_pos = torch.arange(seq.seq_len, device=q.device)[None, :]
            mask = (k_pos <= q_pos) | ((k_pos >= lo + off) & (k_pos < hi + off))
            if spec.sliding_window is not None:
                mask &= k_pos > q_pos - spec.sliding_window
            scores = torch.matmul(q[lo:hi].transpose(0, 1).float(),
                                  keys.transpose(0, 1).repeat_interleave(q.shape[1] // hk, 0).float().transpose(1, 2))
            scores = scores * spec.scale
            if spec.logit_softcap is not None:
                scores = torch.tanh(scores / spec.logit_softcap) * spec.logit_softcap
            probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
            res = torch.matmul(probs, vals.transpose(0, 1).repeat_interleave(q.shape[1] // hk, 0).float())
            out[lo:hi] = res.transpose(0, 1).to(out.dtype)
        return out


def image_runs(input_ids: torch.Tensor, md: Any, image_id: int) -> list[tuple[Any, int, int]]:
    """(prefill seq, first row, end row) of each maximal run of >= 2 ``image_id`` tokens inside one
    prefill chunk of the step (decode rows are causal in transformers too)."""
    runs: list[tuple[Any, int, int]] = []
    is_img = (input_ids == image_id).tolist()
    for seq in getattr(md, "prefill", ()):
        i = seq.q_start
        while i < seq.q_end:
            if not is_img[i]:
                i += 1
                continue
            j = i
            while j < seq.q_end and is_img[j]:
                j += 1
            if j - i >= 2:
                runs.append((seq, i, j))
            i = j
    return runs


class Gemma3ForConditionalGeneration(VisionLanguageModel):
    isq_skip_prefixes = ("vision_tower.", "multi_modal_projector.")

    def __new__(cls, cfg: dict[str, Any], backend: AttentionBackend) -> Any:
        if not cfg.get("vision_config"):   # a text-only checkpoint of this architecture: no tower
            return Gemma3TextOnly(cfg.get("text_config") or cfg, backend)
        return super().__new__(cls)

    def __init__(self, cfg: dict[str, Any], backend: AttentionBackend) -> None:
        super().__init__()
        cfg = {**TOP_DEFAULTS, **cfg}
        vcfg = siglip_config(cfg["vision_config"], VISION_DEFAULTS)
        tcfg = {**TEXT_DEFAULTS, **cfg["text_config"]}
        if cfg.get("tie_word_embeddings") is not None:   # transformers ties by the top-level flag
            tcfg["tie_word_embeddings"] = bool(cfg["tie_word_embeddings"])
        self.image_token_id = int(cfg["image_token_index"])
        self.vocab_size = int(tcfg["vocab_size"])
        self.vision_tower = SiglipVisionTransformer(vcfg)
        self.multi_modal_projector = Gemma3MultiModalProjector(vcfg, tcfg["hidden_size"],
                                                               int(cfg["mm_tokens_per_image"]))
        mode = os.environ.get(IMAGE_ATTENTION_ENV, "bidirectional").strip().lower()
        if mode not in ("causal", "bidirectional"):
            log.warning("%s=%r: expected bidirectional or causal; using bidirectional", IMAGE_ATTENTION_ENV, mode)
            mode = "bidirectional"
        if mode == "bidirectional" and not isinstance(backend, TorchRefBackend):
            log.warning("bidirectional image attention needs the torch_ref attention backend (not %s); "
                        "using causal", getattr(backend, "name", type(backend).__name__))
            mode = "causal"
        self._runs = ImageRunAttention(backend) if mode == "bidirectional" else None
        self.keep_media_whole = self._runs is not None
        self.adopt_text_model(Gemma3ForCausalLM(tcfg, self._runs or backend))

    @staticmethod
    def complete_config(hf_config: dict[str, Any]) -> dict[str, Any]:
        """Text and vision keys the published configs leave at transformers' defaults, filled in."""
        out = Gemma3TextOnly.complete_config(hf_config)
        if hf_config.get("vision_config"):
            out["vision_config"] = siglip_config(hf_config["vision_config"], VISION_DEFAULTS)
        return {**TOP_DEFAULTS, **out}

    # ---- the contract of the model runner ------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list, attn_metadata: Any,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        lm = self.language_model
        if inputs_embeds is None:
            return lm(input_ids, positions, kv_caches, attn_metadata)
        if self._runs is None:
            return lm.model.decode_layers(positions, inputs_embeds, kv_caches, attn_metadata)
        self._runs.runs = image_runs(input_ids, attn_metadata, self.image_token_id)
        try:
            return lm.model.decode_layers(positions, inputs_embeds, kv_caches, attn_metadata)
        finally:
            self._runs.runs = []

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Scaled text embeddings; ids past the vocabulary (an image token id outside it, as
        transformers allows) look up row 0 and are replaced by image rows."""
        model = self.language_model.model
        ids = input_ids.masked_fill(input_ids >= self.vocab_size, 0)
        hidden = model.embed_tokens(ids)
        return hidden * model.normalizer.to(hidden.dtype)

    @torch.inference_mode()
    def embed_multimodal(self, item: Any) -> torch.Tensor:
        """One image's rows: [views * mm_tokens_per_image, text hidden], view by view."""
        pixels = item.inputs["pixel_values"].to(self.vision_tower.embeddings.patch_embedding.weight.device)
        rows = self.multi_modal_projector(self.vision_tower(pixels))
        return rows.reshape(-1, rows.shape[-1])

    # ---- weights ---------------------------------------------------------------------------------
    def map_weight_name(self, name: str) -> str | None:
        """transformers 5 layout (model.language_model / model.vision_tower / model.multi_modal_projector
        / lm_head) and the older one (language_model.model / language_model.lm_head / vision_tower.
        vision_model / multi_modal_projector)."""
        name = self.common_layout(name)
        if name.startswith("vision_tower."):
            inner = map_siglip_name(name[len("vision_tower."):])
            return None if inner is None else "vision_tower." + inner
        if name.startswith("language_model."):
            return self.map_text_name(name)
        return name   # multi_modal_projector.*
