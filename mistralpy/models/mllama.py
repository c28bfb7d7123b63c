"""Mllama / Llama 3.2 Vision (``MllamaForConditionalGeneration``): a tiled vision tower
(multimodal/encoders/mllama_vision.py), one linear projector, and a Llama text model in which the
``cross_attention_layers`` attend from text rows to the projected vision rows of the request's
images instead of to the paged cache.

The ``<|image|>`` token stays a token (multimodal/processors/mllama.py); nothing is scattered into the
input embeddings. ``cross_attention = True`` makes the model runner pass, on every step, each scheduled
sequence's visible media (``cross_media``: worker/model_runner.CrossBatch): the item's encoder rows
and the positions that see it. ``embed_multimodal`` returns, per vision row, every cross layer's
normed key and value (computed once per image; the encoder cache holds them for the request's life,
so no step recomputes them and they go with the cache entry).

Rows that see no image (text before the first ``<|image|>``, text-only requests) leave a cross layer
unchanged: attention and MLP outputs are both zeroed, as Meta's reference implementation and vLLM
do. transformers 5.25 zeroes only the MLP part (huggingface/transformers#39379), so its logits differ
from these when text precedes the first image (tests compare with it patched there, and with it as
it is for prompts that start with the image). The paged cache holds the self-attention layers only.

Checkpoint names: the saved layout (``vision_model.*``, ``multi_modal_projector.*``,
``language_model.model.*``, ``language_model.lm_head.*``) and transformers 5's module names
(``model.vision_model.*``, ``model.language_model.*``, ``lm_head.*``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from mistralpy.attention.backend import AttentionBackend
from mistralpy.layers.embedding import LMHead, VocabEmbedding
from mistralpy.layers.linear import Linear, MergedLinear
from mistralpy.layers.norm import RMSNorm
from mistralpy.models.base import CausalLM, cfg_get
from mistralpy.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP
from mistralpy.models.vlm import VisionLanguageModel
from mistralpy.multimodal.encoders.mllama_vision import MllamaVisionModel, vision_config

if TYPE_CHECKING:
    from mistralpy.worker.model_runner import CrossBatch

# (rows lo:hi of the gathered batch rows, keys, values [kv_heads, R, head_dim], mask [hi - lo, R] or None)
Segment = tuple[int, int, torch.Tensor, torch.Tensor, "torch.Tensor | None"]

TEXT_DEFAULTS: dict[str, Any] = {"vocab_size": 128256, "hidden_size": 4096, "hidden_act": "silu",
                                 "num_hidden_layers": 40, "num_attention_heads": 32, "num_key_value_heads": 8,
                                 "intermediate_size": 14336, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072,
                                 "rope_theta": 500000.0, "cross_attention_layers": [3, 8, 13, 18, 23, 28, 33, 38]}


class MllamaTextCrossAttention(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        hidden = cfg["hidden_size"]
        self.num_heads = cfg["num_attention_heads"]
        self.num_kv_heads = cfg_get(cfg, "num_key_value_heads", default=self.num_heads)
        self.head_dim = hidden // self.num_heads
        self.kv_size = self.num_kv_heads * self.head_dim
        eps = cfg.get("rms_norm_eps", 1e-5)
        self.q_proj = Linear(hidden, self.num_heads * self.head_dim, bias=False)
        self.kv_proj = MergedLinear(hidden, [self.kv_size, self.kv_size], bias=False)  # checkpoint k_proj / v_proj
        self.o_proj = Linear(self.num_heads * self.head_dim, hidden, bias=False)
        self.q_norm = RMSNorm(self.head_dim, eps)
        self.k_norm = RMSNorm(self.head_dim, eps)

    def project_kv(self, states: torch.Tensor) -> torch.Tensor:
        """Vision rows [R, hidden] -> [2, kv_heads, R, head_dim]: normed keys, values."""
        k, v = self.kv_proj.split(self.kv_proj(states))
        k = self.k_norm(k.reshape(-1, self.num_kv_heads, self.head_dim))
        return torch.stack([k.transpose(0, 1), v.reshape(k.shape).transpose(0, 1)])

    def forward(self, hidden: torch.Tensor, segments: list[Segment]) -> torch.Tensor:
        """hidden [t, hidden]; per segment (rows lo:hi, k and v [kv_heads, R, head_dim], mask [hi - lo, R]
        or None)."""
        t = hidden.shape[0]
        q = self.q_norm(self.q_proj(hidden).view(t, self.num_heads, self.head_dim))
        outs = []
        for lo, hi, k, v, mask in segments:
            out = F.scaled_dot_product_attention(q[lo:hi].transpose(0, 1)[None], k[None], v[None],
                                                 attn_mask=None if mask is None else mask[None, None],
                                                 enable_gqa=self.num_heads != self.num_kv_heads)
            outs.append(out[0].transpose(0, 1).reshape(hi - lo, -1))
        return self.o_proj(torch.cat(outs) if len(outs) > 1 else outs[0])


class MllamaCrossAttentionDecoderLayer(nn.Module):
    """Tanh-gated cross-attention + MLP; run on the rows that see at least one image only."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        eps = cfg.get("rms_norm_eps", 1e-5)
        self.cross_attn = MllamaTextCrossAttention(cfg)
        self.input_layernorm = RMSNorm(cfg["hidden_size"], eps)
        self.cross_attn_attn_gate = nn.Parameter(torch.empty(1), requires_grad=False)
        self.mlp = LlamaMLP(cfg)
        self.post_attention_layernorm = RMSNorm(cfg["hidden_size"], eps)
        self.cross_attn_mlp_gate = nn.Parameter(torch.empty(1), requires_grad=False)

    def forward(self, hidden: torch.Tensor, segments: list[Segment]) -> torch.Tensor:
        hidden = hidden + self.cross_attn_attn_gate.tanh() * self.cross_attn(self.input_layernorm(hidden), segments)
        return hidden + self.cross_attn_mlp_gate.tanh() * self.mlp(self.post_attention_layernorm(hidden))


