"""XLM-RoBERTa (multilingual-e5, bge-m3, bge-reranker, ...): BERT with positions counted from
padding_idx + 1 (the position table has max_position_embeddings = usable length + padding_idx + 1
rows) and one token type. The sequence classifier is RoBERTa's head on the first token (dense ->
tanh -> out_proj; no BERT pooler)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mistralpy.models.bert import BertModel, EncoderLinear, num_labels


class XLMRobertaModel(BertModel):
    position_offset = 2  # padding_idx (1) + 1; the configs all say pad_token_id = 1

    def __init__(self, cfg: dict[str, Any], backend: Any = None) -> None:
        self.position_offset = int(cfg.get("pad_token_id", 1)) + 1
        super().__init__(cfg, backend)


class RobertaClassificationHead(nn.Module):
    def __init__(self, hidden: int, labels: int) -> None:
        super().__init__()
        self.dense = EncoderLinear(hidden, hidden, bias=True)
        self.out_proj = EncoderLinear(hidden, labels, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(torch.tanh(self.dense(x)))


class XLMRobertaForSequenceClassification(XLMRobertaModel):
    default_pooling = "cls"
    skipped_prefixes = ("pooler.", "lm_head.")

    def __init__(self, cfg: dict[str, Any], backend: Any = None) -> None:
        super().__init__(cfg, backend)
        self.num_labels = num_labels(cfg)
        self.classifier = RobertaClassificationHead(cfg["hidden_size"], self.num_labels)

    def score(self, first_rows: torch.Tensor) -> torch.Tensor:
        return self.classifier(first_rows).float()
