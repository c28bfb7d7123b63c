"""Tools that run in the server (server/tool_loop.py, engine/tool_rounds.py), through the official
``openai`` client over a real socket: the model's MCP tools (the SDK test server over stdio), a
``tool_dispatch_url`` endpoint and the search tools (fake local backends, tests/test_search.py).

A tiny random model never calls a tool by itself: calls are forced with ``tool_choice`` naming the
tool, and ``<|im_end|>`` is pushed up so each round is short; what is tested is the rounds around
the model: the tool's real output in ``agentic_tool_calls`` and in the next round's prompt,
streaming progress, errors, client-side tools, ``max_tool_rounds``, usage and /v1/models."""
from __future__ import annotations

import json

import httpx
import openai
import pytest
from fixtures_mcp import SECRET, stdio_source
from fixtures_server import running_server
from test_search import fake_web

from mistralpy.engine.tool_rounds import Rounds, ServerTools
from mistralpy.server.tool_loop import PROGRESS_EVENT, _CallRelay

ASK = [{"role": "user", "content": "Tell me the secret."}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"],
        "additionalProperties": False}}}
# one round of tools, then a one-token answer (<|im_end|> = 2 pushed up)
QUICK = {"temperature": 1.0, "max_tokens": 40, "logit_bias": {"2": 30}}


def named(name: str) -> dict:
    return {"type": "function", "function": {"name": name}}


@pytest.fixture(scope="module")
def web():
    with fake_web() as served:
        yield served


@pytest.fixture(scope="module")
def served(tmp_path_factory, tokenizer_dir, web):
    from fixtures_models import build_checkpoint

    from mistralpy import AsyncEngine
    from mistralpy.server import ServerOptions, create_app

    base, _ = web
    ckpt = build_checkpoint(tmp_path_factory.mktemp("server_tools"), "qwen3", tokenizer_dir, head_dim=32)
    engine = AsyncEngine(str(ckpt), dtype="f32", num_kv_blocks=128, max_model_len=512, max_seqs=4,
                         tool_parser="hermes", tool_dispatch_url=f"{base}/dispatch", tool_dispatch_timeout_s=1.0,
                         enable_search=True, search_backend=f"duckduckgo:{base}/html/",
                         mcp_config={"servers": [{"name": "py", "source": stdio_source("py")}],
                                     "tool_timeout_secs": 2})
    app = create_app(engine, ServerOptions(served_model_name="tiny", max_tool_rounds=4))
    try:
        with running_server(app) as url:
            yield engine, url, openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
    finally:
        engine.shutdown()


