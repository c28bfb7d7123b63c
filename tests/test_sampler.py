"""Batch sampler: every step against hand-computed expectations (CPU, small vocabularies)."""
from __future__ import annotations

import math
import random

import pytest
import torch

import mistralpy.sample.sampler as sampler_mod
from mistralpy.sample.dry import DRY_MAX_MATCH_LEN, dry_breaker_token_ids, dry_penalties
from mistralpy.sample.sampler import (
    Sampler,
    SamplingRow,
    process_logits,
    request_generator,
)
from mistralpy.sampling_params import SamplingParams

V = 8
EOS = 7
# Probabilities with no ties near any threshold used below (they sum to 1).
PROBS = [0.35, 0.25, 0.15, 0.10, 0.06, 0.04, 0.03, 0.02]
# Shuffle the ids so "sorted by probability" is not "sorted by id".
PERM = [3, 6, 0, 5, 1, 7, 2, 4]  # token PERM[j] has probability PROBS[j]


def perm_logits() -> torch.Tensor:
    lg = torch.empty(V)
    for j, tok in enumerate(PERM):
        lg[tok] = math.log(PROBS[j])
    return lg


def row(prompt=(), output=(), generator=None, eos=frozenset({EOS}), breakers=frozenset(), **kw) -> SamplingRow:
    return SamplingRow(SamplingParams(**kw).resolved(), list(prompt), list(output), generator, eos, breakers)


def sample_many(logits: torch.Tensor, n: int, seed: int = 0, **kw) -> list[int]:
    """n draws of one distribution in a single batched call (shared generator)."""
    sampler = Sampler(V, seed=seed)
    rows = [row(**kw)] * n  # rows are read-only here; sharing one object keeps the test fast
    return sampler(logits.expand(n, -1).clone(), rows).token_ids


# ---- greedy and the fast path ------------------------------------------------------------------

def test_greedy_is_exact_argmax_and_uses_fast_path(monkeypatch):
    logits = torch.randn(5, V, generator=torch.Generator().manual_seed(3))

    def boom(*a, **k):
        raise AssertionError("fast path must not process logits")

    monkeypatch.setattr(sampler_mod, "process_logits", boom)
    out = Sampler(V)(logits.to(torch.bfloat16), [row(temperature=0.0) for _ in range(5)])
    assert out.token_ids == logits.to(torch.bfloat16).float().argmax(-1).tolist()
    assert out.logprobs == [None] * 5


def test_greedy_ignores_truncation_and_randomness():
    logits = perm_logits().unsqueeze(0)
    for seed in range(5):
        out = Sampler(V, seed=seed)(logits, [row(temperature=0.0, top_k=3, top_p=0.5, min_p=0.2, presence_penalty=0.1)])
        assert out.token_ids == [PERM[0]]


def test_generation_config_do_sample_false_is_greedy():
    p = SamplingParams().resolved({"do_sample": False, "temperature": 0.9})
    r = SamplingRow(p, [], [], None, frozenset())
    assert Sampler(V)(perm_logits().unsqueeze(0), [r]).token_ids == [PERM[0]]


def test_padded_vocab_columns_never_sampled():
    logits = torch.zeros(1, V + 4)
    logits[0, V:] = 50.0  # padded lm_head columns beyond the vocabulary
    assert Sampler(V)(logits, [row(temperature=0.0)]).token_ids[0] < V
    toks = Sampler(V, seed=1)(logits.expand(200, -1).clone(), [row(temperature=1.0) for _ in range(200)]).token_ids
    assert max(toks) < V


# ---- temperature -------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_matches_softmax(temperature):
    logits = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 0.2, -0.5, 1.2])
    n = 20000
    toks = torch.tensor(sample_many(logits, n, seed=7, temperature=temperature))
    freq = torch.bincount(toks, minlength=V).float() / n
    expected = torch.softmax(logits / temperature, -1)
    assert torch.allclose(freq, expected, atol=0.015), (freq, expected)


# ---- top-k / top-p / min-p: exact kept sets ----------------------------------------------------

def kept_set(n_top: int) -> set[int]:
    return set(PERM[:n_top])


