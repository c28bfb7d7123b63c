"""EmbeddingGemma: the Gemma 3 text decoder run bidirectionally (``use_bidirectional_attention``),
its hidden states mean-pooled and projected by two dense layers (sentence-transformers' 2_Dense,
3_Dense: mistralpy/embed/st_config.py), then normalised.

With bidirectional attention every token sees the whole sequence, so a request runs whole in one
step through the cache-free encoder backend (embed/attention.py) and no KV pool exists. A local
layer sees keys within a two-sided window: transformers turns the config's `sliding_window` w
into w // 2 + 1 and lets |i - j| < that through. The checkpoint is a bare ``Gemma3TextModel``
(no ``model.`` prefix, no LM head)."""
from __future__ import annotations

from typing import Any

from mistralpy.embed.attention import BidirectionalBackend
from mistralpy.models.gemma3 import Gemma3ForCausalLM


class Gemma3TextModel(Gemma3ForCausalLM):
    default_pooling = "mean"

    def __init__(self, cfg: dict[str, Any], backend: Any) -> None:
        self_bidirectional = bool(cfg.get("use_bidirectional_attention", False))
        if self_bidirectional:
            backend = BidirectionalBackend()
            if cfg.get("sliding_window"):
                cfg = {**cfg, "sliding_window": int(cfg["sliding_window"]) // 2 + 1}
        super().__init__({**cfg, "tie_word_embeddings": True}, backend)
        self.encoder_only = self_bidirectional   # else a causal decoder embedder on the paged cache
        self.backend = backend
        self.hidden_size = cfg["hidden_size"]

    def forward(self, input_ids: Any, positions: Any, kv_caches: Any, attn_metadata: Any) -> Any:
        if self.encoder_only:   # the layers still take a (k, v) pair each: none here
            kv_caches = [(None, None)] * self.num_layers
        return super().forward(input_ids, positions, kv_caches, attn_metadata)

    def map_weight_name(self, name: str) -> str | None:
        if name.startswith("lm_head."):
            return None
        return name if name.startswith("model.") else "model." + name
