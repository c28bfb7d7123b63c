"""Attention backend protocol.

A backend owns the paged KV cache layout for one layer: ``k_cache``/``v_cache`` of shape
[num_blocks, block_size, num_kv_heads, head_dim] (v may have fewer channels). Each step the model runner calls
``build_metadata`` once; every attention layer then calls ``forward`` with that metadata.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from mistralpy.worker.forward_batch import ForwardBatch


@dataclass(frozen=True, slots=True)
class AttentionSpec:
    """Per-layer attention options."""

    scale: float
    sliding_window: int | None = None  # a query sees keys with pos > q_pos - sliding_window
    logit_softcap: float | None = None  # Gemma 2 style tanh soft-capping of scores
    # Llama 4's chunked local attention: a query sees keys of its own chunk only,
    # q_pos // attention_chunk_size * attention_chunk_size <= pos <= q_pos
    attention_chunk_size: int | None = None


class AttentionBackend(Protocol):
    name: str

    def build_metadata(self, batch: ForwardBatch) -> Any:
        """Everything per-step that all layers share (gather indices, masks)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, metadata: Any, spec: AttentionSpec) -> torch.Tensor:
        """q [T, Hq, D], k [T, Hk, D], v [T, Hk, Dv] for the new tokens -> output [T, Hq, Dv].

        Writes k/v into the cache at the batch's slot mapping before attending. Dv is usually D;
        MLA attends with Dv < D and a v cache that is a view of the k cache's first Dv channels.
        """


def get_backend(device: torch.device, name: str = "auto") -> AttentionBackend:
    from mistralpy.attention.torch_ref import TorchRefBackend

    if name in ("auto", "torch", "torch_ref"):
        return TorchRefBackend()
    raise ValueError(f"unknown attention backend {name!r}")
