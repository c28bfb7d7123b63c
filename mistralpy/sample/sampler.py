"""Batch sampler: one call turns logits [B, V] into one token per row.

Order of operations (each step only touches the rows that use it; all math in float32):

1. Logit masks: rows with a ``grammar`` (a :class:`mistralpy.structured.GrammarMatcher`) keep only the
   tokens the grammar allows next (the others are -inf; the caller feeds the sampled token back to
   the matcher). Then, while ``len(output) < min_tokens`` the row's ``eos_token_ids`` and
   ``params.stop_token_ids`` are set to -inf (regardless of ``ignore_eos``).
2. DRY (:mod:`mistralpy.sample.dry`) over the whole context, prompt + output.
3. Repetition penalty (HF / CTRL, over prompt + output tokens: positive logits divided, negative
   multiplied), then presence / frequency penalties (OpenAI, over output tokens only:
   ``logit -= presence * (count > 0) + frequency * count``).
4. ``logit_bias`` added.
5. Temperature: ``logits / T``. ``T == 0`` is greedy: the exact ``argmax`` of the logits after
   steps 1-4 (first index on ties), no randomness, steps 6-9 skipped.
6. top_k (0 disables), 7. top_p (nucleus, on the distribution renormalised after top_k: keep the
   smallest prefix of the sorted tokens whose mass reaches top_p), 8. min_p (drop tokens whose
   probability is below ``min_p * max_prob``).
9. Sample by exponential race: ``argmax(p_i / q_i)`` with ``q_i ~ Exponential(1)``, computed as
   ``argmax(log p_i - log q_i)`` (so no normalisation is needed). Each row draws a full ``[V]``
   vector of ``q`` indexed by token id from its own ``torch.Generator`` (rows without one share the
   Sampler's generator). Hence a seeded row samples the same tokens alone or inside any batch: the
   random numbers it consumes do not depend on the other rows, nor on how truncation is computed.

Logprobs (rows with ``params.logprobs``): ``log_softmax`` of the logits after steps 1-5 (greedy
rows use T = 1), *before* truncation (6-8). The sampled token's logprob and the ``top_logprobs``
alternatives come from that same distribution, so alternatives are always finite (unless masked in
step 1) and comparable with the OpenAI API, which also reports the model's (tempered)
distribution rather than the truncated one.

Fast path: when every row is greedy and none uses penalties, DRY, bias, logprobs or an active
min_tokens mask, the whole call is one batched ``argmax`` on the raw logits.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mistralpy.sample.dry import dry_penalties
from mistralpy.sample.penalties import (
    apply_logit_bias,
    apply_presence_frequency,
    apply_repetition_penalty,
    apply_token_mask,
    as_token_tensor,
)
from mistralpy.sampling_params import SamplingParams


@dataclass(slots=True)
class SamplingRow:
    params: SamplingParams  # already .resolved(): temperature/top_k/top_p/min_p/repetition_penalty set
    prompt_token_ids: Sequence[int]  # a 1-D int tensor also works (avoids per-step conversion)
    output_token_ids: Sequence[int]
    generator: torch.Generator | None  # per-request, seeded from params.seed; None -> Sampler's shared one
    eos_token_ids: frozenset[int]  # masked while len(output) < min_tokens
    dry_breaker_ids: frozenset[int] = frozenset()  # token ids that break DRY sequences
    grammar: Any = None  # GrammarMatcher (mistralpy.structured) of a constrained row, else None


@dataclass(slots=True)
class TokenLogprobs:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # params.top_logprobs best (token_id, logprob), descending


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]  # None for rows without params.logprobs


def request_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A generator for a seeded request (None when unseeded). Create it on the logits' device:
    drawing on another device works but costs a copy of V floats per step."""
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def _temperature(p: SamplingParams) -> float:
    return 1.0 if p.temperature is None else float(p.temperature)  # None: unresolved, neutral


def _is_greedy(p: SamplingParams) -> bool:
    return _temperature(p) == 0.0


def _min_tokens_active(row: SamplingRow) -> bool:
    p = row.params
    return (p.min_tokens > 0 and len(row.output_token_ids) < p.min_tokens
            and bool(row.eos_token_ids or p.stop_token_ids))


def _needs_processing(row: SamplingRow) -> bool:
    p = row.params
    return bool(row.grammar is not None or _min_tokens_active(row) or p.dry_multiplier > 0
                or (p.repetition_penalty is not None and p.repetition_penalty != 1.0)
                or p.presence_penalty or p.frequency_penalty or p.logit_bias)


