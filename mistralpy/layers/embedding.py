"""Token embedding and LM head (optionally tied to the embedding)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mistralpy.layers.matmul import linear


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class LMHead(nn.Module):
    """logits = h W^T. When tied, shares the embedding's weight (nothing to load; prepacking on CPU
    makes the head its own packed copy, as the embedding lookup needs the plain one)."""

    prepackable = True

    def __init__(self, vocab_size: int, hidden_size: int, tied_to: VocabEmbedding | None = None) -> None:
        super().__init__()
        self.tied = tied_to is not None
        if tied_to is not None:
            self.weight = tied_to.weight
        else:
            self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(hidden, self.weight)