@pytest.mark.parametrize("kw, n_kept", [
    ({"top_k": 3}, 3),
    ({"top_k": 1}, 1),
    ({"top_k": 100}, 8),                # k >= V disables
    ({"top_p": 0.7}, 3),                # mass above: 0, .35, .60 < .7 ; .75 >= .7
    ({"top_p": 0.6}, 2),                # .60 is not < .6: the first two already reach 0.6
    ({"top_p": 0.68}, 3),
    ({"top_k": 4, "top_p": 0.68}, 2),   # after top_k the mass above token 3 is .60/.85 = .706 >= .68
    ({"min_p": 0.4}, 3),                # keep p >= .14
    ({"min_p": 0.5}, 2),                # keep p >= .175
    ({"top_k": 6, "min_p": 0.4}, 3),    # min_p on the sorted path
    ({"top_p": 0.95, "min_p": 0.2}, 4),  # top_p keeps 6, min_p (>= .07) keeps 4
])
def test_truncation_keeps_exact_sets(kw, n_kept):
    toks = sample_many(perm_logits(), 4000, seed=11, temperature=1.0, **kw)
    assert set(toks) == kept_set(n_kept)


def test_truncation_per_row_in_one_batch():
    n = 3 * 1500
    kws = [{"top_k": 2, "temperature": 1.0}, {"top_p": 0.7, "temperature": 1.0}, {"min_p": 0.5, "temperature": 0.8}]
    per_kind = [row(**kw) for kw in kws]
    rows = [per_kind[i % 3] for i in range(n)]
    toks = Sampler(V, seed=5)(perm_logits().expand(n, -1).clone(), rows).token_ids
    for j, n_kept in enumerate([2, 3, 2]):
        assert set(toks[j::3]) == kept_set(n_kept)


def test_mixed_top_k_without_top_p():
    # One row with top_k and one without must still truncate the first (sorted path chosen per batch).
    noise = torch.zeros(2, V)
    noise[:, PERM[-1]] = 100.0  # would win wherever it is not truncated
    scores = perm_logits().expand(2, -1).clone()
    toks = sampler_mod.truncate_and_sample(scores, [2, 0], [1.0, 1.0], [0.0, 0.0], noise)
    assert toks.tolist() == [PERM[0], PERM[-1]]


# ---- penalties, bias, masks: exact processed logits --------------------------------------------

BASE = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0])


def processed(r: SamplingRow, logits: torch.Tensor = BASE) -> torch.Tensor:
    return process_logits(logits.unsqueeze(0), [r])[0]


def test_repetition_penalty_exact():
    out = processed(row(prompt=[0, 4], output=[4, 5, 5], repetition_penalty=2.0))
    expected = BASE.clone()
    expected[0] = -4.0  # negative: multiplied
    expected[4] = 1.0   # positive: divided
    expected[5] = 1.5
    assert torch.equal(out, expected)


def test_presence_frequency_exact_output_only():
    out = processed(row(prompt=[0, 1], output=[4, 5, 5], presence_penalty=0.5, frequency_penalty=0.25))
    expected = BASE.clone()
    expected[4] -= 0.5 + 0.25
    expected[5] -= 0.5 + 0.5
    assert torch.equal(out, expected)  # prompt tokens 0, 1 untouched


def test_repetition_then_presence_frequency_order():
    out = processed(row(prompt=[6], output=[6, 2], repetition_penalty=2.0, presence_penalty=1.0, frequency_penalty=0.5))
    expected = BASE.clone()
    expected[6] = 4.0 / 2.0 - 1.5
    expected[2] = 0.0 - 1.5
    assert torch.equal(out, expected)


def test_penalties_batched_rows_independent():
    rows = [row(prompt=[0], output=[7], repetition_penalty=2.0), row(output=[1, 1]),
            row(output=[3], frequency_penalty=1.0), row(temperature=0.0)]
    out = process_logits(BASE.expand(4, -1).clone(), rows)
    for i, r in enumerate(rows):
        assert torch.equal(out[i], processed(r))
    assert torch.equal(out[1], BASE) and torch.equal(out[3], BASE)


def test_logit_bias_forces_and_bans():
    out = Sampler(V, seed=0)(BASE.expand(200, -1).clone(),
                             [row(temperature=1.0, logit_bias={2: 100.0}) for _ in range(200)])
    assert set(out.token_ids) == {2}
    assert Sampler(V)(BASE.unsqueeze(0), [row(temperature=0.0, logit_bias={7: -100.0})]).token_ids == [6]
    assert torch.equal(processed(row(logit_bias={1: 0.5, 99: 3.0})), BASE + torch.eye(V)[1] * 0.5)