class CrossPlan:
    """One step's cross-attention work: the batch rows that see an image (``rows``, gathered once) and,
    per sequence, its slice of them, its visible media's rows and the visibility mask."""

    def __init__(self, cross_media: CrossBatch, positions: torch.Tensor) -> None:
        self.segments: list[tuple[int, int, list[torch.Tensor], torch.Tensor | None]] = []
        rows: list[torch.Tensor] = []
        n = 0
        pos_all = positions.cpu()
        for media, lo, hi in zip(cross_media.media, cross_media.query_start_loc, cross_media.query_start_loc[1:]):
            if not media:
                continue
            pos = pos_all[lo:hi]
            sees = torch.stack([(pos >= m.start) & (pos < m.end) if m.end is not None else pos >= m.start
                                for m in media])                                  # [media, t]
            any_row = sees.any(0)
            if not bool(any_row.any()):
                continue
            take = any_row.nonzero().flatten()
            sees = sees[:, take]
            mask = None
            if not bool(sees.all()):
                counts = torch.tensor([m.rows.shape[0] for m in media])
                mask = sees.t().repeat_interleave(counts, dim=1).to(media[0].rows.device)   # [t, R]
            rows.append(take + lo)
            self.segments.append((n, n + take.numel(), [m.rows for m in media], mask))
            n += take.numel()
        self.rows = torch.cat(rows).to(positions.device) if rows else None
        self.all_rows = self.rows is not None and self.rows.numel() == positions.numel()

    def layer_segments(self, j: int) -> list[Segment]:
        """Segments with cross layer j's keys and values [kv_heads, R, head_dim]: views of the cached
        rows for one visible image, one copy of this layer's part for several."""
        out = []
        for lo, hi, media, mask in self.segments:
            k, v = ([m[:, j, i].permute(1, 0, 2) for m in media] for i in (0, 1))
            out.append((lo, hi, k[0] if len(k) == 1 else torch.cat(k, 1), v[0] if len(v) == 1 else torch.cat(v, 1),
                        mask))
        return out


class MllamaTextModel(nn.Module):
    def __init__(self, cfg: dict[str, Any], backend: AttentionBackend) -> None:
        super().__init__()
        # 8 rows past the vocabulary: ``<|image|>`` (128256) and padding ids live there
        self.embed_tokens = VocabEmbedding(cfg["vocab_size"] + 8, cfg["hidden_size"])
        self.cross_attention_layers = sorted(cfg["cross_attention_layers"])
        cross = set(self.cross_attention_layers)
        self.layers = nn.ModuleList(MllamaCrossAttentionDecoderLayer(cfg) if i in cross
                                    else LlamaDecoderLayer(cfg, i, backend) for i in range(cfg["num_hidden_layers"]))
        self.norm = RMSNorm(cfg["hidden_size"], cfg.get("rms_norm_eps", 1e-5))
        # layer index -> index of its paged cache (self-attention layers only) / of its cross layer
        self.cache_index: dict[int, int] = {}
        self.cross_index: dict[int, int] = {}
        for i in range(len(self.layers)):
            table = self.cross_index if i in cross else self.cache_index
            table[i] = len(table)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], attn_metadata: Any,
                cross_media: CrossBatch | None = None) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        plan = CrossPlan(cross_media, positions) if cross_media is not None else None
        if plan is not None and plan.rows is None:
            plan = None
        for i, layer in enumerate(self.layers):
            if i in self.cache_index:
                hidden = layer(positions, hidden, kv_caches[self.cache_index[i]], attn_metadata)
            elif plan is not None:   # rows that see no image skip the layer (both its outputs are zeroed)
                segments = plan.layer_segments(self.cross_index[i])
                if plan.all_rows:
                    hidden = layer(hidden, segments)
                else:
                    hidden = hidden.index_copy(0, plan.rows, layer(hidden.index_select(0, plan.rows), segments))
        return self.norm(hidden)


