"""Tool calling and reasoning end to end: tiny random models with the real Qwen3 and Llama 3
tokenizers and chat templates, through the Python API and the server (official openai client).

A random model never calls a tool by itself, so the calls here are forced (tool_choice required /
named, which constrains the output with the tool schemas) and reasoning is forced with a grammar;
what is tested is everything around the model: rendering, constraint, parsing, streaming, rounds.
"""
from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from assets import llama3_tokenizer_dir, qwen3_tokenizer_dir
from fixtures_models import build_checkpoint
from fixtures_server import running_server
from test_chat_template import LLAMA31_STYLE_TOOLS
from tokenizers import Tokenizer

from mistralpy import AsyncEngine, InvalidRequestError
from mistralpy.server import ServerOptions, create_app

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 10},
        "unit": {"enum": ["c", "f"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "unit", "days"], "additionalProperties": False}}}
SEARCH = {"type": "function", "function": {
    "name": "search", "description": "Search the web",
    "parameters": {"type": "object", "properties": {"q": {"type": "string", "maxLength": 12}},
                   "required": ["q"], "additionalProperties": False}}}
TOOLS = [WEATHER, SEARCH]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
MODELS = {  # name -> (tokenizer dir, eos id, expected tool parser, expected reasoning parser, template)
    "qwen3": (qwen3_tokenizer_dir, 151645, "hermes", "think", None),
    # the asset's Llama 3.0 template has no tools: a Llama-3.1-style one replaces it
    "llama3": (llama3_tokenizer_dir, 128009, "llama3_json", None, LLAMA31_STYLE_TOOLS),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def served(request, tmp_path_factory):
    tok_dir_fn, eos, _, _, template = MODELS[request.param]
    tok_dir = tok_dir_fn()
    vocab = Tokenizer.from_file(str(tok_dir / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    ckpt = build_checkpoint(tmp_path_factory.mktemp(f"tools_{request.param}"), "qwen3", tok_dir,
                            vocab_size=vocab, eos_token_id=eos, head_dim=32)
    engine = AsyncEngine(str(ckpt), dtype="f32", num_kv_blocks=256, max_model_len=1024, max_seqs=16,
                         chat_template=template)
    app = create_app(engine, ServerOptions(served_model_name="tiny"))
    with running_server(app) as base:
        yield request.param, engine, openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=120)
    engine.shutdown()


def _check_calls(calls, names=set(SCHEMAS)) -> None:
    assert calls
    for call in calls:
        fn = call["function"]
        assert fn["name"] in names and call["id"] and call["type"] == "function"
        jsonschema.validate(json.loads(fn["arguments"]), SCHEMAS[fn["name"]])


def test_formats_detected_from_template(served):
    name, engine, _ = served
    _, _, tool_parser, reasoning_parser, _ = MODELS[name]
    assert (engine.engine.tool_parser, engine.engine.reasoning_parser) == (tool_parser, reasoning_parser)


def test_required_and_named_tool_calls(served):
    _, engine, _ = served
    eng = engine.engine
    for seed in range(4):
        res = eng.chat(ASK, tools=TOOLS, tool_choice="required", temperature=1.0, seed=seed, max_tokens=150)
        choice = res["choices"][0]
        assert choice["finish_reason"] == "tool_calls", choice
        _check_calls(choice["message"]["tool_calls"])
    for seed in range(3):  # parallel_tool_calls=False: exactly one call
        res = eng.chat(ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, temperature=1.0,
                       seed=seed, max_tokens=150)
        assert len(res["choices"][0]["message"]["tool_calls"]) == 1
    named = {"type": "function", "function": {"name": "search"}}
    res = eng.chat(ASK, tools=TOOLS, tool_choice=named, temperature=1.0, seed=7, max_tokens=150)
    _check_calls(res["choices"][0]["message"]["tool_calls"], {"search"})


def test_strict_tools_in_auto_mode(served):
    """tool_choice auto with strict tools: text stays free, but a call the model starts (here pushed
    by a logit bias on Qwen's <tool_call> token) always has valid arguments. Without strict, the
    same start gives a random model's garbage."""
    name, engine, _ = served
    eng = engine.engine
    # Qwen: the <tool_call> token; Llama 3: calls are bare JSON, so "{"
    opener = eng.tokenizer.encode("<tool_call>" if name == "qwen3" else "{", add_special_tokens=False)[0]
    strict = [{**t, "function": {**t["function"], "strict": True}} for t in TOOLS]
    kw = dict(tool_choice="auto", temperature=1.0, max_tokens=120, logit_bias={opener: 100.0})
    for seed in range(3):
        msg = eng.chat(ASK, tools=strict, seed=seed, **kw)["choices"][0]["message"]
        _check_calls(msg["tool_calls"])
        loose = eng.chat(ASK, tools=TOOLS, seed=seed, **kw)["choices"][0]["message"]
        assert not loose.get("tool_calls")  # random weights do not write a valid call by themselves
    text = eng.chat(ASK, tools=strict, tool_choice="auto", temperature=1.0, seed=0, max_tokens=12)
    assert text["choices"][0]["message"]["content"]  # free text is still allowed


def test_streamed_calls_equal_whole(served):
    """Streaming gives the name first, then argument fragments that join to the whole call."""
    _, engine, _ = served
    eng = engine.engine
    kw = dict(tools=TOOLS, tool_choice="required", temperature=1.0, seed=11, max_tokens=150)
    whole = eng.chat(ASK, **kw)["choices"][0]
    calls: dict[int, dict] = {}
    finish = None
    for chunk in eng.chat(ASK, stream=True, **kw):
        choice = chunk["choices"][0]
        finish = choice["finish_reason"] or finish
        for part in choice["delta"].get("tool_calls") or []:
            if part["index"] not in calls:
                assert part["function"]["name"] and part["id"]  # the name comes first
                calls[part["index"]] = {"name": part["function"]["name"], "arguments": "", "id": part["id"]}
            calls[part["index"]]["arguments"] += part["function"].get("arguments") or ""
    assert finish == "tool_calls"
    expected = [(c["function"]["name"], c["function"]["arguments"]) for c in whole["message"]["tool_calls"]]
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == expected


def test_tool_callbacks_run_and_continue(served, monkeypatch):
    _, engine, _ = served
    eng = engine.engine
    seen: list[dict] = []
    prompts: list[str] = []
    render = eng.render_chat
    monkeypatch.setattr(eng, "render_chat", lambda *a, **k: prompts.append(render(*a, **k)) or prompts[-1])

    def get_weather(**kwargs):
        seen.append(kwargs)
        return {"temp": 21, "city": kwargs["city"]}

    def search(q: str):
        seen.append({"q": q})
        return "no results"

    res = eng.chat(ASK, tools=TOOLS, tool_choice="required", temperature=1.0, seed=5, max_tokens=60,
                   tool_callbacks={"get_weather": get_weather, "search": search}, max_tool_rounds=1)
    assert seen and res["tool_rounds"] == 1
    for kwargs in seen:
        jsonschema.validate(kwargs, SCHEMAS["search" if "q" in kwargs else "get_weather"])
    # the second round's prompt carries the call and its result, rendered by the model's template
    assert len(prompts) == 2 and prompts[1].startswith(prompts[0][: len(prompts[0]) // 2])
    assert ("no results" in prompts[1]) or ("temp" in prompts[1] and "21" in prompts[1])
    assert res["usage"]["completion_tokens"] > 0


def test_async_tool_callbacks(served):
    """AsyncEngine.chat runs the tool rounds off the event loop, whole and streamed."""
    import asyncio

    name, engine, _ = served
    calls: list[dict] = []

    def search(q: str):
        calls.append({"q": q})
        return "nothing"

    kw = dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "search"}}, temperature=1.0,
              seed=2, max_tokens=40, tool_callbacks={"search": search}, max_tool_rounds=1)

    async def run():
        whole = await engine.chat(ASK, **kw)
        chunks = [c async for c in await engine.chat(ASK, stream=True, **kw)]
        return whole, chunks

    whole, chunks = asyncio.run(run())
    assert whole["tool_rounds"] == 1 and len(calls) == 2
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finishes[0] == "tool_calls" and len(finishes) == 2  # the call round, then the answer round


def test_reasoning_split(served):
    name, engine, _ = served
    if MODELS[name][3] is None:
        pytest.skip("no reasoning markers in this template")
    eng = engine.engine
    # Qwen3's <think> / </think> are added tokens: a grammar names them as tokens, as the model emits them.
    think, end = (eng.tokenizer.encode(t, add_special_tokens=False) for t in ("<think>", "</think>"))
    assert len(think) == len(end) == 1
    grammar = {"type": "lark", "value": f'start: <[{think[0]}]> "\\nplan " /[a-z]{{3}}/ "\\n" <[{end[0]}]> '
                                        '"\\n\\nanswer " /[a-z]{3}/'}
    msg = eng.chat(ASK, grammar=grammar, temperature=1.0, seed=1, max_tokens=40)["choices"][0]["message"]
    assert msg["reasoning_content"].startswith("plan ") and msg["content"].startswith("answer ")
    parts = {"reasoning_content": "", "content": ""}
    for chunk in eng.chat(ASK, grammar=grammar, temperature=1.0, seed=1, max_tokens=40, stream=True):
        delta = chunk["choices"][0]["delta"]
        for key in parts:
            parts[key] += delta.get(key) or ""
    assert "<think>" not in parts["content"] + parts["reasoning_content"]
    assert (parts["reasoning_content"].strip(), parts["content"].strip()) == (msg["reasoning_content"],
                                                                              msg["content"])


def test_bad_tool_requests_are_typed_errors(served):
    _, engine, _ = served
    eng = engine.engine
    cases = [
        (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
        (dict(tool_choice="required"), "tool_choice"),
        (dict(tools=[{"type": "function", "function": {"parameters": {}}}]), "tools"),
        (dict(tools=TOOLS, tool_choice="sometimes"), "tool_choice"),
        (dict(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"}), "tool_choice"),
    ]
    for kwargs, field in cases:
        with pytest.raises(InvalidRequestError) as err:
            eng.chat(ASK, max_tokens=4, **kwargs)
        assert err.value.field == field, kwargs


def test_server_tools_and_structured_output(served):
    _, _, client = served
    res = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                         temperature=1.0, seed=3, max_tokens=150)
    choice = res.choices[0]
    assert choice.finish_reason == "tool_calls"
    _check_calls([c.model_dump() for c in choice.message.tool_calls])
    stream = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                            temperature=1.0, seed=3, max_tokens=150, stream=True)
    args, names, finish = "", [], None
    for chunk in stream:
        c = chunk.choices[0]
        finish = c.finish_reason or finish
        for part in c.delta.tool_calls or []:
            if part.function.name:
                names.append(part.function.name)
            args += part.function.arguments or ""
    assert finish == "tool_calls" and names[0] == choice.message.tool_calls[0].function.name
    assert args == "".join(c.function.arguments for c in choice.message.tool_calls)
    # history with the call (arguments as JSON text, as OpenAI sends them) and its result renders and runs
    history = ASK + [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": choice.message.tool_calls[0].id, "content": "sunny"}]
    follow = client.chat.completions.create(model="tiny", messages=history, tools=TOOLS, max_tokens=5,
                                            temperature=0)
    assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls")

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    res = client.chat.completions.create(
        model="tiny", messages=ASK, temperature=1.0, seed=2, max_tokens=50,
        response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": schema}})
    assert isinstance(json.loads(res.choices[0].message.content)["ok"], bool)
    res = client.chat.completions.create(model="tiny", messages=ASK, temperature=1.0, seed=2, max_tokens=20,
                                         extra_body={"grammar": {"type": "regex", "value": "[0-9]{4}"}})
    assert len(res.choices[0].message.content) == 4 and res.choices[0].message.content.isdigit()


def test_server_bad_grammar_and_tools_are_400(served):
    _, _, client = served
    bad = [
        dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}),
        dict(extra_body={"grammar": {"type": "lark", "value": "start: ("}}),
        dict(extra_body={"grammar": {"type": "ebnf", "value": "x"}}),
        dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}),
        dict(tool_choice="required"),
    ]
    for kwargs in bad:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="tiny", messages=ASK, max_tokens=4, **kwargs)
        assert err.value.body and err.value.body.get("message"), kwargs
    # the server is still fine
    ok = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=3, temperature=0)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_which_formats_strict_auto_can_constrain():
    """Every format gets an auto-mode grammar: marker-token formats allow reasoning and text before
    the calls; Llama 3's bare JSON allows calls or text that does not open with "{"."""
    from mistralpy.tools import TOOL_PARSERS, get_tool_parser
    from mistralpy.tools.strict import strict_auto_grammar

    marks = {m: i for i, m in enumerate(["<tool_call>", "</tool_call>", "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]",
                                         "<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>",
                                         "<｜tool▁call▁end｜>", "<｜tool▁calls▁end｜>", "<think>", "</think>"], 100)}
    for name in TOOL_PARSERS:
        forced = get_tool_parser(name).grammar(TOOLS, "required", marks)[1]
        grammar = strict_auto_grammar(forced, ("<think>", "</think>"), False, marks)
        if name == "llama3_json":  # bare JSON calls: calls, or text that does not open with "{"
            assert grammar.startswith("start: TEXT | calls")
        else:
            assert grammar.startswith("start: reasoning? TEXT? calls?") and "<[110]>" in grammar