def test_min_tokens_masks_eos_and_stop_ids():
    r = row(output=[1], min_tokens=3, stop_token_ids=[6], temperature=0.0, ignore_eos=True)
    out = processed(r)
    assert out[EOS] == -math.inf and out[6] == -math.inf
    assert torch.equal(out[:6], BASE[:6])
    assert Sampler(V)(BASE.unsqueeze(0), [r]).token_ids == [5]
    done = row(output=[1, 2, 3], min_tokens=3, stop_token_ids=[6], temperature=0.0)
    assert Sampler(V)(BASE.unsqueeze(0), [done]).token_ids == [EOS]


def test_processing_leaves_input_untouched():
    logits = BASE.unsqueeze(0).clone()
    process_logits(logits, [row(output=[7], repetition_penalty=3.0, logit_bias={0: 5.0})])
    assert torch.equal(logits[0], BASE)


# ---- DRY ---------------------------------------------------------------------------------------

# The koboldcpp example: "a b c c b c y a b c" -> c would extend "a b c" (3), y "b c" (2), b "c" (1).
A, B_, C, Y = 0, 1, 2, 5
KOBOLD = [A, B_, C, C, B_, C, Y, A, B_, C]


def test_dry_exact_penalties():
    r = row(prompt=KOBOLD[:4], output=KOBOLD[4:], dry_multiplier=0.8, dry_base=1.75, dry_allowed_length=2)
    out = processed(r, torch.zeros(V))
    expected = torch.zeros(V)
    expected[C] = -0.8 * 1.75 ** (3 - 2)
    expected[Y] = -0.8 * 1.75 ** (2 - 2)  # b only reaches length 1 < allowed_length
    assert torch.allclose(out, expected, atol=0, rtol=1e-6)


def test_dry_breakers():
    kw = dict(dry_multiplier=1.0, dry_base=2.0, dry_allowed_length=2)
    # "b" is a breaker: the suffix after it is just "c", shorter than allowed_length.
    assert torch.equal(processed(row(prompt=KOBOLD, breakers=frozenset({B_}), **kw), torch.zeros(V)), torch.zeros(V))
    # last token a breaker: no penalty at all.
    assert torch.equal(processed(row(prompt=KOBOLD + [C, 6], breakers=frozenset({6}), **kw), torch.zeros(V)),
                       torch.zeros(V))
    # "y" is a breaker: never penalised as the continuation, "c" still is.
    out = processed(row(prompt=KOBOLD, breakers=frozenset({Y}), **kw), torch.zeros(V))
    expected = torch.zeros(V)
    expected[C] = -2.0
    assert torch.equal(out, expected)


def _dry_naive(ctx: list[int], breakers: set[int], mult: float, base: float, allowed: int) -> dict[int, float]:
    """text-generation-webui's loop, with the match cap."""
    last = ctx[-1]
    if last in breakers:
        return {}
    best: dict[int, int] = {}
    for i in range(len(ctx) - 1):
        if ctx[i] != last or ctx[i + 1] in breakers:
            continue
        m = 1
        while m < DRY_MAX_MATCH_LEN and i - m >= 0:
            prev = ctx[-1 - m]
            if prev in breakers or ctx[i - m] != prev:
                break
            m += 1
        best[ctx[i + 1]] = max(best.get(ctx[i + 1], 0), m)
    return {t: mult * base ** (m - allowed) for t, m in best.items() if m >= allowed}


def test_dry_matches_naive_reference():
    rng = random.Random(0)
    for trial in range(200):
        n = rng.randint(1, 60)
        alphabet = rng.randint(2, 5)
        ctx = [rng.randrange(alphabet) for _ in range(n)]
        breakers = set(rng.sample(range(alphabet), rng.randint(0, 1)))
        allowed = rng.randint(1, 3)
        toks, pens = dry_penalties(torch.tensor(ctx), frozenset(breakers), 0.5, 1.5, allowed, V)
        got = dict(zip(toks.tolist(), pens.tolist()))
        want = _dry_naive(ctx, breakers, 0.5, 1.5, allowed)
        assert got.keys() == want.keys(), (ctx, breakers, allowed)
        for t in want:
            assert got[t] == pytest.approx(want[t], rel=1e-6)


def test_dry_match_length_capped():
    ctx = list(range(V)) * 20  # a 160-token loop: the continuation of the latest repeat is 0
    toks, pens = dry_penalties(torch.tensor(ctx), frozenset(), 1.0, 1.1, 2, V)
    assert toks.tolist() == [0]
    assert pens.item() == pytest.approx(1.1 ** (DRY_MAX_MATCH_LEN - 2), rel=1e-6)
    _, huge = dry_penalties(torch.tensor(ctx), frozenset(), 1.0, 100.0, 2, V)
    assert math.isfinite(huge.item())


