"""The OpenAI Responses API (/v1/responses) over a real socket, driven by the official openai SDK,
on tiny random models: the greedy answer equals the chat route's for the same conversation; named
stream events in order (each validated against the SDK's own types); the stored-response routes;
previous_response_id; function tools; text.format; reasoning items; background + cancel; a restart
over the same SQLite file.
"""
from __future__ import annotations

import base64
import io
import json
import sqlite3
import time

import httpx
import jsonschema
import openai
import pytest
from fixtures_models import build_checkpoint
from fixtures_server import running_server
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from mistralpy import AsyncEngine
from mistralpy.server import ServerOptions, create_app
from mistralpy.server.responses_store import DEFAULT_MAX_ENTRIES, ResponseStore

NAME = "tiny"
HELLO = "Hello there, how are you?"
EVENTS = TypeAdapter(ResponseStreamEvent)


def _client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def llama(tmp_path_factory, tokenizer_dir):
    ckpt = build_checkpoint(tmp_path_factory.mktemp("resp_llama"), "llama", tokenizer_dir)
    engine = AsyncEngine(str(ckpt), dtype="f32", num_kv_blocks=320, max_model_len=2048, max_seqs=8)
    db = tmp_path_factory.mktemp("resp_db") / "responses.db"
    app = create_app(engine, ServerOptions(served_model_name=NAME, responses_db=str(db)))
    with running_server(app) as base:
        yield base, _client(base), engine, db
    engine.shutdown()


@pytest.fixture(scope="module")
def client(llama):
    return llama[1]


def _create(client, **kw):
    return client.responses.create(model=NAME, **{"max_output_tokens": 8, "temperature": 0, **kw})


def _chat(client, messages, **kw):
    return client.chat.completions.create(model=NAME, messages=messages, **{"max_tokens": 8, "temperature": 0, **kw})


