"""Anthropic's Messages API (/v1/messages, /v1/messages/count_tokens) over a real socket with the
official `anthropic` SDK: the same answers as the OpenAI chat route for the same conversation,
Anthropic's streaming events in order, tools (forced, as a random model never calls one by
itself), thinking blocks (forced with a grammar), images, stop reasons, and errors in Anthropic's
shape while the OpenAI routes keep OpenAI's."""
from __future__ import annotations

import base64
import http.server
import io
import json
import re
import threading
import time

import anthropic
import httpx
import jsonschema
import numpy as np
import openai
import pytest
from fixtures_models import build_checkpoint
from fixtures_server import running_server
from PIL import Image

from mistralpy import AsyncEngine
from mistralpy.server import ServerOptions, create_app

KEY = "test-key"
SYSTEM = [{"type": "text", "text": "You are terse."}, {"type": "text", "text": "Answer in English."}]
TURNS = [{"role": "user", "content": [{"type": "text", "text": "Hello there,"}, {"type": "text", "text": "how are you?"}]},
         {"role": "assistant", "content": "Fine."},
         {"role": "user", "content": "And the weather?"}]
# The same conversation as OpenAI messages (text blocks are joined by newlines, as text parts are).
OPENAI_TURNS = [{"role": "system", "content": "You are terse.\nAnswer in English."},
                {"role": "user", "content": "Hello there,\nhow are you?"},
                {"role": "assistant", "content": "Fine."}, {"role": "user", "content": "And the weather?"}]
EVENT_ORDER = re.compile(r"message_start ping( content_block_start( content_block_delta)+ content_block_stop)*"
                         r" message_delta message_stop")


def _metric(base: str, name: str) -> float:
    for line in httpx.get(base + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def _raw_events(base: str, body: dict, headers: dict | None = None) -> list[tuple[str, dict]]:
    """(SSE event name, data) pairs of a streamed request, read without the SDK."""
    events = []
    with httpx.stream("POST", base + "/v1/messages", json={**body, "stream": True}, timeout=60,
                      headers={"x-api-key": KEY, "anthropic-version": "2023-06-01", **(headers or {})}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[len("data: "):])))
                name = None
    return events


def _blocks(message) -> list[dict]:
    """Content blocks without the random tool-call ids."""
    return [{k: v for k, v in b.model_dump(exclude_none=True).items() if k != "id"} for b in message.content]


# ---- a text model ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_server(tmp_path_factory, tokenizer_dir):
    ckpt = build_checkpoint(tmp_path_factory.mktemp("anthropic_llama"), "llama", tokenizer_dir)
    engine = AsyncEngine(str(ckpt), dtype="f32", num_kv_blocks=160, max_model_len=256, max_seqs=8)
    app = create_app(engine, ServerOptions(served_model_name="tiny", api_key=KEY, log_interval_s=0,
                                           max_body_bytes=100_000))
    with running_server(app) as base:
        yield base, engine
    engine.shutdown()


@pytest.fixture(scope="module")
def claude(text_server):
    return anthropic.Anthropic(base_url=text_server[0], api_key=KEY, max_retries=0, timeout=60)


def _create(client, extra: dict | None = None, **kw):
    # The SDK 2.x has no temperature argument any more: it goes in the body as older clients send it.
    args = {"model": "tiny", "system": SYSTEM, "messages": TURNS, "max_tokens": 8}
    return client.messages.create(**{**args, **kw}, extra_body={"temperature": 0, **(extra or {})})


def test_create_answers_like_the_openai_route(text_server, claude):
    base, _ = text_server
    oai = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=60)
    want = oai.chat.completions.create(model="tiny", messages=OPENAI_TURNS, max_tokens=8, temperature=0,
                                       extra_body={"ignore_eos": True})
    msg = _create(claude, metadata={"user_id": "u1"}, extra={"ignore_eos": True})
    assert msg.id.startswith("msg_") and msg.type == "message" and msg.role == "assistant" and msg.model == "tiny"
    assert [b.type for b in msg.content] == ["text"] and msg.content[0].text == want.choices[0].message.content
    assert msg.stop_reason == "max_tokens" and msg.stop_sequence is None
    assert (msg.usage.input_tokens, msg.usage.output_tokens) == (want.usage.prompt_tokens, 8)
    count = claude.messages.count_tokens(model="tiny", system=SYSTEM, messages=TURNS)
    assert count.input_tokens == msg.usage.input_tokens
    # a plain string system prompt and string content are the same conversation
    same = _create(claude, system="You are terse.\nAnswer in English.", extra={"ignore_eos": True})
    assert same.content[0].text == msg.content[0].text
    paths = httpx.get(base + "/openapi.json").json()["paths"]
    assert {"/v1/messages", "/v1/messages/count_tokens"} <= set(paths)


