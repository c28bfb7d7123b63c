"""Qwen3-Embedding: the Qwen 3 decoder whose last token's final hidden state is the embedding.

The checkpoints hold a bare ``Qwen3Model`` (``embed_tokens`` / ``layers`` / ``norm``, no ``model.``
prefix, no LM head), whatever config.json's `architectures` says. Attention stays causal and goes
through the paged KV cache, so long inputs prefill in chunks beside generation traffic; the head is
tied to the embedding only to keep the CausalLM contract (its logits are never asked for)."""
from __future__ import annotations

from typing import Any

from mistralpy.attention.backend import AttentionBackend
from mistralpy.models.qwen3 import Qwen3ForCausalLM


class Qwen3EmbeddingModel(Qwen3ForCausalLM):
    default_pooling = "lasttoken"   # (a folder without sentence-transformers files)

    def __init__(self, cfg: dict[str, Any], backend: AttentionBackend) -> None:
        super().__init__({**cfg, "tie_word_embeddings": True}, backend)
        self.hidden_size = cfg["hidden_size"]

    def map_weight_name(self, name: str) -> str | None:
        if name.startswith("lm_head."):
            return None
        return name if name.startswith("model.") else "model." + name