def test_dry_breaker_token_ids():
    texts = ["hello", "\n", "a:b", " world", 'say "hi', "", "**", "x"]
    assert dry_breaker_token_ids(texts, ["\n", ":", '"', "*"]) == frozenset({1, 2, 4, 6})
    assert dry_breaker_token_ids(texts, []) == frozenset()
    assert dry_breaker_token_ids(texts, [""]) == frozenset()


# ---- logprobs ----------------------------------------------------------------------------------

def test_logprobs_exact():
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(1))
    rows = [row(temperature=0.7, top_k=2, logprobs=True, top_logprobs=3, output=[1], presence_penalty=0.3),
            row(temperature=0.0, top_logprobs=V),  # top_logprobs implies logprobs; greedy uses T=1
            row(temperature=1.0)]
    out = Sampler(V, seed=0)(logits, rows)
    x = process_logits(logits, rows)
    lp0 = torch.log_softmax(x[0] / 0.7, -1)
    tok = out.token_ids[0]
    assert out.logprobs[0].token_id == tok and tok in lp0.topk(2).indices.tolist()
    assert out.logprobs[0].logprob == lp0[tok].item()
    assert [t for t, _ in out.logprobs[0].top] == lp0.topk(3).indices.tolist()
    assert [v for _, v in out.logprobs[0].top] == lp0.topk(3).values.tolist()
    lp1 = torch.log_softmax(logits[1], -1)
    assert out.logprobs[1].token_id == out.token_ids[1] == int(logits[1].argmax())
    assert out.logprobs[1].logprob == lp1.max().item()
    assert [t for t, _ in out.logprobs[1].top] == lp1.argsort(descending=True).tolist()
    assert all(math.isfinite(v) for _, v in out.logprobs[1].top)
    assert out.logprobs[2] is None


def test_logprobs_without_alternatives():
    out = Sampler(V, seed=0)(BASE.unsqueeze(0), [row(temperature=1.0, logprobs=True)])
    lp = out.logprobs[0]
    assert lp.top == [] and lp.logprob == torch.log_softmax(BASE, -1)[lp.token_id].item()


# ---- reproducibility ---------------------------------------------------------------------------

def test_shared_generator_seed_reproducible():
    a = sample_many(BASE, 50, seed=123, temperature=1.0)
    b = sample_many(BASE, 50, seed=123, temperature=1.0)
    assert a == b


def _fake_logits(history: list[int], vocab: int) -> torch.Tensor:
    """A deterministic stand-in for a model: logits depend only on the row's own history."""
    g = torch.Generator().manual_seed(1000 * len(history) + (history[-1] if history else 0))
    return torch.randn(vocab, generator=g) * 2.0


def test_seeded_row_same_alone_and_in_mixed_batch():
    vocab, steps = 32, 20
    target_params = dict(temperature=0.9, top_p=0.9, repetition_penalty=1.2, seed=42)

    def run(batch: bool) -> list[int]:
        sampler = Sampler(vocab, seed=None if batch else 999)
        rows = [SamplingRow(SamplingParams(**target_params).resolved(), [1, 2, 3], [],
                            request_generator(42), frozenset({0}))]
        if batch:
            rows = [SamplingRow(SamplingParams(temperature=0.0).resolved(), [4], [], None, frozenset({0})),
                    rows[0],
                    SamplingRow(SamplingParams(temperature=1.3, top_k=5, min_p=0.05, logprobs=True).resolved(),
                                [5, 6], [], None, frozenset({0})),
                    SamplingRow(SamplingParams(temperature=0.7, seed=7, dry_multiplier=0.8,
                                               frequency_penalty=0.4).resolved(),
                                [7, 7, 7], [], request_generator(7), frozenset({0}))]
        for _ in range(steps):
            logits = torch.stack([_fake_logits(list(r.prompt_token_ids) + list(r.output_token_ids), vocab)
                                  for r in rows])
            out = sampler(logits, rows)
            for r, t in zip(rows, out.token_ids):
                r.output_token_ids.append(t)
        return rows[1 if batch else 0].output_token_ids

    alone = run(False)
    assert run(True) == alone
    assert len(set(alone)) > 3  # it really sampled


def test_different_seeds_differ_same_seed_repeats():
    def draw(seed: int) -> list[int]:
        r = row(temperature=1.0, seed=seed, generator=request_generator(seed))
        sampler = Sampler(V)
        return [sampler(BASE.unsqueeze(0), [r]).token_ids[0] for _ in range(10)]

    assert draw(3) == draw(3)
    assert len({tuple(draw(s)) for s in range(10)}) > 1