def test_stream_events_in_anthropic_order(text_server, claude):
    base, _ = text_server
    whole = _create(claude, max_tokens=12, extra={"ignore_eos": True})
    events = _raw_events(base, {"model": "tiny", "system": SYSTEM, "messages": TURNS, "max_tokens": 12,
                                "temperature": 0, "ignore_eos": True})
    assert all(name == data["type"] for name, data in events)  # named events, as Anthropic sends them
    assert EVENT_ORDER.fullmatch(" ".join(name for name, _ in events)), [n for n, _ in events]
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["usage"] == {"input_tokens": whole.usage.input_tokens, "output_tokens": 0}
    text = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta")
    assert text == whole.content[0].text
    assert events[-2][1]["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert events[-2][1]["usage"] == {"output_tokens": 12}
    # the SDK's stream helper accumulates the same message
    with claude.messages.stream(model="tiny", system=SYSTEM, messages=TURNS, max_tokens=12,
                                extra_body={"temperature": 0, "ignore_eos": True}) as stream:
        deltas = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert deltas == text
    assert final.model_dump(exclude={"id"}) == whole.model_dump(exclude={"id"})


def test_stop_sequences_and_prefill(text_server, claude):
    base, engine = text_server
    text = _create(claude, max_tokens=16, extra={"ignore_eos": True}).content[0].text
    stop = text[5:8]
    assert len(stop) == 3 and text.find(stop) > 0, text
    msg = _create(claude, max_tokens=16, stop_sequences=["never-seen", stop], extra={"ignore_eos": True})
    assert (msg.stop_reason, msg.stop_sequence) == ("stop_sequence", stop)
    assert msg.content[0].text == text[:text.find(stop)]
    events = _raw_events(base, {"model": "tiny", "system": SYSTEM, "messages": TURNS, "max_tokens": 16,
                                "temperature": 0, "ignore_eos": True, "stop_sequences": [stop]})
    assert events[-2][1]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": stop}
    # A final assistant turn is a prefill: the answer continues it (the prompt ends with its text).
    prefilled = _create(claude, messages=TURNS + [{"role": "assistant", "content": "Sunny and"}],
                        extra={"ignore_eos": True})
    prompt = engine.engine.render_chat(
        [{"role": "system", "content": "You are terse.\nAnswer in English."}] + OPENAI_TURNS[1:]) + "Sunny and"
    ids = engine.engine.tokenize(prompt, False)
    oai = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=60)
    want = oai.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert prefilled.content[0].text == want.choices[0].text and prefilled.usage.input_tokens == len(ids)
    count = claude.messages.count_tokens(model="tiny", system=SYSTEM,
                                         messages=TURNS + [{"role": "assistant", "content": "Sunny and"}])
    assert count.input_tokens == len(ids)


def test_structured_output(claude):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    msg = _create(claude, max_tokens=40, output_config={"format": {"type": "json_schema", "schema": schema}})
    jsonschema.validate(json.loads(msg.content[0].text), schema)
    assert msg.stop_reason == "end_turn"  # the grammar ends with the object


