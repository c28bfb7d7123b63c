"""Batched logit processors over token histories (in place on float32 logits [B, V]).

Each function takes the batch-row indices it applies to, so rows that do not use a feature cost
nothing. Index tensors are built on the CPU in one go and moved to the logits' device once; no
per-token Python loops over the vocabulary or the history.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch


def as_token_tensor(tokens: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """1-D int64 CPU tensor of token ids (no copy when already one).

    Passing prompt ids as a tensor / numpy array avoids re-converting a long Python list every step.
    """
    if isinstance(tokens, torch.Tensor):
        return tokens.detach().to(device="cpu", dtype=torch.long).reshape(-1)
    return torch.as_tensor(tokens, dtype=torch.long).reshape(-1)


def _flat_indices(histories: Sequence[Sequence[Sequence[int] | torch.Tensor]], vocab_size: int) -> torch.Tensor:
    """Flat indices ``row * V + token`` (CPU int64) for every token of each row's histories.

    histories[r] is a list of token sequences (e.g. [prompt, output]) of local row r. Ids outside
    [0, V) are dropped (placeholders, padded vocabularies).
    """
    parts, rows = [], []
    for r, seqs in enumerate(histories):
        for seq in seqs:
            t = as_token_tensor(seq)
            if t.numel():
                parts.append(t)
                rows.append(torch.full((t.numel(),), r, dtype=torch.long))
    if not parts:
        return torch.empty(0, dtype=torch.long)
    toks, row_ids = torch.cat(parts), torch.cat(rows)
    ok = (toks >= 0) & (toks < vocab_size)
    return (row_ids * vocab_size + toks)[ok]


def _row_index(row_idx: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.as_tensor(list(row_idx), dtype=torch.long).to(device)


def apply_token_mask(logits: torch.Tensor, row_idx: Sequence[int], banned: Sequence[Iterable[int]]) -> None:
    """Set ``logits[row_idx[j], t] = -inf`` for every t in banned[j] (used for min_tokens)."""
    V = logits.shape[1]
    rows, toks = [], []
    for r, ids in zip(row_idx, banned):
        for t in ids:
            if 0 <= t < V:
                rows.append(r)
                toks.append(t)
    if rows:
        dev = logits.device
        logits.index_put_((_row_index(rows, dev), _row_index(toks, dev)),
                          torch.tensor(float("-inf"), device=dev))


def apply_repetition_penalty(logits: torch.Tensor, row_idx: Sequence[int],
                             histories: Sequence[Sequence[Sequence[int] | torch.Tensor]],
                             penalties: Sequence[float]) -> None:
    """HF / CTRL repetition penalty: for every token seen in the row's histories (prompt + output),
    a positive logit is divided by the penalty and a negative one multiplied by it."""
    if not row_idx:
        return
    B, V = logits.shape
    dev = logits.device
    flat = _flat_indices(histories, V).to(dev)
    seen = torch.zeros(len(row_idx) * V, dtype=torch.bool, device=dev)
    seen[flat] = True
    seen = seen.view(len(row_idx), V)
    pen = torch.tensor(list(penalties), dtype=torch.float32).to(dev).unsqueeze(1)
    full = len(row_idx) == B and list(row_idx) == list(range(B))
    idx = None if full else _row_index(row_idx, dev)
    sub = logits if full else logits.index_select(0, idx)
    penalised = torch.where(sub > 0, sub / pen, sub * pen)
    sub = torch.where(seen, penalised, sub)
    if full:
        logits.copy_(sub)
    else:
        logits.index_copy_(0, idx, sub)


def apply_presence_frequency(logits: torch.Tensor, row_idx: Sequence[int],
                             outputs: Sequence[Sequence[int] | torch.Tensor],
                             presence: Sequence[float], frequency: Sequence[float]) -> None:
    """OpenAI penalties over generated tokens only: ``logit -= presence * (count > 0) + frequency * count``."""
    if not row_idx:
        return
    V = logits.shape[1]
    dev = logits.device
    flat = _flat_indices([[o] for o in outputs], V).to(dev)
    counts = torch.zeros(len(row_idx) * V, dtype=torch.float32, device=dev)
    counts.index_add_(0, flat, torch.ones(flat.numel(), dtype=torch.float32, device=dev))
    counts = counts.view(len(row_idx), V)
    pres = torch.tensor(list(presence), dtype=torch.float32).to(dev).unsqueeze(1)
    freq = torch.tensor(list(frequency), dtype=torch.float32).to(dev).unsqueeze(1)
    delta = freq * counts + pres * (counts > 0).to(torch.float32)
    logits.index_add_(0, _row_index(row_idx, dev), -delta)


def apply_logit_bias(logits: torch.Tensor, row_idx: Sequence[int], biases: Sequence[dict[int, float]]) -> None:
    """Add ``biases[j][t]`` to ``logits[row_idx[j], t]`` (ids outside the vocabulary are ignored)."""
    V = logits.shape[1]
    rows, toks, vals = [], [], []
    for r, bias in zip(row_idx, biases):
        for t, v in bias.items():
            if 0 <= t < V:
                rows.append(r)
                toks.append(t)
                vals.append(v)
    if rows:
        dev = logits.device
        logits.index_put_((_row_index(rows, dev), _row_index(toks, dev)),
                          torch.tensor(vals, dtype=torch.float32).to(dev), accumulate=True)
