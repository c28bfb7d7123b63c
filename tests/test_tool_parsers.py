"""Tool-call and reasoning parsers (mistralpy.tools): whole outputs, streams split anywhere, grammars.

Streams are checked against the whole-output parse for every split (1 char, 3 chars, random cuts):
same content, same calls, each call announced (id, name) before its argument pieces, argument pieces
concatenating to exactly the parsed arguments, no marker text in the content. Grammars are checked
with llguidance on the real Qwen3 tokenizer: the parser's own format with valid arguments is
accepted, invalid arguments / unknown names / an extra call for a named choice are rejected.
"""
from __future__ import annotations

import json
import random
import re
import time

import pytest

from mistralpy.errors import InvalidRequestError
from mistralpy.tools import (
    REASONING_PARSERS,
    TOOL_PARSERS,
    ToolCall,
    detect_reasoning_parser,
    detect_tool_parser,
    get_reasoning_parser,
    get_tool_parser,
    marker_token_ids,
)
from mistralpy.tools.deepseek import CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, SEP
from tests.assets import gemma3_tokenizer_dir, llama3_tokenizer_dir, load_mistralpy, qwen3_tokenizer_dir

W = {"city": "Paris", "unit": "celsius"}
TRICKY = {"q": "a } ] { [ \" \\ </tool_call> [TOOL_CALLS] ; \u00e9\u4e2d", "n": [1, {"x": None}], "f": -1.5e3}


def _j(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False)


def _ds(name: str, args: str) -> str:
    return f"{CALL_BEGIN}function{SEP}{name}\n```json\n{args}\n```{CALL_END}"


# (parser, output, expected content, expected [(name, arguments text)], markers that must not leak)
CASES = [
    ("hermes", f'<tool_call>\n{{"name": "get_weather", "arguments": {_j(W)}}}\n</tool_call>',
     None, [("get_weather", _j(W))], ["<tool_call>", "</tool_call>"]),
    ("hermes", (f'Let me check both.\n\n<tool_call>\n{{"name": "get_weather", "arguments": {_j(W)}}}\n</tool_call>\n'
                f'<tool_call>\n{{"name": "search", "arguments": {_j(TRICKY)}}}\n</tool_call>'),
     "Let me check both.", [("get_weather", _j(W)), ("search", _j(TRICKY))], ["<tool_call>", "</tool_call>"]),
    # Hermes 2 Pro order (arguments first), no whitespace, no closing tag (cut at the stop token)
    ("hermes", f'<tool_call>{{"arguments": {_j(W)}, "name": "get_weather"}}',
     None, [("get_weather", _j(W))], ["<tool_call>"]),
    ("hermes", 'Before.\n<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>\nAfter. <tool_call>',
     "Before.\nAfter. <tool_call>", [("now", "{}")], ["</tool_call>"]),
    ("hermes", "The answer is 4, no tool needed. <tool_ is not a tag", "The answer is 4, no tool needed. <tool_ is not a tag",
     [], []),
    ("llama3_json", f'{{"name": "get_weather", "parameters": {_j(W)}}}', None, [("get_weather", _j(W))], []),
    ("llama3_json", (f'<|python_tag|>{{"name": "get_weather", "parameters": {_j(W)}}}; '
                     f'{{"name": "search", "arguments": {_j(TRICKY)}}}'),
     None, [("get_weather", _j(W)), ("search", _j(TRICKY))], ["<|python_tag|>"]),
    ("llama3_json", '{"name": "now", "parameters": {}}\n\nThat is all.', "That is all.", [("now", "{}")], []),
    ("llama3_json", '{"answer": 42, "name": "x"}', '{"answer": 42, "name": "x"}', [], []),
    ("llama3_json", "It is sunny {today}.", "It is sunny {today}.", [], []),
    ("mistral", (f'[TOOL_CALLS][{{"name": "get_weather", "arguments": {_j(W)}}}, {{"name": "search", "arguments": '
                 f'{_j(TRICKY)}}}]'), None, [("get_weather", _j(W)), ("search", _j(TRICKY))], ["[TOOL_CALLS]"]),
    ("mistral", (f'[TOOL_CALLS] [{{"name": "get_weather", "arguments": {_j(W)}, "id": "a1B2c3D4e"}}, '
                f'{{"name": "now", "arguments": "{{}}", "id": "f5G6h7I8j"}}]'),
     None, [("get_weather", _j(W)), ("now", "{}")], ["[TOOL_CALLS]"]),
    ("mistral", f"Checking.[TOOL_CALLS]get_weather[ARGS]{_j(W)}[TOOL_CALLS]search[ARGS]{_j(TRICKY)}",
     "Checking.", [("get_weather", _j(W)), ("search", _j(TRICKY))], ["[TOOL_CALLS]", "[ARGS]"]),
    ("mistral", f"[TOOL_CALLS]get_weather[CALL_ID]a1B2c3D4e[ARGS]{_j(W)}", None, [("get_weather", _j(W))],
     ["[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"]),
    ("deepseek_v3", f"I'll look it up.{CALLS_BEGIN}{_ds('get_weather', _j(W))}\n{_ds('search', _j(TRICKY))}{CALLS_END}",
     "I'll look it up.", [("get_weather", _j(W)), ("search", _j(TRICKY))], [CALLS_BEGIN, CALL_BEGIN, SEP, CALL_END]),
    ("deepseek_v3", (f"{CALLS_BEGIN}{CALL_BEGIN}get_weather{SEP}{_j(W)}{CALL_END}{CALL_BEGIN}now{SEP}{{}}{CALL_END}"
                     f"{CALLS_END}"), None, [("get_weather", _j(W)), ("now", "{}")], [CALLS_BEGIN, CALL_BEGIN, SEP]),
]
# Outputs that look like calls but are not: all of it stays content.
BROKEN = [
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {"a": }}\n</tool_call>'),
    ("hermes", "Use <tool_call> tags like this"),
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {"a": 1'),
    ("llama3_json", "<|python_tag|>brave_search.call(query=\"weather\")"),
    ("llama3_json", '{"name": 5, "parameters": {}}'),
    ("mistral", "[TOOL_CALLS] (no call here)"),
    ("mistral", "[TOOL_CALLS]f[ARGS]not json"),
    ("deepseek_v3", f"{CALLS_BEGIN}{CALL_BEGIN}function{SEP}f\n```json\n[1, 2]\n```{CALL_END}{CALLS_END}"),
]