def test_bad_requests_are_anthropic_errors(text_server, claude):
    base, _ = text_server
    headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
    r = httpx.post(base + "/v1/messages", headers=headers, json={"model": "tiny", "messages": TURNS})
    assert r.status_code == 400 and r.json()["type"] == "error"
    assert r.json()["error"]["type"] == "invalid_request_error" and "max_tokens" in r.json()["error"]["message"]
    r = httpx.post(base + "/v1/messages", headers={**headers, "content-type": "application/json"}, content=b"{nope")
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    hello = [{"role": "user", "content": "hi"}]
    png = base64.b64encode(_png(1)).decode()
    bad = [
        ({"messages": [{"role": "system", "content": "hi"}]}, "role"),
        ({"messages": [{"role": "user", "content": [{"type": "banana", "text": "x"}]}]}, "banana"),
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "text"),
        ({"messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png}}]}]}, "image"),
        ({"messages": [{"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "x"}]}]},
         "tool_result"),
        ({"messages": hello, "tool_choice": {"type": "any"}}, "tool_choice"),
        ({"messages": hello, "tools": [{"name": "t", "input_schema": {"type": "object"}}],
              "tool_choice": {"type": "sometimes"}}, "tool_choice"),
        ({"messages": hello, "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "server tools"),
        ({"messages": hello, "thinking": {"type": "enabled"}}, "budget_tokens"),
        ({"messages": hello, "max_tokens": 0}, "max_tokens"),
        ({"messages": hello, "extra_body": {"temperature": -1.0}}, "temperature"),
        ({"messages": []}, "messages"),
        ({"messages": hello, "output_config": {"effort": "extreme"}}, "effort"),
        ({"messages": hello, "output_config": {"format": {"type": "xml"}}}, "format"),
    ]
    for kwargs, match in bad:
        with pytest.raises(anthropic.BadRequestError) as err:
            claude.messages.create(**{"model": "tiny", "max_tokens": 4, **kwargs})
        body = err.value.body
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error", body
        assert re.search(match, body["error"]["message"], re.IGNORECASE), (match, body)
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.count_tokens(model="tiny", messages=[{"role": "user", "content": [{"type": "banana"}]}])
    with pytest.raises(anthropic.NotFoundError) as err:
        claude.messages.create(model="claude-nope", max_tokens=4, messages=hello)
    assert err.value.body["error"]["type"] == "not_found_error"
    # The key: x-api-key or a Bearer token; a wrong one is 401 in Anthropic's shape here ...
    wrong = anthropic.Anthropic(base_url=base, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as err:
        wrong.messages.create(model="tiny", max_tokens=4, messages=hello)
    assert err.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.AuthenticationError):
        wrong.messages.count_tokens(model="tiny", messages=hello)
    bearer = anthropic.Anthropic(base_url=base, auth_token=KEY, max_retries=0)
    assert bearer.messages.create(model="tiny", max_tokens=2, messages=hello).usage.output_tokens >= 1
    # ... and OpenAI's on the OpenAI routes (x-api-key is accepted there too)
    r = httpx.post(base + "/v1/chat/completions", json={"messages": hello})
    assert r.status_code == 401 and set(r.json()) == {"error"} and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(base + "/v1/chat/completions", headers={"x-api-key": KEY}, json={"messages": "x"})
    assert r.status_code == 400 and set(r.json()) == {"error"}
    r = httpx.post(base + "/v1/messages", headers=headers, json={"model": "tiny", "max_tokens": 4,
                                                                 "messages": [{"role": "user", "content": "x" * 150_000}]})
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"
    # the server keeps serving
    assert _create(claude, max_tokens=3).usage.output_tokens >= 1
    assert httpx.get(base + "/health").json()["status"] == "ok"


def test_engine_failure_is_an_api_error(text_server, claude):
    _base, engine = text_server
    runner = engine.engine.core.runner
    real = runner.execute
    calls = 0

    def flaky(sched):
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("boom")
        return real(sched)

    runner.execute = flaky
    try:
        with pytest.raises(anthropic.InternalServerError) as err:
            _create(claude, max_tokens=10, extra={"ignore_eos": True})
        assert err.value.status_code == 500 and err.value.body["error"]["type"] == "api_error"
        assert "boom" in err.value.body["error"]["message"]
        calls = 0
        # an `event: error` mid-stream
        with pytest.raises(anthropic.APIStatusError, match="boom"), claude.messages.stream(
                model="tiny", messages=TURNS, max_tokens=10, extra_body={"ignore_eos": True}) as stream:
            stream.get_final_message()
    finally:
        runner.execute = real
    assert _create(claude, max_tokens=3).usage.output_tokens >= 1


def test_stream_disconnect_aborts(text_server):
    base, engine = text_server
    runner = engine.engine.core.runner
    real = runner.execute

    def slow(sched):  # 20 ms a step: the request outlives the client on any machine
        time.sleep(0.02)
        return real(sched)

    before = _metric(base, "mistralpy_requests_aborted_total")
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200, "stream": True,
            "ignore_eos": True, "temperature": 0}
    runner.execute = slow
    try:
        with httpx.stream("POST", base + "/v1/messages", json=body, headers={"x-api-key": KEY}, timeout=60) as r:
            for line in r.iter_lines():
                if line == "event: content_block_delta":
                    break  # the client goes away mid-answer
        deadline = time.time() + 20
        while not (_metric(base, "mistralpy_requests_aborted_total") > before
                   and _metric(base, "mistralpy_num_requests_running") == 0):
            assert time.time() < deadline, "the request kept running after its client left"
            time.sleep(0.05)
    finally:
        runner.execute = real
    assert _metric(base, "mistralpy_kv_cache_blocks_free") == _metric(base, "mistralpy_kv_cache_blocks_total")


# ---- tools and thinking: the real Qwen3 tokenizer and chat template ----------------------------
WEATHER = {"name": "get_weather", "description": "Weather in a city", "input_schema": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["c", "f"]},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "unit", "days"], "additionalProperties": False}}
SEARCH = {"name": "search", "description": "Search the web", "input_schema": {
    "type": "object", "properties": {"q": {"type": "string", "maxLength": 12}}, "required": ["q"],
    "additionalProperties": False}}
TOOLS = [WEATHER, SEARCH]
OPENAI_TOOLS = [{"type": "function", "function": {"name": t["name"], "description": t["description"],
                                                  "parameters": t["input_schema"]}} for t in TOOLS]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def qwen_server(tmp_path_factory):
    from assets import qwen3_tokenizer_dir
    from tokenizers import Tokenizer

    tok_dir = qwen3_tokenizer_dir()
    vocab = Tokenizer.from_file(str(tok_dir / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    ckpt = build_checkpoint(tmp_path_factory.mktemp("anthropic_qwen3"), "qwen3", tok_dir, vocab_size=vocab,
                            eos_token_id=151645, head_dim=32)
    engine = AsyncEngine(str(ckpt), dtype="f32", num_kv_blocks=256, max_model_len=1024, max_seqs=8)
    app = create_app(engine, ServerOptions(served_model_name="qwen"))
    with running_server(app) as base:
        yield (base, engine, anthropic.Anthropic(base_url=base, api_key="x", max_retries=0, timeout=120),
               openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=120))
    engine.shutdown()


def test_tool_use_round_trip(qwen_server, monkeypatch):
    base, engine, claude, oai = qwen_server
    greedy = {"temperature": 0}
    kw = {"model": "qwen", "messages": ASK, "tools": TOOLS, "max_tokens": 150, "extra_body": greedy}
    raw = {"model": "qwen", "messages": ASK, "tools": TOOLS, "max_tokens": 150, **greedy}
    msg = claude.messages.create(**kw, tool_choice={"type": "tool", "name": "get_weather"})
    assert msg.stop_reason == "tool_use" and [b.type for b in msg.content] == ["tool_use"]
    call = msg.content[0]
    assert call.name == "get_weather" and call.id
    jsonschema.validate(call.input, WEATHER["input_schema"])
    counted = claude.messages.count_tokens(model="qwen", messages=ASK, tools=TOOLS,
                                           tool_choice={"type": "tool", "name": "get_weather"})
    assert counted.input_tokens == msg.usage.input_tokens  # the tool definitions are in the prompt
    want = oai.chat.completions.create(model="qwen", messages=ASK, tools=OPENAI_TOOLS, max_tokens=150, temperature=0,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert json.loads(want.choices[0].message.tool_calls[0].function.arguments) == call.input
    # streamed: a tool_use block whose input_json_delta pieces join to the same input
    events = _raw_events(base, {**raw, "tool_choice": {"type": "tool", "name": "get_weather"}})
    assert EVENT_ORDER.fullmatch(" ".join(n for n, _ in events))
    assert events[2][1]["content_block"]["type"] == "tool_use" and events[2][1]["content_block"]["input"] == {}
    assert json.loads("".join(d["delta"]["partial_json"] for n, d in events if n == "content_block_delta")) == call.input
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
    with claude.messages.stream(**kw, tool_choice={"type": "tool", "name": "get_weather"}) as stream:
        final = stream.get_final_message()
    assert _blocks(final) == _blocks(msg) and final.stop_reason == "tool_use"
    # any + disable_parallel_tool_use: exactly one call, to one of the tools
    one = claude.messages.create(**kw, tool_choice={"type": "any", "disable_parallel_tool_use": True})
    assert one.stop_reason == "tool_use" and len(one.content) == 1
    jsonschema.validate(one.content[0].input, {t["name"]: t["input_schema"] for t in TOOLS}[one.content[0].name])
    # tool_choice none: the model sees the tools, answers in text
    plain = claude.messages.create(**{**kw, "max_tokens": 6}, tool_choice={"type": "none"})
    assert plain.stop_reason in ("end_turn", "max_tokens") and all(b.type == "text" for b in plain.content)

    # the result continues the conversation, rendered exactly as the OpenAI route renders it
    prompts: list[str] = []
    render = engine.engine.render_chat
    monkeypatch.setattr(engine.engine, "render_chat", lambda *a, **k: prompts.append(render(*a, **k)) or prompts[-1])
    history = ASK + [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in msg.content]},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                                   "content": [{"type": "text", "text": "sunny, 21 C"}]},
                                                  {"type": "text", "text": "Thanks!"}]}]
    follow = claude.messages.create(model="qwen", messages=history, tools=TOOLS, max_tokens=5, extra_body=greedy)
    assert follow.stop_reason in ("end_turn", "max_tokens", "tool_use")
    openai_history = ASK + [
        {"role": "assistant", "content": "", "tool_calls": [{"id": call.id, "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps(call.input)}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}, {"role": "user", "content": "Thanks!"}]
    oai.chat.completions.create(model="qwen", messages=openai_history, tools=OPENAI_TOOLS, max_tokens=5, temperature=0)
    assert len(prompts) == 2 and prompts[0] == prompts[1]
    assert "sunny, 21 C" in prompts[0] and '"city"' in prompts[0] and "Thanks!" in prompts[0]
    errored = [*history[:2], {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": call.id, "content": "city unknown", "is_error": True}]}]
    claude.messages.count_tokens(model="qwen", messages=errored, tools=TOOLS)
    assert "Error: city unknown" in prompts[-1]


def test_thinking_blocks(qwen_server, monkeypatch):
    base, engine, claude, _ = qwen_server
    tok = engine.engine.tokenizer
    think, end = (tok.encode(t, add_special_tokens=False)[0] for t in ("<think>", "</think>"))
    # A random model never thinks by itself: a grammar (our extension field) makes it.
    grammar = {"type": "lark", "value": f'start: <[{think}]> "\\nplan " /[a-z]{{3}}/ "\\n" <[{end}]> '
                                        '"\\n\\nanswer " /[a-z]{3}/'}
    kw = {"model": "qwen", "messages": ASK, "max_tokens": 40, "thinking": {"type": "enabled", "budget_tokens": 1024},
              "extra_body": {"grammar": grammar, "temperature": 0}}
    msg = claude.messages.create(**kw)
    assert [b.type for b in msg.content] == ["thinking", "text"] and msg.stop_reason == "end_turn"
    assert re.fullmatch(r"plan [a-z]{3}", msg.content[0].thinking) and msg.content[0].signature == ""
    assert re.fullmatch(r"answer [a-z]{3}", msg.content[1].text)
    body = {k: v for k, v in kw.items() if k != "extra_body"} | kw["extra_body"]
    events = _raw_events(base, body)
    assert EVENT_ORDER.fullmatch(" ".join(n for n, _ in events))
    starts = [d["content_block"]["type"] for n, d in events if n == "content_block_start"]
    assert starts == ["thinking", "text"]
    kinds = {d["delta"]["type"] for n, d in events if n == "content_block_delta"}
    assert kinds == {"thinking_delta", "text_delta"}
    with claude.messages.stream(**kw) as stream:
        final = stream.get_final_message()
    assert [(b.type, (b.thinking if b.type == "thinking" else b.text).strip()) for b in final.content] == \
        [("thinking", msg.content[0].thinking), ("text", msg.content[1].text)]
    # thinking on / off reaches the template (Qwen3 writes an empty think block when it is off)
    prompts: list[str] = []
    render = engine.engine.render_chat
    monkeypatch.setattr(engine.engine, "render_chat", lambda *a, **k: prompts.append(render(*a, **k)) or prompts[-1])
    off = claude.messages.count_tokens(model="qwen", messages=ASK, thinking={"type": "disabled"})
    on = claude.messages.count_tokens(model="qwen", messages=ASK, thinking={"type": "enabled", "budget_tokens": 2048})
    assert "<think>\n\n</think>" in prompts[0] and "<think>" not in prompts[1]
    assert off.input_tokens > on.input_tokens


# ---- images --------------------------------------------------------------------------------------
def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


class _Images(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = _png(7)
        self.send_response(200 if self.path == "/cat.png" else 404)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def vision_server(tmp_path_factory, tokenizer_dir):
    from fixtures_vlm import build_llava

    images = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    threading.Thread(target=images.serve_forever, daemon=True).start()
    path = build_llava(tmp_path_factory.mktemp("anthropic_llava"), tokenizer_dir)
    engine = AsyncEngine(str(path), dtype="f32", num_kv_blocks=64, max_model_len=256, max_num_images=2)
    app = create_app(engine, ServerOptions(served_model_name="vlm", allowed_media_domains=("localhost",),
                                           max_num_images=2, max_media_bytes=200_000))
    with running_server(app) as base:
        yield (base, f"http://localhost:{images.server_address[1]}",
               anthropic.Anthropic(base_url=base, api_key="x", max_retries=0, timeout=60))
    engine.shutdown()
    images.shutdown()


def _image_turn(source: dict) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": "What is in the picture?"},
                                         {"type": "image", "source": source}]}]


def test_image_blocks(vision_server):
    base, image_base, claude = vision_server
    b64 = base64.b64encode(_png(7)).decode()
    turn = _image_turn({"type": "base64", "media_type": "image/png", "data": b64})
    msg = claude.messages.create(model="vlm", messages=turn, max_tokens=8, extra_body={"temperature": 0})
    oai = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
    want = oai.chat.completions.create(model="vlm", max_tokens=8, temperature=0, messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is in the picture?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64}}]}])
    assert msg.content[0].text == want.choices[0].message.content and msg.content[0].text
    assert msg.usage.input_tokens == want.usage.prompt_tokens
    by_url = claude.messages.create(model="vlm", messages=_image_turn({"type": "url", "url": image_base + "/cat.png"}),
                                    max_tokens=8, extra_body={"temperature": 0})
    assert by_url.content[0].text == msg.content[0].text
    count = claude.messages.count_tokens(model="vlm", messages=turn)
    text_only = claude.messages.count_tokens(model="vlm", messages=[{"role": "user", "content": "What is in the picture?"}])
    assert count.input_tokens == msg.usage.input_tokens >= text_only.input_tokens + 16  # 16 placeholder rows


@pytest.mark.parametrize("source, match", [
    ({"type": "base64", "media_type": "image/png", "data": "not base64!"}, "base64"),
    ({"type": "base64", "media_type": "image/tiff", "data": "aGVsbG8="}, "media_type"),
    ({"type": "base64", "media_type": "image/png", "data": "aGVsbG8="}, "image"),  # "hello": not an image
    ({"type": "base64", "media_type": "image/png", "data": "A" * 400_000}, "large|exceeds|limit"),
    ({"type": "url", "url": "http://127.0.0.1:9/x.png"}, "not in the allowed"),
    ({"type": "url", "url": "file:///etc/passwd"}, "local files"),
    ({"type": "file", "file_id": "f"}, "source"),
])
def test_bad_images_are_400s(vision_server, source, match):
    _, _, claude = vision_server
    with pytest.raises(anthropic.BadRequestError) as err:
        claude.messages.create(model="vlm", messages=_image_turn(source), max_tokens=4)
    body = err.value.body
    assert body["error"]["type"] == "invalid_request_error" and re.search(match, body["error"]["message"], re.IGNORECASE), body
    assert claude.messages.create(model="vlm", messages=ASK, max_tokens=2).usage.output_tokens >= 1