@pytest.fixture
def prompts(served, monkeypatch):
    """Every prompt the server rendered during a test, and the tool names offered with each."""
    eng = served[0].engine
    seen: list[str] = []
    seen_tools: list[set[str]] = []
    render = eng.render_chat

    def recording(*args, **kwargs):
        seen_tools.append({t["function"]["name"] for t in kwargs.get("tools") or []})
        seen.append(render(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(eng, "render_chat", recording)
    return seen, seen_tools


def extra(obj) -> dict:
    return obj.model_extra or {}


def test_models_report_mcp_counts(served):
    engine, _, client = served
    (card,) = client.models.list().data
    assert extra(card)["mcp_servers_connected"] == 1
    assert extra(card)["mcp_tools_count"] == len(engine.engine.mcp.tools()) >= 10


def test_forced_mcp_call_runs_in_the_server(served, prompts):
    engine, _, client = served
    seen, tools = prompts
    res = client.chat.completions.create(model="tiny", messages=ASK, tool_choice=named("py_secret"), seed=3,
                                         **QUICK)
    (call,) = extra(res)["agentic_tool_calls"]
    assert (call["round"], call["name"], call["result"], call["is_error"]) == (0, "py_secret", SECRET, False)
    assert call["mcp"]["isError"] is False and extra(res)["tool_rounds"] == 1
    # the tool's real output is in the second round's prompt, not the first
    assert len(seen) == 2 and SECRET not in seen[0] and SECRET in seen[1]
    assert {"py_secret", "py_echo", "d_json", "web_search", "fetch_url"} <= tools[0]  # every server tool offered
    choice = res.choices[0]
    assert choice.finish_reason in ("stop", "length") and not choice.message.tool_calls
    # usage sums both rounds' prompts
    tok = engine.engine.tokenize
    assert res.usage.prompt_tokens == sum(len(tok(p, add_special_tokens=False)) for p in seen)
    assert res.usage.total_tokens == res.usage.prompt_tokens + res.usage.completion_tokens


def test_streaming_shows_calls_as_they_happen(served, prompts):
    _, url, client = served
    stream = client.chat.completions.create(model="tiny", messages=ASK, tool_choice=named("py_secret"), seed=5,
                                            stream=True, stream_options={"include_usage": True}, **QUICK)
    chunks = list(stream)
    progress = [extra(c)[PROGRESS_EVENT] for c in chunks if PROGRESS_EVENT in extra(c)]
    assert [(p["status"], p["name"]) for p in progress] == [("started", "py_secret"), ("completed", "py_secret")]
    assert progress[1]["result"] == SECRET and "result" not in progress[0]
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    done = [extra(d)["agentic_tool_calls"] for d in deltas if "agentic_tool_calls" in extra(d)]
    assert done == [[{"round": 0, "name": "py_secret", "arguments": "{}", "result": SECRET, "is_error": False,
                      "mcp": done[0][0]["mcp"]}]]
    assert not any(d.tool_calls for d in deltas)  # the server-side call is not the client's to run
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 1 and finishes[0] in ("stop", "length")  # only the final answer's
    last = chunks[-1]
    assert extra(last)["agentic_tool_calls"][0]["result"] == SECRET and last.usage.prompt_tokens > 0
    assert SECRET in prompts[0][1]
    # on the wire, progress is a named SSE event
    body = {"model": "tiny", "messages": ASK, "tool_choice": named("py_secret"), "seed": 6, "stream": True, **QUICK}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as resp:
        lines = [line for line in resp.iter_lines() if line]
    events = [i for i, line in enumerate(lines) if line == f"event: {PROGRESS_EVENT}"]
    assert len(events) == 2 and json.loads(lines[events[0] + 1][6:])[PROGRESS_EVENT]["status"] == "started"
    assert lines[-1] == "data: [DONE]"


@pytest.mark.parametrize("tool,expect", [("py_fail", "failed on purpose"), ("py_stall", "timed out after 2 s"),
                                         ("d_fail", "HTTP 500: it broke"), ("d_slow", "timed out after 1 s")])
def test_failing_tools_give_error_results(served, prompts, tool, expect):
    _, url, client = served
    res = client.chat.completions.create(model="tiny", messages=ASK, tool_choice=named(tool), seed=6, **QUICK)
    (call,) = extra(res)["agentic_tool_calls"]
    assert call["is_error"] and call["result"].startswith("error: ") and expect in call["result"]
    assert expect in prompts[0][1]  # the model is told
    assert httpx.get(url + "/health").json()["status"] == "ok"


def test_dispatch_url(served, web):
    _, _, client = served
    _, state = web
    res = client.chat.completions.create(model="tiny", messages=ASK, tool_choice=named("d_json"), seed=7, **QUICK)
    (call,) = extra(res)["agentic_tool_calls"]
    assert json.loads(call["result"]) == {"ok": True, "got": {"name": "d_json", "arguments": {}}}
    assert not call["is_error"]
    posted = [json.loads(b) for m, p, b in state.received if m == "POST" and p == "/dispatch"]
    assert posted[-1] == {"name": "d_json", "arguments": {}}
    res = client.chat.completions.create(model="tiny", messages=ASK, tool_choice=named("d_text"), seed=8, **QUICK)
    assert extra(res)["agentic_tool_calls"][0]["result"] == "plain text answer"


def test_web_search_in_the_server(served, prompts):
    _, _, client = served
    res = client.chat.completions.create(model="tiny", messages=ASK, tool_choice=named("web_search"), seed=9,
                                         extra_body={"web_search_options": {"search_context_size": "low"}},
                                         **{**QUICK, "max_tokens": 200})  # a random query runs long
    (call,) = extra(res)["agentic_tool_calls"]
    assert "https://rust.example/borrow" in call["result"] and call["result"].startswith("[1] ")
    assert "https://rust.example/borrow" in prompts[0][1]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=ASK, extra_body={
            "web_search_options": {"search_context_size": "huge"}}, **QUICK)


def test_client_tools_stay_client_side(served, prompts):
    _, _, client = served
    seen, tools = prompts
    res = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER],
                                         tool_choice=named("get_weather"), seed=10, **QUICK)
    choice = res.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls[0].function.name == "get_weather"
    assert extra(res)["agentic_tool_calls"] == [] and len(seen) == 1
    assert {"get_weather", "py_secret", "web_search"} <= tools[0]  # both kinds offered in one request
    # a client tool shadows the server's tool of the same name: the client runs it
    mine = {"type": "function", "function": {"name": "py_secret", "parameters": {"type": "object", "properties": {},
                                                                     "additionalProperties": False}}}
    res = client.chat.completions.create(model="tiny", messages=ASK, tools=[mine], tool_choice=named("py_secret"),
                                         seed=11, **QUICK)
    assert res.choices[0].message.tool_calls[0].function.name == "py_secret"
    assert extra(res)["agentic_tool_calls"] == []
    # streamed: the client's call comes through as tool_calls deltas with its finish
    chunks = list(client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER], stream=True,
                                                 tool_choice=named("get_weather"), seed=12, **QUICK))
    names = [t.function.name for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or []
             if t.function and t.function.name]
    assert names == ["get_weather"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def test_max_tool_rounds(served, prompts, monkeypatch):
    _, _, client = served
    seen, _ = prompts
    # 0 rounds: the forced call is not run, it comes back as a tool call
    res = client.chat.completions.create(model="tiny", messages=ASK, tool_choice=named("py_secret"), seed=13,
                                         extra_body={"max_tool_rounds": 0}, **QUICK)
    assert extra(res)["agentic_tool_calls"] == [] and extra(res)["tool_rounds"] == 0
    assert res.choices[0].message.tool_calls[0].function.name == "py_secret"
    # keep the call forced in every round: the loop stops after max_tool_rounds rounds
    extend = Rounds.extend

    def forced_again(self, *args):
        choice = self.chat["tool_choice"]
        extend(self, *args)
        self.chat["tool_choice"] = choice

    monkeypatch.setattr(Rounds, "extend", forced_again)
    del seen[:]
    res = client.chat.completions.create(model="tiny", messages=ASK, tool_choice=named("py_secret"), seed=14,
                                         extra_body={"max_tool_rounds": 3}, **QUICK)
    assert [c["round"] for c in extra(res)["agentic_tool_calls"]] == [0, 1, 2] and len(seen) == 4
    assert extra(res)["tool_rounds"] == 3 and res.choices[0].finish_reason == "tool_calls"
    del seen[:]  # the server's default (--max-tool-rounds 4)
    res = client.chat.completions.create(model="tiny", messages=ASK, tool_choice=named("py_secret"), seed=15, **QUICK)
    assert len(extra(res)["agentic_tool_calls"]) == 4 and len(seen) == 5


def test_n_above_one_runs_without_server_tools(served):
    _, _, client = served
    res = client.chat.completions.create(model="tiny", messages=ASK, n=2, seed=16, max_tokens=4, temperature=1.0)
    assert len(res.choices) == 2 and "agentic_tool_calls" not in extra(res)


# ---- a round mixing both kinds (a random model will not write one: the relay and split directly) ----
class _Named:
    def __init__(self, names: set[str]) -> None:
        self.names = names

    def definitions(self) -> list:
        return []

    def has(self, name: str) -> bool:
        return name in self.names


def _chunk(delta: dict, finish: str | None = None) -> dict:
    return {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def test_mixed_round_relay():
    rounds = Rounds(ASK, {"tools": [WEATHER]}, ServerTools([_Named({"py_secret"})]), 4,
                    client_names=frozenset({"get_weather"}))
    relay = _CallRelay(rounds, forward_all=False)
    part = lambda i, **fn: {"index": i, "id": f"call{i}" if "name" in fn else None, "type": "function", "function": fn}
    out = [relay.filter(_chunk({"role": "assistant", "content": "Let me check."})),
           relay.filter(_chunk({"tool_calls": [part(0, name="py_secret", arguments="")]})),
           relay.filter(_chunk({"tool_calls": [part(0, arguments="{}")]})),
           relay.filter(_chunk({"tool_calls": [part(1, name="get_weather", arguments="")]})),
           relay.filter(_chunk({"tool_calls": [part(1, arguments='{"city": "Oslo"}')]}, "tool_calls"))]
    assert out[0]["choices"][0]["delta"]["content"] == "Let me check."
    assert out[1] is None and out[2] is None  # the server-side call is held back
    assert out[3]["choices"][0]["delta"]["tool_calls"][0]["index"] == 0  # the client's call, renumbered
    assert out[4]["choices"][0]["finish_reason"] is None and relay.held["choices"][0]["finish_reason"] == "tool_calls"
    here, client = relay.split()
    assert [c["function"]["name"] for c in here] == ["py_secret"]
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in client] == [("get_weather", '{"city": "Oslo"}')]
    rounds.round = 4  # the last round: nothing runs here
    assert rounds.split(here + client) == ([], here + client)


def test_client_disconnect_cancels_pending_calls(served, monkeypatch):
    import asyncio
    import time

    from mistralpy.engine.tool_rounds import McpTools

    engine, url, _ = served
    cancelled: list[str] = []
    call = McpTools.call

    async def watched(self, name, *args):
        try:
            return await call(self, name, *args)
        except asyncio.CancelledError:
            cancelled.append(name)
            raise

    monkeypatch.setattr(McpTools, "call", watched)
    body = {"model": "tiny", "messages": ASK, "tool_choice": named("py_stall"), "seed": 17, **QUICK}
    # streamed: gone as soon as the call started (the tool would time out after 2 s)
    with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=30) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: ") and '"status": "started"' in line:
                break
    # whole: the client gives up while the tool runs
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(30, read=1.0))
    deadline = time.monotonic() + 5
    while len(cancelled) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cancelled == ["py_stall", "py_stall"]
    sched = engine.engine.core.scheduler
    assert not sched.running and not sched.waiting
    assert httpx.get(url + "/health").json()["status"] == "ok"