def process_logits(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Steps 1-4 (masks, DRY, penalties, bias). Returns a new float32 tensor [B, V]; the input is untouched."""
    x = logits.to(torch.float32, copy=True)
    B, V = x.shape
    dev = x.device

    # 1. Grammar masks (constrained rows only): disallowed tokens -> -inf.
    g_rows, g_masks = [], []
    for i, r in enumerate(rows):
        if r.grammar is not None:
            allowed = r.grammar.allowed_mask(V)
            if allowed is not None:
                g_rows.append(i)
                g_masks.append(allowed)
    if g_rows:
        idx = torch.tensor(g_rows, device=dev)
        blocked = ~torch.stack(g_masks).to(dev, non_blocking=True)
        x[idx] = x.index_select(0, idx).masked_fill_(blocked, float("-inf"))

    # min_tokens: no EOS / stop token before the minimum length.
    mask_rows = [i for i, r in enumerate(rows) if _min_tokens_active(r)]
    if mask_rows:
        apply_token_mask(x, mask_rows, [set(rows[i].eos_token_ids) | set(rows[i].params.stop_token_ids)
                                        for i in mask_rows])

    # 2. DRY, per row on the CPU (only rows that enable it).
    d_rows, d_toks, d_pens = [], [], []
    for i, r in enumerate(rows):
        p = r.params
        if p.dry_multiplier > 0:
            ctx = torch.cat([as_token_tensor(r.prompt_token_ids), as_token_tensor(r.output_token_ids)])
            toks, pens = dry_penalties(ctx, r.dry_breaker_ids, p.dry_multiplier, p.dry_base,
                                       p.dry_allowed_length, V)
            if toks.numel():
                d_rows.append(torch.full((toks.numel(),), i, dtype=torch.long))
                d_toks.append(toks)
                d_pens.append(pens)
    if d_rows:
        x.index_put_((torch.cat(d_rows).to(dev), torch.cat(d_toks).to(dev)), -torch.cat(d_pens).to(dev),
                     accumulate=True)

    # 3. Repetition (prompt + output), then presence / frequency (output only).
    rp_rows = [i for i, r in enumerate(rows)
               if r.params.repetition_penalty is not None and r.params.repetition_penalty != 1.0]
    if rp_rows:
        apply_repetition_penalty(x, rp_rows,
                                 [[rows[i].prompt_token_ids, rows[i].output_token_ids] for i in rp_rows],
                                 [rows[i].params.repetition_penalty for i in rp_rows])
    pf_rows = [i for i, r in enumerate(rows) if r.params.presence_penalty or r.params.frequency_penalty]
    if pf_rows:
        apply_presence_frequency(x, pf_rows, [rows[i].output_token_ids for i in pf_rows],
                                 [rows[i].params.presence_penalty for i in pf_rows],
                                 [rows[i].params.frequency_penalty for i in pf_rows])

    # 4. logit_bias.
    lb_rows = [i for i, r in enumerate(rows) if r.params.logit_bias]
    if lb_rows:
        apply_logit_bias(x, lb_rows, [rows[i].params.logit_bias for i in lb_rows])
    return x


def truncate_and_sample(scores: torch.Tensor, top_k: Sequence[int], top_p: Sequence[float],
                        min_p: Sequence[float], noise: torch.Tensor) -> torch.Tensor:
    """Steps 6-9 on tempered scores [n, V] (float32, modified in place); returns token ids [n].

    ``noise`` [n, V] is ``-log(q)`` with ``q ~ Exponential(1)``, indexed by token id.
    """
    n, V = scores.shape
    dev = scores.device
    k_eff = [k if 0 < k < V else V for k in (int(k or 0) for k in top_k)]
    use_p = any(p < 1.0 for p in top_p)
    use_min_p = any(m > 0.0 for m in min_p)
    kmax = max(k_eff)
    use_k = any(k < V for k in k_eff)
    if use_k or use_p:
        # Work on the sorted prefix that can survive: top-kmax columns (or all V when a row has no top_k).
        if kmax < V:
            vals, idx = scores.topk(kmax, dim=-1)
        else:
            vals, idx = scores.sort(dim=-1, descending=True)
        neg_inf = torch.tensor(float("-inf"), device=dev)
        if use_k:
            k_t = torch.tensor(k_eff, dtype=torch.long).to(dev).unsqueeze(1)
            vals = torch.where(torch.arange(vals.shape[1], device=dev).unsqueeze(0) >= k_t, neg_inf, vals)
        if use_p:
            p_t = torch.tensor(list(top_p), dtype=torch.float32).to(dev).unsqueeze(1)
            probs = vals.softmax(dim=-1)
            cum = probs.cumsum(dim=-1)
            before = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], dim=1)  # mass ranked above
            vals = torch.where((before >= p_t) & (p_t < 1.0), neg_inf, vals)
        if use_min_p:
            m_t = torch.tensor(list(min_p), dtype=torch.float32).to(dev).unsqueeze(1)
            ratio = (vals - vals[:, :1]).exp()  # p_i / p_max; column 0 is the max
            vals = torch.where(ratio < m_t, neg_inf, vals)
        choice = (vals + noise.gather(1, idx)).argmax(dim=-1, keepdim=True)
        return idx.gather(1, choice).squeeze(1)
    if use_min_p:
        m_t = torch.tensor(list(min_p), dtype=torch.float32).to(dev).unsqueeze(1)
        ratio = (scores - scores.max(dim=-1, keepdim=True).values).exp()
        scores.masked_fill_(ratio < m_t, float("-inf"))
    return (scores + noise).argmax(dim=-1)


class Sampler:
    """Samples one token per row; see the module docstring for the order of operations."""

    def __init__(self, vocab_size: int, seed: int | None = None):
        # Logit columns >= vocab_size (a padded lm_head) are never sampled.
        self.vocab_size = vocab_size
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def shared_generator(self, device: torch.device) -> torch.Generator:
        """The generator of rows without their own, one per device, seeded from ``seed`` if given."""
        device = torch.device(device)
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            if self.seed is not None:
                gen.manual_seed(self.seed)
            else:
                gen.seed()
            self._generators[device] = gen
        return gen

    def _noise(self, rows: Sequence[SamplingRow], V: int, device: torch.device) -> torch.Tensor:
        """``-log(q)``, q ~ Exponential(1), [n, V]: each row from its own generator, the rest from the shared one."""
        q = torch.empty(len(rows), V, dtype=torch.float32, device=device)
        shared = [i for i, r in enumerate(rows) if r.generator is None]
        if shared:
            draw = torch.empty(len(shared), V, dtype=torch.float32, device=device)
            draw.exponential_(generator=self.shared_generator(device))
            if len(shared) == len(rows):
                q = draw
            else:
                q[torch.tensor(shared, device=device)] = draw
        for i, r in enumerate(rows):
            g = r.generator
            if g is not None:
                row_q = torch.empty(V, dtype=torch.float32, device=g.device).exponential_(generator=g)
                q[i] = row_q.to(device)
        # q == 0 is possible in float32; clamp so log stays finite and -inf scores stay -inf.
        return q.clamp_min_(torch.finfo(torch.float32).tiny).log_().neg_()

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SamplerOutput:
        """logits: [B, V] (any float dtype; compute in float32), one row per SamplingRow."""
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits must be [B={len(rows)}, V], got {tuple(logits.shape)}")
        B = len(rows)
        if B == 0:
            return SamplerOutput([], [])
        if logits.shape[1] > self.vocab_size:
            logits = logits[:, : self.vocab_size]
        V = logits.shape[1]
        dev = logits.device
        greedy = [_is_greedy(r.params) for r in rows]
        want_lp = [i for i, r in enumerate(rows) if r.params.logprobs or r.params.top_logprobs]
        if all(greedy) and not want_lp and not any(_needs_processing(r) for r in rows):
            return SamplerOutput(logits.argmax(dim=-1).tolist(), [None] * B)

        x = process_logits(logits, rows)
        rand = [i for i in range(B) if not greedy[i]]
        if len(rand) == B:
            tokens = self._sample(x, rows, rand, V, dev)
        else:
            tokens = x.argmax(dim=-1)
            if rand:
                tokens[torch.tensor(rand, device=dev)] = self._sample(x, rows, rand, V, dev)
        token_ids = tokens.tolist()

        logprobs: list[TokenLogprobs | None] = [None] * B
        if want_lp:
            temps = [_temperature(rows[i].params) or 1.0 for i in want_lp]
            idx = torch.tensor(want_lp, device=dev)
            scaled = x.index_select(0, idx) / torch.tensor(temps, dtype=torch.float32).to(dev).unsqueeze(1)
            lp = torch.log_softmax(scaled, dim=-1)
            chosen = lp.gather(1, tokens.index_select(0, idx).unsqueeze(1)).squeeze(1).tolist()
            n_top = max(rows[i].params.top_logprobs for i in want_lp)
            top_v, top_i = lp.topk(min(n_top, V), dim=-1) if n_top else (None, None)
            top_v = top_v.tolist() if n_top else None
            top_i = top_i.tolist() if n_top else None
            for j, i in enumerate(want_lp):
                k = rows[i].params.top_logprobs
                top = list(zip(top_i[j][:k], top_v[j][:k])) if k else []
                logprobs[i] = TokenLogprobs(token_ids[i], chosen[j], top)
        return SamplerOutput(token_ids, logprobs)

    def _sample(self, x: torch.Tensor, rows: Sequence[SamplingRow], rand: list[int], V: int,
                dev: torch.device) -> torch.Tensor:
        """Steps 5-9 for the non-greedy rows ``rand`` of processed logits x; returns their tokens."""
        sub_rows = [rows[i] for i in rand]
        scores = x if len(rand) == x.shape[0] else x.index_select(0, torch.tensor(rand, device=dev))
        temps = torch.tensor([_temperature(r.params) for r in sub_rows], dtype=torch.float32).to(dev)
        scores = scores / temps.unsqueeze(1)  # a new tensor: x stays intact for logprobs
        return truncate_and_sample(
            scores,
            [r.params.top_k or 0 for r in sub_rows],
            [1.0 if r.params.top_p is None else r.params.top_p for r in sub_rows],
            [r.params.min_p or 0.0 for r in sub_rows],
            self._noise(sub_rows, V, dev),
        )