def _raw(base: str, body: dict) -> dict:
    r = httpx.post(base + "/v1/responses", json={"model": NAME, **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _raw_events(base: str, body: dict) -> list[dict]:
    """The streamed events as sent; each must validate as one of the SDK's event types."""
    events, name = [], None
    with httpx.stream("POST", base + "/v1/responses", json={"model": NAME, "stream": True, **body}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                event = json.loads(line[6:])
                assert event["type"] == name
                EVENTS.validate_python(event)
                events.append(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def _same(a: dict, b: dict) -> None:
    """Two response objects equal but for their ids and times (and the SDK helper's parsed=None)."""
    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if k not in ("id", "created_at", "completed_at", "call_id", "parsed")}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj

    assert strip(a) == strip(b)


def test_create_equals_chat_and_validates(llama, client):
    base = llama[0]
    resp = _create(client, input=HELLO, extra_body={"ignore_eos": True})
    chat = _chat(client, [{"role": "user", "content": HELLO}], extra_body={"ignore_eos": True})
    assert resp.id.startswith("resp_") and resp.object == "response" and resp.model == NAME
    assert resp.output_text == chat.choices[0].message.content and resp.output_text
    assert resp.usage.input_tokens == chat.usage.prompt_tokens and resp.usage.output_tokens == 8
    assert resp.usage.total_tokens == resp.usage.input_tokens + 8
    assert resp.status == "incomplete" and resp.incomplete_details.reason == "max_output_tokens"
    msg = resp.output[0]
    assert msg.type == "message" and msg.role == "assistant" and msg.id.startswith("msg_")
    assert msg.content[0].type == "output_text" and msg.content[0].annotations == []
    # items, instructions, developer role and our sampling extensions, against the chat route
    items = [{"role": "developer", "content": "Be short."},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
             {"role": "assistant", "content": [{"type": "output_text", "text": "Hello!"}]},
             {"role": "user", "content": HELLO}]
    ext = {"top_k": 5, "repetition_penalty": 1.1, "min_p": 0.01, "ignore_eos": True}
    resp = _create(client, input=items, instructions="You are kind.", metadata={"k": "v"}, user="u1",
                   extra_body=ext)
    chat = _chat(client, [{"role": "system", "content": "You are kind."}, {"role": "system", "content": "Be short."},
                          {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                          {"role": "user", "content": HELLO}], extra_body=ext)
    assert resp.output_text == chat.choices[0].message.content
    assert resp.usage.input_tokens == chat.usage.prompt_tokens
    assert resp.metadata == {"k": "v"} and resp.instructions == "You are kind." and resp.user == "u1"
    # the JSON itself validates against the SDK's Response type (not just the lenient construct)
    raw = _raw(base, {"input": HELLO, "max_output_tokens": 4, "temperature": 0})
    Response.model_validate(raw)
    assert raw["status"] in ("completed", "incomplete") and raw["tool_choice"] == "auto" and raw["tools"] == []


def test_stream_event_order_and_final_equals_plain(llama, client):
    base = llama[0]
    body = {"input": HELLO, "max_output_tokens": 6, "temperature": 0, "ignore_eos": True}
    events = _raw_events(base, body)
    types = [e["type"] for e in events]
    n = types.count("response.output_text.delta")
    assert n >= 1 and types == (["response.created", "response.in_progress", "response.output_item.added",
                                 "response.content_part.added"] + ["response.output_text.delta"] * n +
                                ["response.output_text.done", "response.content_part.done",
                                 "response.output_item.done", "response.incomplete"])
    final = events[-1]["response"]
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert final["output"][0]["content"][0]["text"] == text == events[-4]["text"]
    assert final["incomplete_details"] == {"reason": "max_output_tokens"} and final["usage"]["output_tokens"] == 6
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    _same(final, _raw(base, {**body, "stream": False}))
    # A response that ends by itself (a regex grammar completes) is response.completed.
    ext = {"grammar": {"type": "regex", "value": "[a-z]{3} [a-z]{3}"}}
    events = _raw_events(base, {"input": HELLO, "max_output_tokens": 40, "temperature": 0, **ext})
    assert events[-1]["type"] == "response.completed" and events[-1]["response"]["status"] == "completed"
    assert events[-1]["response"]["incomplete_details"] is None
    # the SDK's stream helper: its final response equals the non-streamed one
    with client.responses.stream(model=NAME, input=HELLO, max_output_tokens=40, temperature=0, extra_body=ext) as s:
        seen = [e.type for e in s]
        final = s.get_final_response()
    plain = _create(client, input=HELLO, max_output_tokens=40, extra_body=ext)
    _same(final.model_dump(), plain.model_dump())
    assert seen[-1] == "response.completed" and len(plain.output_text) == 7


def test_retrieve_input_items_delete(client):
    items = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
             {"role": "user", "content": [{"type": "input_text", "text": "three"}]}]
    resp = _create(client, input=items, max_output_tokens=3)
    got = client.responses.retrieve(resp.id)
    assert got.model_dump() == resp.model_dump()
    listed = client.responses.input_items.list(resp.id)  # newest first, as OpenAI lists them
    texts = [i.content[0].text for i in listed.data]
    assert texts == ["three", "two", "one"] and listed.first_id == listed.data[0].id and not listed.has_more
    assert [i.role for i in listed.data] == ["user", "assistant", "user"]
    asc = client.responses.input_items.list(resp.id, order="asc", limit=2)
    assert [i.content[0].text for i in asc.data] == ["one", "two"] and asc.has_more
    assert [i.content[0].text for i in client.responses.input_items.list(resp.id, order="asc", limit=1)] == \
        ["one", "two", "three"]  # the SDK pages on with ?after=
    client.responses.delete(resp.id)
    with pytest.raises(openai.NotFoundError) as err:
        client.responses.retrieve(resp.id)
    assert err.value.response.json()["error"]["type"] == "not_found_error"
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(resp.id)
    unstored = _create(client, input="x", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_previous_response_id_continues_the_conversation(client):
    first = _create(client, input="Hi, who are you?", max_output_tokens=6, extra_body={"ignore_eos": True})
    second = _create(client, input="Tell me more.", previous_response_id=first.id, extra_body={"ignore_eos": True})
    history = [{"role": "user", "content": "Hi, who are you?"}, {"role": "assistant", "content": first.output_text},
               {"role": "user", "content": "Tell me more."}]
    chat = _chat(client, history, extra_body={"ignore_eos": True})
    assert second.output_text == chat.choices[0].message.content
    assert second.usage.input_tokens == chat.usage.prompt_tokens > first.usage.input_tokens + 6
    assert second.previous_response_id == first.id
    assert [i.content[0].text for i in client.responses.input_items.list(second.id)] == ["Tell me more."]
    third = _create(client, input="And?", previous_response_id=second.id, extra_body={"ignore_eos": True})
    chat = _chat(client, history + [{"role": "assistant", "content": second.output_text},
                                    {"role": "user", "content": "And?"}], extra_body={"ignore_eos": True})
    assert third.output_text == chat.choices[0].message.content
    with pytest.raises(openai.NotFoundError) as err:
        _create(client, input="x", previous_response_id="resp_nope")
    assert err.value.body["code"] == "response_not_found" and "resp_nope" in err.value.body["message"]


@pytest.mark.parametrize("kw, param", [
    ({"input": []}, "input"),
    ({"input": [{"type": "bogus"}]}, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools"),
    ({"input": "x", "tool_choice": "required"}, "tool_choice"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format"),
    ({"input": "x", "reasoning": {"effort": "extreme"}}, "reasoning.effort"),
    ({"input": "x", "background": True, "store": False}, "background"),
    ({"input": "x", "metadata": {"k" * 65: "v"}}, "metadata"),
    ({"input": "x", "max_output_tokens": 0}, None),
    ({"input": "x", "truncation": "sometimes"}, None),
])
def test_bad_requests_are_400(client, kw, param):
    with pytest.raises(openai.BadRequestError) as err:
        _create(client, **{"max_output_tokens": 4, **kw})
    body = err.value.response.json()["error"]
    assert body["type"] == "invalid_request_error" and body["message"]
    if param is not None:
        assert body["param"] == param, body


def test_bad_routes(llama, client):
    base = llama[0]
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="nope", input="x")
    resp = _create(client, input="x", max_output_tokens=2)
    assert httpx.get(f"{base}/v1/responses/{resp.id}/input_items?limit=0").status_code == 400
    assert httpx.get(f"{base}/v1/responses/{resp.id}/input_items?after=zzz").status_code == 400
    with pytest.raises(openai.BadRequestError):  # only a background response can be cancelled
        client.responses.cancel(resp.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.cancel("resp_nope")


def _slow(engine, delay: float = 0.02):
    """Make each engine step take ``delay`` (the tiny model would finish before a cancel arrives)."""
    runner = engine.engine.core.runner
    real = runner.execute

    def slow(sched):
        time.sleep(delay)
        return real(sched)

    runner.execute = slow
    return lambda: setattr(runner, "execute", real)


def _idle(base: str) -> None:
    deadline = time.time() + 20
    while True:
        m = httpx.get(base + "/metrics").text
        if "mistralpy_num_requests_running 0" in m and "mistralpy_num_requests_waiting 0" in m:
            return
        assert time.time() < deadline, "the engine request kept running"
        time.sleep(0.05)


def test_background_then_cancel(llama, client):
    base, _, engine, _ = llama
    done = _create(client, input=HELLO, background=True, max_output_tokens=5, extra_body={"ignore_eos": True})
    assert done.status in ("queued", "in_progress") and done.background
    deadline = time.time() + 30
    while (done := client.responses.retrieve(done.id)).status in ("queued", "in_progress"):
        assert time.time() < deadline
        time.sleep(0.05)
    fg = _create(client, input=HELLO, max_output_tokens=5, extra_body={"ignore_eos": True})
    assert done.status == "incomplete" and done.output_text == fg.output_text
    assert client.responses.cancel(done.id).status == "incomplete"  # finished: cancel changes nothing
    restore = _slow(engine)
    try:
        running = _create(client, input=HELLO, background=True, max_output_tokens=1500,
                          extra_body={"ignore_eos": True})
        time.sleep(0.3)
        cancelled = client.responses.cancel(running.id)
        assert cancelled.status == "cancelled" and cancelled.usage.output_tokens < 1500
        _idle(base)
    finally:
        restore()
    assert client.responses.retrieve(running.id).status == "cancelled"


def _statuses(db) -> list[str]:
    with sqlite3.connect(db) as conn:
        return [json.loads(b)["status"] for (b,) in conn.execute("SELECT body FROM responses ORDER BY used")]


def test_disconnect_aborts_and_stores_cancelled(llama):
    base, client, engine, db = llama
    restore = _slow(engine)
    body = {"model": NAME, "input": HELLO, "max_output_tokens": 1500, "ignore_eos": True}
    try:
        with httpx.stream("POST", base + "/v1/responses", json={**body, "stream": True}, timeout=60) as r:
            for line in r.iter_lines():
                event = json.loads(line[6:]) if line.startswith("data: ") else {}
                if event.get("type") == "response.created":
                    resp_id = event["response"]["id"]
                if event.get("type") == "response.output_text.delta":
                    break  # the client goes away mid-stream
        _idle(base)  # 1500 steps of 20 ms would outlast _idle's deadline: the request was aborted
        assert client.responses.retrieve(resp_id).status == "cancelled"
        before = _statuses(db).count("cancelled")
        with pytest.raises(httpx.ReadTimeout):  # the same without streaming
            httpx.post(base + "/v1/responses", json=body, timeout=0.5)
        _idle(base)
        deadline = time.time() + 10
        while _statuses(db).count("cancelled") == before:
            assert time.time() < deadline, "the abandoned response was not stored as cancelled"
            time.sleep(0.05)
    finally:
        restore()


def test_store_lru_bound_and_unfinished_after_restart(tmp_path):
    store = ResponseStore(max_entries=2)
    for i in range(3):
        store.put({"id": f"r{i}", "status": "completed", "output": []}, [], [])
        if i == 1:
            store.get("r0")  # used: r1 is now the least recently used
    assert len(store) == 2 and store.get("r0") and store.get("r2")
    with pytest.raises(Exception, match="No response found"):
        store.get("r1")
    path = str(tmp_path / "r.db")
    disk = ResponseStore(path)
    disk.put({"id": "a", "status": "in_progress", "output": []}, [{"id": "m", "type": "message"}], [])
    disk.close()
    again = ResponseStore(path)  # a response left running by an earlier process can never finish
    assert again.get("a")["status"] == "failed" and again.input_items("a") == [{"id": "m", "type": "message"}]
    assert again.max_entries is None and ResponseStore().max_entries == DEFAULT_MAX_ENTRIES


def test_engine_failure_is_failed(llama, client):
    base, _, engine, _ = llama
    runner = engine.engine.core.runner
    real, calls = runner.execute, 0

    def flaky(sched):
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("boom")
        return real(sched)

    runner.execute = flaky
    try:
        with pytest.raises(openai.InternalServerError, match="boom") as err:
            _create(client, input=HELLO, extra_body={"ignore_eos": True})
        failed = err.value.response.json()["response"]
        assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
        assert client.responses.retrieve(failed["id"]).status == "failed"
        calls = 0
        events = _raw_events(base, {"input": HELLO, "max_output_tokens": 8, "ignore_eos": True})
        assert events[-1]["type"] == "response.failed" and "boom" in events[-1]["response"]["error"]["message"]
    finally:
        runner.execute = real
    assert _create(client, input=HELLO).status in ("completed", "incomplete")


def test_restart_with_responses_db_keeps_responses(llama):
    _, client, engine, db = llama
    kept = _create(client, input=HELLO, extra_body={"ignore_eos": True})
    for options in (ServerOptions(served_model_name=NAME, responses_db=str(db)), ServerOptions(served_model_name=NAME)):
        with running_server(create_app(engine, options)) as base:  # a second server process, same engine
            other = _client(base)
            if options.responses_db is None:  # in memory: a new server knows nothing
                with pytest.raises(openai.NotFoundError):
                    other.responses.retrieve(kept.id)
                continue
            assert other.responses.retrieve(kept.id).model_dump() == kept.model_dump()
            follow = _create(other, input="More?", previous_response_id=kept.id)
            assert follow.usage.input_tokens > kept.usage.input_tokens + kept.usage.output_tokens


# ---- tools, structured output and reasoning: a Qwen3 tokenizer and template -------------------
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city", "strict": True,
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                           "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                          "required": ["city", "days"], "additionalProperties": False}}
CHAT_WEATHER = {"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}
ASK = "What is the weather in Paris?"


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    from assets import qwen3_tokenizer_dir
    from tokenizers import Tokenizer

    tok_dir = qwen3_tokenizer_dir()
    vocab = Tokenizer.from_file(str(tok_dir / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    ckpt = build_checkpoint(tmp_path_factory.mktemp("resp_qwen3"), "qwen3", tok_dir, vocab_size=vocab,
                            eos_token_id=151645, head_dim=32)
    engine = AsyncEngine(str(ckpt), dtype="f32", num_kv_blocks=256, max_model_len=1024, max_seqs=8)
    with running_server(create_app(engine, ServerOptions(served_model_name=NAME))) as base:
        yield base, _client(base), engine
    engine.shutdown()


def test_function_tool_round_trip(qwen):
    base, client, _ = qwen
    forced = {"type": "function", "name": "get_weather"}
    resp = client.responses.create(model=NAME, input=ASK, tools=[WEATHER], tool_choice=forced, temperature=1.0,
                                   max_output_tokens=150, extra_body={"seed": 3})
    calls = [o for o in resp.output if o.type == "function_call"]
    assert resp.status == "completed" and len(calls) == 1 and calls[0].name == "get_weather"
    assert calls[0].call_id and calls[0].id.startswith("fc_") and calls[0].status == "completed"
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER["parameters"])
    assert resp.tools[0].name == "get_weather" and resp.tool_choice.name == "get_weather"
    # streamed: the call's events, arguments deltas joining to the whole
    body = {"input": ASK, "tools": [WEATHER], "tool_choice": forced, "temperature": 1.0, "seed": 3,
            "max_output_tokens": 150}
    events = _raw_events(base, body)
    kinds = [e["type"] for e in events if e["type"] != "response.function_call_arguments.delta"]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    args = "".join(e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta")
    assert args == events[-3]["arguments"] == calls[0].arguments  # same seed, same call
    # the tool's result goes back as a function_call_output item of the next turn
    follow = client.responses.create(model=NAME, previous_response_id=resp.id, tools=[WEATHER], temperature=0,
                                     max_output_tokens=6, input=[{"type": "function_call_output",
                                                                  "call_id": calls[0].call_id, "output": "sunny"}])
    history = [{"role": "user", "content": ASK},
               {"role": "assistant", "content": "", "tool_calls": [{"id": calls[0].call_id, "type": "function",
                "function": {"name": "get_weather", "arguments": calls[0].arguments}}]},
               {"role": "tool", "tool_call_id": calls[0].call_id, "content": "sunny"}]
    chat = client.chat.completions.create(model=NAME, messages=history, tools=[CHAT_WEATHER], temperature=0,
                                          max_tokens=6)
    assert follow.usage.input_tokens == chat.usage.prompt_tokens
    assert follow.output_text == (chat.choices[0].message.content or "")
    # the same history sent as items (no store) renders the same prompt
    items = [{"role": "user", "content": ASK}, calls[0].model_dump(exclude_none=True),
             {"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny"}]
    again = client.responses.create(model=NAME, input=items, tools=[WEATHER], temperature=0, max_output_tokens=6,
                                    store=False)
    assert again.usage.input_tokens == chat.usage.prompt_tokens and again.output_text == follow.output_text
    required = client.responses.create(model=NAME, input=ASK, tools=[WEATHER], tool_choice="required",
                                       temperature=1.0, max_output_tokens=150, extra_body={"seed": 5})
    assert required.output and {o.type for o in required.output} == {"function_call"}
    one = client.responses.create(model=NAME, input=ASK, tools=[WEATHER], tool_choice="required",
                                  parallel_tool_calls=False, temperature=1.0, max_output_tokens=150,
                                  extra_body={"seed": 5})
    assert [o.type for o in one.output] == ["function_call"] and one.parallel_tool_calls is False


def test_text_format_json_schema(qwen):
    _, client, _ = qwen
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                               "maximum": 9}},
              "required": ["ok", "n"], "additionalProperties": False}
    resp = client.responses.create(model=NAME, input=ASK, temperature=1.0, max_output_tokens=60,
                                   text={"format": {"type": "json_schema", "name": "r", "schema": schema,
                                                    "strict": True}}, extra_body={"seed": 2})
    jsonschema.validate(json.loads(resp.output_text), schema)
    assert resp.text.format.type == "json_schema" and resp.text.format.name == "r"
    obj = client.responses.create(model=NAME, input=ASK, temperature=0, max_output_tokens=8,
                                  text={"format": {"type": "json_object"}})
    assert obj.text.format.type == "json_object" and obj.output_text.lstrip().startswith(("{", "["))


def test_reasoning_items(qwen):
    base, client, engine = qwen
    tok = engine.engine.tokenizer
    think, end = (tok.encode(t, add_special_tokens=False)[0] for t in ("<think>", "</think>"))
    grammar = {"type": "lark", "value": f'start: <[{think}]> "\\nplan " /[a-z]{{3}}/ "\\n" <[{end}]> '
                                        '"\\n\\nanswer " /[a-z]{3}/'}
    body = {"input": ASK, "temperature": 1.0, "seed": 1, "max_output_tokens": 40, "grammar": grammar}
    resp = _raw(base, body)
    Response.model_validate(resp)
    reasoning, message = resp["output"]
    assert reasoning["type"] == "reasoning" and reasoning["content"][0]["type"] == "reasoning_text"
    assert reasoning["content"][0]["text"].startswith("plan ") and reasoning["summary"] == []
    assert message["content"][0]["text"].startswith("answer ") and "<think>" not in message["content"][0]["text"]
    assert 0 < resp["usage"]["output_tokens_details"]["reasoning_tokens"] < resp["usage"]["output_tokens"]
    events = _raw_events(base, body)
    types = [e["type"] for e in events if not e["type"].endswith(".delta")]
    assert types == ["response.created", "response.in_progress",
                     "response.output_item.added", "response.content_part.added", "response.reasoning_text.done",
                     "response.content_part.done", "response.output_item.done",
                     "response.output_item.added", "response.content_part.added", "response.output_text.done",
                     "response.content_part.done", "response.output_item.done", "response.completed"]
    thought = "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta")
    assert thought == reasoning["content"][0]["text"]
    _same(events[-1]["response"], resp)
    # a reasoning item in the input (here from the store) goes back to the template as reasoning_content
    follow = client.responses.create(model=NAME, input="ok?", previous_response_id=resp["id"], max_output_tokens=3,
                                     reasoning={"effort": "low"})
    assert follow.status in ("completed", "incomplete") and follow.reasoning.effort == "low"


# ---- images --------------------------------------------------------------------------------------
def test_input_image_data_url_equals_chat(tmp_path, tokenizer_dir):
    from fixtures_vlm import build_llava
    from PIL import Image

    path = build_llava(tmp_path / "llava", tokenizer_dir)
    engine = AsyncEngine(str(path), dtype="f32", num_kv_blocks=64, max_model_len=256, max_num_images=2)
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 90)).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    try:
        with running_server(create_app(engine, ServerOptions(served_model_name=NAME))) as base:
            client = _client(base)
            resp = _create(client, input=[{"role": "user", "content": [
                {"type": "input_text", "text": "What is this?"}, {"type": "input_image", "image_url": url}]}])
            chat = _chat(client, [{"role": "user", "content": [
                {"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": url}}]}])
            assert resp.output_text == chat.choices[0].message.content
            assert resp.usage.input_tokens == chat.usage.prompt_tokens > 16
            with pytest.raises(openai.BadRequestError):
                _create(client, input=[{"role": "user", "content": [
                    {"type": "input_image", "image_url": "data:image/png;base64,aGVsbG8="}]}])
    finally:
        engine.shutdown()
