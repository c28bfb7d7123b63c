"""DRY ("Don't Repeat Yourself") repetition penalty.

Semantics follow text-generation-webui / mistral.rs (and koboldcpp / llama.cpp, which compute the
same thing with a Z-algorithm): take the longest suffix of the context (prompt + output) that also
occurs earlier; every token that followed such an earlier occurrence would extend the repeat. If
the match is ``L >= allowed_length`` tokens long (``L`` counts only tokens already in the
context), that token's logit is lowered by ``multiplier * base ** (L - allowed_length)``; a token
reachable from several occurrences gets the penalty of its longest one.

Sequence breakers: if the last token is a breaker there is no penalty; a match never extends over a
breaker; a breaker token is never penalised as the continuation.

Cost per step is O(context) for one vectorised equality scan, plus at most ``DRY_MAX_MATCH_LEN``
vectorised extension rounds over the matching positions. Matches are capped at
``DRY_MAX_MATCH_LEN`` tokens (as mistral.rs does): beyond that the penalty is astronomically large
anyway, and the cap bounds the cost on adversarial inputs (e.g. one token repeated 100k times).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

DRY_MAX_MATCH_LEN = 50
# Keeps multiplier * base ** exponent finite in float32 (subtracting it from a logit stays finite).
_MAX_PENALTY = 1e30


def dry_breaker_token_ids(token_texts: Sequence[str], breakers: Sequence[str]) -> frozenset[int]:
    """Ids of tokens whose decoded text contains any breaker string. token_texts[i] is the text of id i.

    Empty breaker strings are ignored (they would match every token). O(vocab); cache the result per
    distinct breaker list.
    """
    needles = [b for b in breakers if b]
    if not needles:
        return frozenset()
    return frozenset(i for i, text in enumerate(token_texts) if text and any(b in text for b in needles))


@functools.lru_cache(maxsize=64)
def _breaker_tensor(breaker_ids: frozenset[int]) -> torch.Tensor:
    return torch.tensor(sorted(breaker_ids), dtype=torch.long)


def dry_penalties(context: torch.Tensor, breaker_ids: frozenset[int], multiplier: float, base: float,
                  allowed_length: int, vocab_size: int,
                  max_match_len: int = DRY_MAX_MATCH_LEN) -> tuple[torch.Tensor, torch.Tensor]:
    """DRY penalties for one row.

    context: 1-D int64 CPU tensor (prompt + output). Returns ``(token_ids, penalties)``, 1-D CPU
    tensors (int64, float32) of equal length: subtract ``penalties[j]`` from logit ``token_ids[j]``.
    """
    empty = (torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.float32))
    n = context.numel()
    if multiplier <= 0 or n < 2:
        return empty
    # Longest possible match: the trailing run of non-breaker tokens, capped.
    limit = min(n, max_match_len)
    breakers = _breaker_tensor(breaker_ids) if breaker_ids else None
    if breakers is not None:
        tail_is_breaker = torch.isin(context[n - limit:], breakers)
        hits = tail_is_breaker.nonzero()
        if hits.numel():
            limit = limit - 1 - int(hits[-1])  # 0 when the last token itself is a breaker
    if limit < allowed_length:
        return empty

    last = context[n - 1]
    cand = (context[: n - 1] == last).nonzero().flatten()  # earlier occurrences of the last token
    nxt = context[cand + 1]
    keep = (nxt >= 0) & (nxt < vocab_size)
    if breakers is not None:
        keep &= ~torch.isin(nxt, breakers)
    cand, nxt = cand[keep], nxt[keep]
    if cand.numel() == 0:
        return empty

    # Extend every candidate match backwards one token per round, over the shrinking active set.
    lengths = torch.ones(cand.numel(), dtype=torch.long)
    act_idx = torch.arange(cand.numel())
    act_pos = cand
    for m in range(1, limit):
        ok = act_pos >= m  # the earlier occurrence cannot run past the start of the context
        act_idx, act_pos = act_idx[ok], act_pos[ok]
        ok = context[act_pos - m] == context[n - 1 - m]
        act_idx, act_pos = act_idx[ok], act_pos[ok]
        if act_idx.numel() == 0:
            break
        lengths[act_idx] += 1

    sel = lengths >= allowed_length
    if not bool(sel.any()):
        return empty
    toks, lens = nxt[sel], lengths[sel]
    uniq, inverse = torch.unique(toks, return_inverse=True)
    best = torch.zeros(uniq.numel(), dtype=torch.long).scatter_reduce_(0, inverse, lens, "amax")
    exponent = (best - allowed_length).to(torch.float64)
    penalty = (multiplier * torch.pow(torch.tensor(float(base), dtype=torch.float64), exponent))
    return uniq, penalty.clamp_(max=_MAX_PENALTY).to(torch.float32)