class MllamaForCausalLM(CausalLM):
    """The text half: ``language_model.model`` + ``language_model.lm_head``."""

    def __init__(self, cfg: dict[str, Any], backend: AttentionBackend) -> None:
        super().__init__()
        self.model = MllamaTextModel(cfg, backend)
        tied = cfg.get("tie_word_embeddings", False)
        self.lm_head = LMHead(cfg["vocab_size"], cfg["hidden_size"], self.model.embed_tokens if tied else None)
        attn = self.model.layers[next(iter(self.model.cache_index))].self_attn
        self.num_layers = len(self.model.cache_index)
        self.num_kv_heads, self.head_dim = attn.num_kv_heads, attn.head_dim

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()


class MllamaForConditionalGeneration(VisionLanguageModel):
    isq_skip_prefixes = ("vision_model.", "multi_modal_projector")   # the projector is one Linear
    # The model runner passes each step's visible media (``cross_media``) and skips the embedding
    # scatter; native decode and compiled decode decline the model: its decode steps need those
    # media in the cross layers, which their model.model.decode_layers contract cannot carry.
    cross_attention = True
    # cross q is a plain Linear (mapped to itself so the generic q_proj -> qkv_proj rule skips it);
    # cross k / v fuse into kv_proj; the tower's and self-attention's q / k / v into qkv_proj
    stacked_params = (("cross_attn.q_proj", "cross_attn.q_proj", 0), ("cross_attn.kv_proj", "cross_attn.k_proj", 0),
                      ("cross_attn.kv_proj", "cross_attn.v_proj", 1)) + LlamaForCausalLM.stacked_params

    def __init__(self, cfg: dict[str, Any], backend: AttentionBackend) -> None:
        super().__init__()
        cfg = self.complete_config(cfg)
        vcfg, tcfg = cfg["vision_config"], cfg["text_config"]
        self.vision_model = MllamaVisionModel(vcfg)
        self.multi_modal_projector = Linear(vcfg["vision_output_dim"], tcfg["hidden_size"], bias=True)
        self.adopt_text_model(MllamaForCausalLM(tcfg, backend))
        self.stacked_params = type(self).stacked_params

    @staticmethod
    def complete_config(hf_config: dict[str, Any]) -> dict[str, Any]:
        """transformers' defaults for the keys a published config leaves out."""
        text = {**TEXT_DEFAULTS, **{k: v for k, v in (hf_config.get("text_config") or {}).items() if v is not None}}
        return {"image_token_index": 128256, **hf_config, "text_config": text,
                "vision_config": vision_config(hf_config.get("vision_config") or {})}

    # ---- the contract of the model runner ------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list, attn_metadata: Any,
                cross_media: CrossBatch | None = None) -> torch.Tensor:
        return self.language_model.model(input_ids, positions, kv_caches, attn_metadata, cross_media)

    @torch.inference_mode()
    def embed_multimodal(self, item: Any) -> torch.Tensor:
        """One image -> [R, cross layers, 2, kv_heads, head_dim] (R = real tiles * rows per tile): each
        cross layer's normed keys and values of the projected vision rows, laid out layer by layer in
        memory so that a layer's keys are one contiguous [kv_heads, R, head_dim] block. The tower runs
        over the padded tiles too (real rows attend to them); only real tiles' rows are kept, as no text
        row sees the others."""
        n = int(item.inputs["num_tiles"])
        states = self.vision_model(item.inputs["pixel_values"], int(item.inputs["aspect_ratio_id"]))
        rows = self.multi_modal_projector(states[:n].reshape(n * states.shape[1], -1))
        text = self.language_model.model
        kv = torch.stack([text.layers[i].cross_attn.project_kv(rows) for i in text.cross_attention_layers])
        return kv.permute(3, 0, 1, 2, 4)   # rows first for the encoder cache (it counts shape[0])

    # ---- weights ---------------------------------------------------------------------------------
    def map_weight_name(self, name: str) -> str | None:
        return self.common_layout(name)
