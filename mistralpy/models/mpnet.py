"""MPNet encoders (all-mpnet-base-v2, ...): BERT's post-LayerNorm layer with no token types, RoBERTa
positions (counted from padding_idx + 1 = 2) and a T5-style relative position bias, one table of
``relative_attention_num_buckets`` buckets x heads shared by every layer and added to the scores.

transformers names the layer's parts ``attention.attn.{q,k,v,o}`` and ``attention.LayerNorm``."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from mistralpy.embed.attention import BidirectionalBackend, BidirectionalMetadata
from mistralpy.layers.embedding import VocabEmbedding
from mistralpy.layers.norm import LayerNorm
from mistralpy.models.bert import BertDenseNorm, BertIntermediate, BertModel, BertSelfAttention, EncoderLinear


def relative_position_bucket(relative: torch.Tensor, num_buckets: int = 32, max_distance: int = 128) -> torch.Tensor:
    """MPNet's buckets: half for each direction; within one, exact distances below a quarter of the
    buckets, then logarithmically wider ones up to max_distance (later distances share the last)."""
    n = -relative
    half = num_buckets // 2
    ret = (n < 0).long() * half
    n = n.abs()
    exact = half // 2
    large = exact + (torch.log(n.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                     * (half - exact)).long()
    large = large.clamp(max=half - 1)
    return ret + torch.where(n < exact, n, large)


class MPNetSelfAttention(BertSelfAttention):
    """q / k / v fused as BERT's (shard names ``q``, ``k``, ``v``), then the output projection ``o``."""

    def __init__(self, cfg: dict[str, Any], backend: BidirectionalBackend) -> None:
        super().__init__(cfg, backend)
        self.o = EncoderLinear(cfg["hidden_size"], cfg["hidden_size"], bias=True)

    def forward(self, hidden: torch.Tensor, md: BidirectionalMetadata, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.o(super().forward(hidden, md, bias))


class MPNetAttention(nn.Module):
    def __init__(self, cfg: dict[str, Any], backend: BidirectionalBackend) -> None:
        super().__init__()
        self.attn = MPNetSelfAttention(cfg, backend)
        self.LayerNorm = LayerNorm(cfg["hidden_size"], cfg.get("layer_norm_eps", 1e-12))

    @property
    def self(self) -> MPNetSelfAttention:  # BertModel reads sizes from encoder.layer[0].attention.self
        return self.attn

    def forward(self, hidden: torch.Tensor, md: BidirectionalMetadata, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.LayerNorm(self.attn(hidden, md, bias) + hidden)


class MPNetLayer(nn.Module):
    def __init__(self, cfg: dict[str, Any], backend: BidirectionalBackend) -> None:
        super().__init__()
        self.attention = MPNetAttention(cfg, backend)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertDenseNorm(cfg["intermediate_size"], cfg["hidden_size"], cfg.get("layer_norm_eps", 1e-12))

    def forward(self, hidden: torch.Tensor, md: BidirectionalMetadata, bias: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.attention(hidden, md, bias)
        return self.output(self.intermediate(hidden), hidden)


class MPNetModel(BertModel):
    position_offset = 2      # padding_idx (1) + 1
    token_types = False
    layer_cls = MPNetLayer
    stacked_params = (("qkv_proj", "q", 0), ("qkv_proj", "k", 1), ("qkv_proj", "v", 2))

    def __init__(self, cfg: dict[str, Any], backend: Any = None) -> None:
        super().__init__(cfg, backend)
        self.num_buckets = int(cfg.get("relative_attention_num_buckets", 32))
        self.encoder.relative_attention_bias = VocabEmbedding(self.num_buckets, cfg["num_attention_heads"])

    def attention_bias(self, md: BidirectionalMetadata) -> torch.Tensor:
        """[heads, L, L]: bias[h, i, j] = table[bucket(j - i), h] (one per step, every layer)."""
        p = md.positions
        buckets = relative_position_bucket(p[None, :] - p[:, None], self.num_buckets)
        return self.encoder.relative_attention_bias(buckets.flatten()).view(len(p), len(p), -1).permute(2, 0, 1)


class MPNetForMaskedLM(MPNetModel):
    """The checkpoint sentence-transformers' MPNet folders name (the masked-LM head is not loaded)."""
