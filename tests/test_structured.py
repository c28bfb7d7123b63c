"""Structured output: JSON schema / regex grammars through llguidance, on a tiny random model."""
from __future__ import annotations

import json
import re

import pytest

from fixtures_models import build_checkpoint
from mistralpy import Engine, InvalidRequestError, SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 6}, "zip": {"type": "integer", "minimum": 1000,
                                                                                "maximum": 99999}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "color", "tags", "address"],
    "additionalProperties": False,
}


# Numbers with (exclusive) bounds, an array of objects, nullable and constant fields.
SCHEMA_2 = {
    "type": "object",
    "properties": {
        # multipleOf keeps a random model's digits finite (a plain number may go on forever)
        "score": {"type": "number", "exclusiveMinimum": 0, "maximum": 100, "multipleOf": 0.25},
        "items": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
            "type": "object", "properties": {"id": {"type": "integer", "minimum": -5, "maximum": 5},
                                             "ok": {"type": "boolean"}},
            "required": ["id", "ok"], "additionalProperties": False}},
        "note": {"type": ["string", "null"], "maxLength": 4},
        "kind": {"const": "v1"},
    },
    "required": ["score", "items", "note", "kind"],
    "additionalProperties": False,
}
RUNS = 20  # seeded runs per schema


def _check(obj) -> None:
    """Validate against SCHEMA by hand."""
    assert isinstance(obj, dict) and set(obj) == {"name", "age", "color", "tags", "address"}
    assert isinstance(obj["name"], str) and len(obj["name"]) <= 8
    assert isinstance(obj["age"], int) and not isinstance(obj["age"], bool) and 0 <= obj["age"] <= 120
    assert obj["color"] in ("red", "green", "blue")
    assert isinstance(obj["tags"], list) and len(obj["tags"]) <= 3
    assert all(isinstance(t, str) and len(t) <= 5 for t in obj["tags"])
    addr = obj["address"]
    assert isinstance(addr, dict) and set(addr) == {"city", "zip"}
    assert isinstance(addr["city"], str) and len(addr["city"]) <= 6
    assert isinstance(addr["zip"], int) and 1000 <= addr["zip"] <= 99999


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tokenizer_dir):
    ckpt = build_checkpoint(tmp_path_factory.mktemp("llama_structured"), "llama", tokenizer_dir)
    eng = Engine(str(ckpt), dtype="f32", num_kv_blocks=256, max_model_len=512)
    yield eng
    eng.shutdown()


@pytest.mark.parametrize("schema", [SCHEMA, SCHEMA_2], ids=["nested", "bounds"])
def test_json_schema_always_valid(engine, schema):
    import jsonschema

    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=300,
                             response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}})
              for s in range(RUNS)]
    outs = engine.generate(["Person:"] * RUNS, params)
    texts = set()
    for r in outs:
        o = r.outputs[0]
        assert o.finish_reason == "stop", o.text
        obj = json.loads(o.text)
        jsonschema.validate(obj, schema)
        if schema is SCHEMA:
            _check(obj)  # and by hand, in case the validator were lenient
        texts.add(o.text)
    assert len(texts) > RUNS // 2  # sampled, not one fixed string


def test_json_object_and_grammar_field(engine):
    r = engine.generate("x", SamplingParams(temperature=1.0, seed=3, max_tokens=300,
                                            grammar={"type": "json_schema", "value": SCHEMA}))[0].outputs[0]
    _check(json.loads(r.text))
    r = engine.generate("x", SamplingParams(temperature=1.0, seed=1, max_tokens=300,
                                            response_format={"type": "json_object"}))[0].outputs[0]
    if r.finish_reason == "stop":
        assert isinstance(json.loads(r.text), dict)
    else:
        assert r.text.startswith("{")


def test_regex_and_lark(engine):
    pattern = r"(yes|no), [0-9]{2,4}-[a-c]+!"
    for seed in range(3):
        o = engine.generate("q", SamplingParams(temperature=1.0, seed=seed, max_tokens=60,
                                                grammar={"type": "regex", "value": pattern}))[0].outputs[0]
        assert o.finish_reason == "stop"
        assert re.fullmatch(pattern, o.text), o.text
    lark = 'start: "ab" ("c" | "d")+ "."\n'
    o = engine.generate("q", SamplingParams(temperature=0, max_tokens=60,
                                            grammar={"type": "lark", "value": lark}))[0].outputs[0]
    assert o.finish_reason in ("stop", "length")
    assert re.fullmatch(r"ab[cd]+\.?", o.text), o.text


def test_free_rows_unchanged_in_mixed_batch(engine):
    free = [SamplingParams(temperature=1.0, seed=7, max_tokens=16, ignore_eos=True),
            SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)]
    alone = [engine.generate("hello world", p)[0].outputs[0].token_ids for p in free]
    constrained = SamplingParams(temperature=1.0, seed=1, max_tokens=200,
                                 response_format={"type": "json_schema", "json_schema": {"schema": SCHEMA}})
    mixed = engine.generate(["hello world", "Person:", "hello world"], [free[0], constrained, free[1]])
    assert mixed[0].outputs[0].token_ids == alone[0]
    assert mixed[2].outputs[0].token_ids == alone[1]
    _check(json.loads(mixed[1].outputs[0].text))


def test_chat_response_format(engine):
    out = engine.chat([{"role": "user", "content": "hi"}], temperature=1.0, seed=0, max_tokens=300,
                      response_format={"type": "json_schema", "json_schema": {"schema": SCHEMA}})
    _check(json.loads(out.choices[0].message.content))
    assert out.choices[0].finish_reason == "stop"


def test_invalid_grammar_is_invalid_request():
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(response_format={"type": "json_schema", "json_schema": {"schema": {"type": "bogus"}}})
    assert e.value.field == "response_format" and "bogus" in str(e.value)
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(grammar={"type": "regex", "value": "a(b"})
    assert e.value.field == "grammar" and "unclosed group" in str(e.value)
    with pytest.raises(InvalidRequestError):
        SamplingParams(grammar={"type": "lark", "value": "start: undefined_rule"})
    with pytest.raises(InvalidRequestError):
        SamplingParams(grammar={"type": "pcre", "value": "x"})
    with pytest.raises(InvalidRequestError):
        SamplingParams(response_format={"type": "xml"})
    assert SamplingParams(response_format={"type": "text"}).structured is None
