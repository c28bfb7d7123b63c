"""ForwardBatch: the explicit state of one model step over a flat (unpadded) token batch."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class ForwardBatch:
    """Tensors on the model's device unless noted. T = tokens in the step, B = sequences.

    Sequence i owns tokens query_start_loc[i]:query_start_loc[i+1]; its context after this step
    is seq_lens[i] tokens, of which the last query_lens[i] are new.
    """

    input_ids: torch.Tensor          # [T] int64
    positions: torch.Tensor          # [T] int64
    slot_mapping: torch.Tensor       # [T] int64, flat index block_id * block_size + offset
    block_tables: torch.Tensor       # [B, max_blocks] int32 (padded with 0)
    seq_lens: list[int]              # host copy, [B]
    query_lens: list[int]            # host copy, [B]
    query_start_loc: list[int]       # host copy, [B + 1]
    logits_indices: torch.Tensor     # [N] rows of the hidden states that need logits
    block_size: int
    # [3, T] int64 (t, h, w) rotary positions of M-RoPE models (Qwen-VL), None for every other model;
    # ``positions`` stays the sequence index (KV slots, attention).
    mrope_positions: torch.Tensor | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def is_decode_only(self) -> bool:
        return all(q == 1 for q in self.query_lens)
