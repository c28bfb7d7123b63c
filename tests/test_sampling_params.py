"""SamplingParams: validation names the bad field; resolved() precedence."""
from __future__ import annotations

import math

import pytest

from mistralpy.errors import InvalidRequestError
from mistralpy.sampling_params import DEFAULT_DRY_SEQUENCE_BREAKERS, SamplingParams


@pytest.mark.parametrize("field, value", [
    ("n", 0),
    ("n", 1.5),
    ("temperature", -0.1),
    ("temperature", math.nan),
    ("temperature", math.inf),
    ("temperature", "hot"),
    ("top_k", 2.5),
    ("top_k", "5"),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("min_p", -0.1),
    ("min_p", 1.1),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", math.inf),
    ("presence_penalty", 2.5),
    ("presence_penalty", -3.0),
    ("frequency_penalty", 2.1),
    ("frequency_penalty", math.nan),
    ("dry_multiplier", -1.0),
    ("dry_allowed_length", 0),
    ("dry_allowed_length", 1.5),
    ("dry_sequence_breakers", ["\n", 3]),
    ("logit_bias", {5: 101.0}),
    ("logit_bias", {-1: 1.0}),
    ("logit_bias", {"x": 1.0}),
    ("logit_bias", {1: math.nan}),
    ("logit_bias", [1, 2]),
    ("top_logprobs", 21),
    ("top_logprobs", -1),
    ("seed", 1.5),
    ("stop", [""]),
    ("stop", [3]),
    ("stop", 5),
    ("stop_token_ids", [-1]),
    ("stop_token_ids", ["a"]),
    ("stop_token_ids", 7),
    ("max_tokens", 0),
    ("max_tokens", 2.0),
    ("min_tokens", -1),
])
def test_invalid_field_raises_naming_it(field, value):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**{field: value})
    assert info.value.field == field
    assert isinstance(info.value, ValueError)


def test_cross_field_errors():
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(dry_multiplier=0.5, dry_base=1.0)
    assert info.value.field == "dry_base"
    SamplingParams(dry_multiplier=0.0, dry_base=1.0)  # base is irrelevant while DRY is off
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(max_tokens=4, min_tokens=5)
    assert info.value.field == "min_tokens"


def test_validate_vocab():
    SamplingParams(logit_bias={9: 1.0}, stop_token_ids=[9]).validate_vocab(10)
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(logit_bias={10: 1.0}).validate_vocab(10)
    assert info.value.field == "logit_bias"
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(stop_token_ids=[10]).validate_vocab(10)
    assert info.value.field == "stop_token_ids"


def test_normalisation():
    p = SamplingParams(stop="###", top_k=-1, logit_bias={"5": 1}, top_logprobs=3)
    assert p.stop == ["###"] and p.top_k == 0 and p.logit_bias == {5: 1.0} and p.logprobs is True
    assert SamplingParams().dry_sequence_breakers == list(DEFAULT_DRY_SEQUENCE_BREAKERS)
    assert SamplingParams(dry_sequence_breakers="\n").dry_sequence_breakers == ["\n"]
    # defaults are not shared between instances
    a, b = SamplingParams(), SamplingParams()
    a.stop.append("x")
    assert b.stop == []


def test_resolved_neutral_defaults():
    r = SamplingParams().resolved()
    assert (r.temperature, r.top_k, r.top_p, r.min_p, r.repetition_penalty) == (1.0, 0, 1.0, 0.0, 1.0)
    assert not r.greedy


def test_resolved_generation_config_fills_unset_fields():
    gen = {"temperature": 0.6, "top_k": 20, "top_p": 0.95, "min_p": 0.05, "repetition_penalty": 1.1,
           "do_sample": True}
    r = SamplingParams().resolved(gen)
    assert (r.temperature, r.top_k, r.top_p, r.min_p, r.repetition_penalty) == (0.6, 20, 0.95, 0.05, 1.1)


def test_resolved_request_wins():
    gen = {"temperature": 0.6, "top_k": 20, "top_p": 0.95, "do_sample": False}
    r = SamplingParams(temperature=0.9, top_k=5, top_p=0.5).resolved(gen)
    assert (r.temperature, r.top_k, r.top_p) == (0.9, 5, 0.5)
    # request top_k=-1 ("disabled") is a value, not "unset": it beats generation_config
    assert SamplingParams(top_k=-1).resolved(gen).top_k == 0


def test_resolved_do_sample_false_is_greedy():
    r = SamplingParams().resolved({"do_sample": False, "temperature": 0.7, "top_p": 0.9})
    assert r.temperature == 0.0 and r.greedy
    assert r.top_p == 0.9
    assert SamplingParams().resolved({"do_sample": True, "temperature": 0.7}).temperature == 0.7


def test_resolved_is_a_copy():
    p = SamplingParams(stop=["a"])
    r = p.resolved()
    assert r is not p and p.temperature is None and r.stop == ["a"]
    assert p.resolved({"temperature": 0.3}).temperature == 0.3