def test_python_api_shares_the_loop(served):
    """Engine.chat and AsyncEngine.chat run the same server-side tools (engine/tool_rounds.py)."""
    import asyncio

    engine, _, _ = served
    kw = {"temperature": 1.0, "max_tokens": 40, "logit_bias": {2: 30.0}, "max_tool_rounds": 1}
    res = engine.engine.chat(ASK, tool_choice=named("d_text"), seed=18, **kw)
    assert res["agentic_tool_calls"][0]["result"] == "plain text answer" and res["tool_rounds"] == 1
    res = asyncio.run(engine.chat(ASK, tool_choice=named("py_secret"), seed=19, **kw))
    assert res["agentic_tool_calls"][0]["result"] == SECRET


def test_cli_flags():
    from mistralpy.cli.main import build_parser, engine_kwargs

    args = build_parser().parse_args(["serve", "-m", "x", "--enable-search", "--search-backend", "http://sx:8080",
                                      "--tool-dispatch-url", "http://tools:9/run", "--tool-dispatch-tools", "t.json",
                                      "--max-tool-rounds", "3"])
    kw = engine_kwargs(args)
    assert (kw["enable_search"], kw["search_backend"], kw["tool_dispatch_url"], kw["tool_dispatch_tools"]) == \
        (True, "http://sx:8080", "http://tools:9/run", "t.json")
    assert args.max_tool_rounds == 3