def _splits(text: str):
    yield "1 char", list(text)
    yield "3 chars", [text[i:i + 3] for i in range(0, len(text), 3)]
    for seed in range(3):
        rng = random.Random(seed)
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, max(1, len(text) // 5))))
        yield f"random {seed}", [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    yield "whole", [text]


def _stream(parser, pieces):
    deltas = []
    for piece in pieces:
        deltas += parser.feed(piece)
    return deltas + parser.finish()


def _collect(deltas) -> tuple[str, list[dict]]:
    """Fold chat-chunk deltas, checking the protocol: a call is announced (index in order, id, type,
    name, empty arguments) before any argument piece, and pieces carry only arguments."""
    content, calls = "", []
    for d in deltas:
        assert list(d) in (["content"], ["tool_calls"]), d
        if "content" in d:
            assert d["content"], "empty content delta"
            content += d["content"]
            continue
        for tc in d["tool_calls"]:
            i, fn = tc["index"], tc["function"]
            if i == len(calls):
                assert tc["type"] == "function" and tc["id"] and fn["name"] and fn["arguments"] == "", tc
                calls.append({"id": tc["id"], "name": fn["name"], "arguments": ""})
            else:
                assert i < len(calls) and set(tc) == {"index", "function"} and list(fn) == ["arguments"], tc
                calls[i]["arguments"] += fn["arguments"]
    return content, calls


@pytest.mark.parametrize("case", range(len(CASES)))
def test_parse_recorded_outputs(case):
    name, text, content, expected, _ = CASES[case]
    got_content, calls = get_tool_parser(name).parse(text)
    assert got_content == content
    assert [(c.name, c.arguments) for c in calls] == expected
    for c in calls:
        json.loads(c.arguments)
        assert c.to_openai() == {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        assert re.fullmatch(r"[A-Za-z0-9]{9}" if name == "mistral" else r"call_[0-9a-f]{24}", c.id), c.id
    assert len({c.id for c in calls}) == len(calls)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_stream_matches_parse_at_every_split(case):
    name, text, _, _, markers = CASES[case]
    content, calls = get_tool_parser(name).parse(text)
    for how, pieces in _splits(text):
        parser = get_tool_parser(name)
        got_content, got_calls = _collect(_stream(parser, pieces))
        assert got_content == (content or ""), how
        assert [(c["name"], c["arguments"]) for c in got_calls] == [(c.name, c.arguments) for c in calls], how
        assert len({c["id"] for c in got_calls}) == len(got_calls)
        assert parser.called == bool(calls)
        for m in markers:
            assert m not in got_content, (how, m)


@pytest.mark.parametrize("case", range(len(BROKEN)))
def test_text_that_is_not_a_call_stays_content(case):
    name, text = BROKEN[case]
    content, calls = get_tool_parser(name).parse(text)
    assert calls == [] and content == text.strip()
    for how, pieces in _splits(text):
        parser = get_tool_parser(name)
        got_content, _ = _collect(_stream(parser, pieces))
        if not parser.called:  # no name was announced: everything came back as content
            assert got_content == text.strip(), how


def test_stream_holds_back_marker_prefixes():
    p = get_tool_parser("hermes")
    assert p.feed("Hello <tool_") == [{"content": "Hello"}]
    assert p.feed("call>\n{\"name\": \"f") == []  # name not complete yet
    head = p.feed('", "arguments": {"a"')
    assert head[0]["tool_calls"][0]["function"] == {"name": "f", "arguments": ""}
    assert head[1] == {"tool_calls": [{"index": 0, "function": {"arguments": '{"a"'}}]}
    assert p.feed(": 1}}\n</tool_call") == [{"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}]
    assert p.feed(">") == [] and p.finish() == [] and p.called
    q = get_tool_parser("hermes")
    assert q.feed("a <tool_") == [{"content": "a"}] and q.feed("s> b") == [{"content": " <tool_s> b"}]
    r = get_tool_parser("mistral")
    assert r.feed("ok [TOOL_CA") == [{"content": "ok"}] and r.finish() == [{"content": " [TOOL_CA"}]


def test_truncated_call_stream():
    """Cut after the name: the call was announced with what arguments came; nothing is repeated as content."""
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'
    p = get_tool_parser("hermes")
    content, calls = _collect(_stream(p, list(text)))
    assert content == "" and p.called
    assert calls[0]["name"] == "get_weather" and calls[0]["arguments"] == '{"city": "Par'
    # Cut before the name: nothing was announced, so it all comes back as content.
    p = get_tool_parser("hermes")
    assert _collect(_stream(p, list('Hi <tool_call>\n{"na'))) == ('Hi <tool_call>\n{"na', []) and not p.called


def test_long_arguments_stream_in_linear_time():
    """A 40 kB arguments object fed 4 characters at a time: exact pieces, and no re-scan per delta
    (quadratic re-scanning took ~10 s here; linear takes ~0.2 s)."""
    args = _j({"code": "x = {'a': [1, 2]}\n" * 1500, "items": [{"k": i, "v": 's\\"]' * 5} for i in range(300)]})
    for name, text in [("hermes", f'<tool_call>\n{{"name": "write", "arguments": {args}}}\n</tool_call>'),
                       ("mistral", f"[TOOL_CALLS]write[ARGS]{args}"), ("deepseek_v3", CALLS_BEGIN + _ds("write", args))]:
        t0 = time.perf_counter()
        content, calls = _collect(_stream(get_tool_parser(name), [text[i:i + 4] for i in range(0, len(text), 4)]))
        assert time.perf_counter() - t0 < 3.0, name
        assert content == "" and [(c["name"], c["arguments"]) for c in calls] == [("write", args)]


def test_registry_and_errors():
    assert {"hermes", "llama3_json", "mistral", "deepseek_v3"} <= set(TOOL_PARSERS)
    assert get_tool_parser("hermes") is not get_tool_parser("hermes")
    with pytest.raises(InvalidRequestError):
        get_tool_parser("nope")
    with pytest.raises(InvalidRequestError):
        get_reasoning_parser("nope")
    assert ToolCall("f", "{}", "call_1").to_openai()["function"] == {"name": "f", "arguments": "{}"}


def test_detect_from_real_and_known_templates():
    assert detect_tool_parser(_template_text(qwen3_tokenizer_dir())) == "hermes"
    assert detect_reasoning_parser(_template_text(qwen3_tokenizer_dir())) == "think"
    for d in (llama3_tokenizer_dir(), gemma3_tokenizer_dir()):  # Llama 3.0 and Gemma 3: no tool syntax
        assert detect_tool_parser(_template_text(d)) is None and detect_reasoning_parser(_template_text(d)) is None
    llama31 = "{{- '<|python_tag|>' }} Respond in the format {\"name\": function name, \"parameters\": ...} {{ tools }}"
    assert detect_tool_parser(llama31) == "llama3_json"
    assert detect_tool_parser("{{ '[TOOL_CALLS][' + calls|tojson + ']' }}") == "mistral"
    assert detect_tool_parser("{{ '[TOOL_CALLS]' + name + '[ARGS]' + args }}[THINK]") == "mistral_v11"
    assert detect_reasoning_parser("{{ '[THINK]' }}") == "mistral"
    assert detect_tool_parser(f"{{{{'{CALLS_BEGIN}{CALL_BEGIN}' + type + '{SEP}' + name + '\\n```json\\n'}}}}") == \
        "deepseek_v3"
    assert detect_tool_parser("<tool_call>\n<function=name>\n<parameter=x>") is None  # Qwen3-Coder XML calls
    assert detect_tool_parser(None, "qwen3") == "hermes" and detect_tool_parser(None, "llama") is None
    assert detect_reasoning_parser(None, "qwen3") == "think"


def _template_text(d) -> str:
    return json.loads((d / "tokenizer_config.json").read_text())["chat_template"]


def test_qwen3_template_round_trip():
    """What the real Qwen3 template renders for an assistant turn with tool calls parses back."""
    tok = load_mistralpy(str(qwen3_tokenizer_dir()))
    calls = [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": W}},
             {"id": "call_2", "type": "function", "function": {"name": "search", "arguments": _j(TRICKY)}}]
    msgs = [{"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "Checking.", "tool_calls": calls}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=False, tools=[])
    turn = text.split("<|im_start|>assistant\n", 1)[1].split("<|im_end|>", 1)[0]
    reasoning, rest = get_reasoning_parser("think").parse(turn)
    content, parsed = get_tool_parser("hermes").parse(rest)
    assert reasoning is None and content == "Checking."
    assert [(c.name, json.loads(c.arguments)) for c in parsed] == [("get_weather", W), ("search", TRICKY)]


# ---- reasoning ----------------------------------------------------------------------------------

REASONING = [
    # (parser, starts_in_reasoning, output, reasoning, content)
    ("think", False, "<think>\nThe user wants 2+2.\nThat is 4.\n</think>\n\nThe answer is 4.",
     "The user wants 2+2.\nThat is 4.", "The answer is 4."),
    ("think", False, "The answer is 4.", None, "The answer is 4."),
    ("think", False, "<think>\n\n</think>\n\nHi", None, "Hi"),
    ("think", False, "<think>cut off while thinking", "cut off while thinking", None),
    ("think", False, "a <think> later is content </think>", None, "a <think> later is content </think>"),
    ("deepseek_r1", True, "Okay, 2+2 is 4.\n</think>\n\n**4**", "Okay, 2+2 is 4.", "**4**"),
    ("deepseek_r1", True, "<think>\nstill thinking", "still thinking", None),
    ("mistral", False, "[THINK]Compute.[/THINK]4", "Compute.", "4"),
]


@pytest.mark.parametrize("case", range(len(REASONING)))
def test_reasoning_parse_and_stream(case):
    name, opened, text, reasoning, content = REASONING[case]
    assert get_reasoning_parser(name, opened).parse(text) == (reasoning, content)
    start, end = REASONING_PARSERS[name]
    for how, pieces in _splits(text):
        p = get_reasoning_parser(name, opened)
        got = {"reasoning_content": "", "content": ""}
        for d in [d for piece in pieces for d in p.feed(piece)] + p.finish():
            (key, value), = d.items()
            assert value, how
            got[key] += value
        assert (got["reasoning_content"] or None, got["content"] or None) == (reasoning, content), how
        if reasoning is not None:
            assert start not in got["reasoning_content"] and end not in got["reasoning_content"]


def test_reasoning_prompt_opens():
    p = get_reasoning_parser("think")
    assert p.prompt_opens_reasoning("<｜Assistant｜><think>\n")
    assert not p.prompt_opens_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not p.prompt_opens_reasoning("<|im_start|>assistant\n")


# ---- grammars -----------------------------------------------------------------------------------

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city"]}}},
    {"type": "function", "function": {"name": "now"}}]
GOOD, BAD_ARGS, NOW = _j(W), '{"city": 3}', "{}"


def _fmt(name: str, calls: list[tuple[str, str]]) -> str:
    if name == "hermes":
        return "\n".join(f'<tool_call>\n{{"name": "{n}", "arguments": {a}}}\n</tool_call>' for n, a in calls)
    if name == "llama3_json":
        return "; ".join(f'{{"name": "{n}", "parameters": {a}}}' for n, a in calls)
    if name == "mistral":
        return "[TOOL_CALLS] [" + ", ".join(f'{{"name": "{n}", "arguments": {a}}}' for n, a in calls) + "]"
    if name == "mistral_v11":
        return "".join(f"[TOOL_CALLS]{n}[ARGS]{a}" for n, a in calls)
    if name == "deepseek_v3":
        return CALLS_BEGIN + "\n".join(_ds(n, a) for n, a in calls) + CALLS_END
    assert name == "deepseek_v31"
    return CALLS_BEGIN + "".join(f"{CALL_BEGIN}{n}{SEP}{a}{CALL_END}" for n, a in calls) + CALLS_END


@pytest.fixture(scope="module")
def qwen_matcher():
    llguidance = pytest.importorskip("llguidance")
    from mistralpy.structured import StructuredBackend, compile_grammar

    tok = load_mistralpy(str(qwen3_tokenizer_dir()))
    backend = StructuredBackend(tok, len(tok), [tok.token_to_id("<|im_end|>")])
    specials = marker_token_ids(tok)

    def accepts(parser_name: str, text: str, choice="required", parallel=True, use_specials=True) -> bool:
        key = get_tool_parser(parser_name).grammar(TOOLS, choice, specials if use_specials else None, parallel=parallel)
        assert key[0] == "lark"
        m = llguidance.LLMatcher(backend.ll_tokenizer, compile_grammar(key), log_level=0)
        return m.consume_tokens(tok.encode(text, add_special_tokens=False)) and not m.is_error() and m.is_accepting()

    return accepts


@pytest.mark.parametrize("name", ["hermes", "llama3_json", "mistral", "mistral_v11", "deepseek_v3", "deepseek_v31"])
def test_grammar_accepts_own_format_and_rejects_bad_calls(name, qwen_matcher):
    one = _fmt(name, [("get_weather", GOOD)])
    two = _fmt(name, [("get_weather", GOOD), ("now", NOW)])
    named = {"type": "function", "function": {"name": "get_weather"}}
    assert qwen_matcher(name, one) and qwen_matcher(name, two) and qwen_matcher(name, one, named)
    assert not qwen_matcher(name, _fmt(name, [("get_weather", BAD_ARGS)]))
    assert not qwen_matcher(name, _fmt(name, [("get_wether", GOOD)]))
    assert not qwen_matcher(name, _fmt(name, [("now", NOW)]), named)
    assert not qwen_matcher(name, two, named) and not qwen_matcher(name, two, parallel=False)
    assert not qwen_matcher(name, "Sure! " + one)
    # and what the grammar lets through parses back into the same calls
    content, calls = get_tool_parser(name).parse(two)
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", W), ("now", {})]


def test_grammar_special_token_markers(qwen_matcher):
    """Qwen's <tool_call> is an added token, which llguidance only matches as a token: without the
    token map the grammar spells it as text and the real token sequence is refused."""
    tok = load_mistralpy(str(qwen3_tokenizer_dir()))
    _, text = get_tool_parser("hermes").grammar(TOOLS, "required", marker_token_ids(tok))
    assert f"<[{tok.token_to_id('<tool_call>')}]>" in text
    _, plain = get_tool_parser("hermes").grammar(TOOLS, "required")
    assert '"<tool_call>"' in plain
    one = _fmt("hermes", [("get_weather", GOOD)])
    assert qwen_matcher("hermes", one) and not qwen_matcher("hermes", one, use_specials=False)


def test_grammar_errors():
    p = get_tool_parser("hermes")
    with pytest.raises(InvalidRequestError) as e:
        p.grammar(TOOLS, {"type": "function", "function": {"name": "unknown"}})
    assert e.value.field == "tool_choice"
    for bad in ("auto", "none", {"type": "function"}):
        with pytest.raises(InvalidRequestError):
            p.grammar(TOOLS, bad)
    with pytest.raises(InvalidRequestError):
        p.grammar([], "required")
