"""BERT encoders (all-MiniLM, BGE, E5, ...) and BERT cross-encoders, on our layers.

Post-LayerNorm transformer encoder with absolute position and token-type embeddings, attending
bidirectionally over each whole sequence (``embed/attention.BidirectionalBackend``: no KV cache).
Parameter names follow transformers' modeling_bert (``encoder.layer.N.attention.self.query`` ...);
query/key/value are fused at load time. MPNet (mpnet.py) and XLM-RoBERTa (xlm_roberta.py) reuse
the layer with their own position schemes.

Contract (besides CausalLM's): ``encoder_only = True`` (the runner keeps no KV cache and the engine
refuses to generate), ``forward(..., token_type_ids=None) -> hidden [T, H]`` for sequences whose
``positions`` are 0..n-1, ``max_positions`` (longest sequence), ``default_pooling``; cross-encoders
add ``score(hidden rows of each sequence's first token) -> logits [B, num_labels]``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mistralpy.attention.backend import AttentionSpec
from mistralpy.embed.attention import BidirectionalBackend, BidirectionalMetadata
from mistralpy.errors import ModelLoadError
from mistralpy.layers.activation import get_act_fn
from mistralpy.layers.embedding import VocabEmbedding
from mistralpy.layers.linear import Linear, MergedLinear
from mistralpy.layers.norm import LayerNorm
from mistralpy.models.base import CausalLM


class _ManyRows:
    """Our linear layers as an encoder wants them: every product has many rows (whole sequences),
    where oneDNN's weight packing and layers.matmul's ordering, both tuned for 1-row decode steps,
    lose to a plain GEMM (541 rows x 1536 -> 384, 2 threads: 9.9 ms packed, 4.0 ms with F.linear).
    Quantized (ISQ) weights keep their kernels."""

    prepackable = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qkernel is not None:
            return super().forward(x)
        return F.linear(x, self.weight, self.bias)


class EncoderLinear(_ManyRows, Linear):
    pass


class EncoderMergedLinear(_ManyRows, MergedLinear):
    pass

# checkpoint prefixes of the task wrappers (BertForMaskedLM saves "bert.", XLMRobertaModel "roberta.")
_PREFIXES = ("bert.", "roberta.", "mpnet.", "model.")


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: dict[str, Any], backend: BidirectionalBackend) -> None:
        super().__init__()
        hidden = cfg["hidden_size"]
        self.num_heads = cfg["num_attention_heads"]
        self.head_dim = hidden // self.num_heads
        self.qkv_proj = EncoderMergedLinear(hidden, [hidden, hidden, hidden], bias=True)
        self.spec = AttentionSpec(scale=self.head_dim ** -0.5)
        self.backend = backend

    def forward(self, hidden: torch.Tensor, md: BidirectionalMetadata, bias: torch.Tensor | None = None) -> torch.Tensor:
        t = hidden.shape[0]
        q, k, v = (x.view(t, self.num_heads, self.head_dim) for x in self.qkv_proj.split(self.qkv_proj(hidden)))
        return self.backend.forward(q, k, v, None, None, md, self.spec, bias).reshape(t, -1)


class BertDenseNorm(nn.Module):
    """dense -> (+ residual) -> LayerNorm: transformers' BertSelfOutput / BertOutput."""

    def __init__(self, in_features: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.dense = EncoderLinear(in_features, hidden, bias=True)
        self.LayerNorm = LayerNorm(hidden, eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, cfg: dict[str, Any], backend: BidirectionalBackend) -> None:
        super().__init__()
        self.self = BertSelfAttention(cfg, backend)
        self.output = BertDenseNorm(cfg["hidden_size"], cfg["hidden_size"], cfg.get("layer_norm_eps", 1e-12))

    def forward(self, hidden: torch.Tensor, md: BidirectionalMetadata, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.output(self.self(hidden, md, bias), hidden)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.dense = EncoderLinear(cfg["hidden_size"], cfg["intermediate_size"], bias=True)
        self.act = get_act_fn(cfg.get("hidden_act", "gelu"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, cfg: dict[str, Any], backend: BidirectionalBackend) -> None:
        super().__init__()
        self.attention = BertAttention(cfg, backend)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertDenseNorm(cfg["intermediate_size"], cfg["hidden_size"], cfg.get("layer_norm_eps", 1e-12))

    def forward(self, hidden: torch.Tensor, md: BidirectionalMetadata, bias: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.attention(hidden, md, bias)
        return self.output(self.intermediate(hidden), hidden)


class BertEncoder(nn.Module):
    def __init__(self, cfg: dict[str, Any], backend: BidirectionalBackend, layer_cls: type = BertLayer) -> None:
        super().__init__()
        self.layer = nn.ModuleList(layer_cls(cfg, backend) for _ in range(cfg["num_hidden_layers"]))


class BertEmbeddings(nn.Module):
    """word + position (+ token type) embeddings, then LayerNorm. ``position_offset``: what is
    added to a token's sequence index to index the position table (RoBERTa-style models count
    from padding_idx + 1)."""

    def __init__(self, cfg: dict[str, Any], position_offset: int = 0, token_types: bool = True) -> None:
        super().__init__()
        hidden = cfg["hidden_size"]
        self.word_embeddings = VocabEmbedding(cfg["vocab_size"], hidden)
        self.position_embeddings = VocabEmbedding(cfg["max_position_embeddings"], hidden)
        types = int(cfg.get("type_vocab_size", 2)) if token_types else 0
        self.token_type_embeddings = VocabEmbedding(types, hidden) if types else None
        self.LayerNorm = LayerNorm(hidden, cfg.get("layer_norm_eps", 1e-12))
        self.position_offset = position_offset

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions + self.position_offset)
        if self.token_type_embeddings is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            x = x + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(x)


class BertModel(CausalLM):
    """The bare encoder: hidden states of every token (pooling happens in mistralpy.embed)."""

    encoder_only = True
    default_pooling = "mean"       # a folder without sentence-transformers files
    position_offset = 0
    token_types = True
    layer_cls: type = BertLayer
    stacked_params = (("qkv_proj", "query", 0), ("qkv_proj", "key", 1), ("qkv_proj", "value", 2))
    ignored_suffixes = ("embeddings.position_ids", "rotary_emb.inv_freq")
    # checkpoint parts this class has no use for (a masked-LM head, an unused pooler)
    skipped_prefixes: tuple[str, ...] = ("pooler.", "cls.", "lm_head.", "classifier.")

    def __init__(self, cfg: dict[str, Any], backend: Any = None) -> None:
        super().__init__()
        kind = cfg.get("position_embedding_type") or "absolute"
        if kind != "absolute":
            raise ModelLoadError(f"BERT with position_embedding_type={kind!r} is not supported (absolute only)")
        self.backend = BidirectionalBackend()  # the runner's paged backend is not used: no cache
        self.embeddings = BertEmbeddings(cfg, self.position_offset, self.token_types)
        self.encoder = BertEncoder(cfg, self.backend, self.layer_cls)
        attn = self.encoder.layer[0].attention.self
        self.num_layers = len(self.encoder.layer)
        self.num_kv_heads = attn.num_heads
        self.head_dim = attn.head_dim
        self.hidden_size = cfg["hidden_size"]
        self.max_positions = int(cfg["max_position_embeddings"]) - self.position_offset

    def map_weight_name(self, name: str) -> str | None:
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        if name.startswith(self.skipped_prefixes):
            return None
        # TF-era checkpoints call LayerNorm's parameters gamma / beta
        return name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")

    def attention_bias(self, md: BidirectionalMetadata) -> torch.Tensor | None:
        return None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: Any, attn_metadata: Any,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.embeddings(input_ids, positions, token_type_ids)
        bias = self.attention_bias(attn_metadata)
        for layer in self.encoder.layer:
            hidden = layer(hidden, attn_metadata, bias)
        return hidden


class BertPooler(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.dense = Linear(hidden, hidden, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x))


class BertForSequenceClassification(BertModel):
    """A cross-encoder: logits = classifier(tanh(pooler(first token)))."""

    default_pooling = "cls"
    skipped_prefixes = ("cls.", "lm_head.")

    def __init__(self, cfg: dict[str, Any], backend: Any = None) -> None:
        super().__init__(cfg, backend)
        self.num_labels = num_labels(cfg)
        self.pooler = BertPooler(cfg["hidden_size"])
        self.classifier = Linear(cfg["hidden_size"], self.num_labels, bias=True)

    def score(self, first_rows: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pooler(first_rows)).float()


def num_labels(cfg: dict[str, Any]) -> int:
    """transformers: num_labels, else the size of id2label, else 2."""
    if cfg.get("num_labels"):
        return int(cfg["num_labels"])
    return len(cfg["id2label"]) if cfg.get("id2label") else 2
