"""The MCP server (mistralpy/server/mcp_server.py) driven by the official SDK's client over a real
socket: /mcp on the main port (API key on), the tools' answers equal to the HTTP routes' greedy
ones, the spec's errors, raw JSON-RPC (202 for notifications, 401 without the key), and
``mistralpy serve --mcp-port`` as a real process with both ports."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from fixtures_models import build_checkpoint
from fixtures_server import free_port, running_server
from mcp import ClientSession, types
from mcp.client.streamable_http import streamablehttp_client
from mcp.shared.exceptions import McpError

from mistralpy import AsyncEngine
from mistralpy.server import ServerOptions, create_app
from mistralpy.server.mcp_server import chat_content

KEY = "mcp-key"
NAME = "tiny"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = [{"role": "user", "content": "Hello there, how are you?"}]
MCP_ACCEPT = {"accept": "application/json, text/event-stream", "content-type": "application/json"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer_dir):
    return build_checkpoint(tmp_path_factory.mktemp("mcp_server"), "llama", tokenizer_dir)


@pytest.fixture(scope="module")
def base(ckpt):
    engine = AsyncEngine(str(ckpt), dtype="f32", num_kv_blocks=128, max_model_len=256, max_seqs=8)
    app = create_app(engine, ServerOptions(served_model_name=NAME, api_key=KEY, log_interval_s=0,
                                           cors_origins=("http://ok.test",)))
    with running_server(app) as url:
        yield url
    engine.shutdown()


def with_session(url: str, fn: Callable[[ClientSession], Awaitable[Any]], headers: dict | None = None) -> Any:
    """Run ``fn(session)`` in a fresh, initialized SDK client session on ``url``."""
    async def main() -> Any:
        async with (streamablehttp_client(url, headers=AUTH if headers is None else headers, timeout=60) as (r, w, _),
                    ClientSession(r, w) as session):
            init = await session.initialize()
            assert init.serverInfo.name == "mistralpy" and init.capabilities.tools is not None
            return await fn(session)

    return asyncio.run(main())


def _post(url: str, body: dict, headers: dict | None = None) -> httpx.Response:
    return httpx.post(url, json=body, headers={**MCP_ACCEPT, **(headers or {})}, timeout=30)


def _sse_json(resp: httpx.Response) -> dict:
    """The JSON-RPC message of a POST's answer (SSE or plain JSON)."""
    if resp.headers["content-type"].startswith("application/json"):
        return resp.json()
    data = [line[5:].strip() for line in resp.text.splitlines() if line.startswith("data:") and line[5:].strip()]
    return json.loads(data[-1])


INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}}


# ---- the tools ------------------------------------------------------------------------------------
def test_tools_answer_like_the_http_routes(base):
    http_chat = httpx.post(base + "/v1/chat/completions", headers=AUTH, timeout=60, json={
        "model": NAME, "messages": CHAT, "max_tokens": 8, "temperature": 0, "ignore_eos": True}).json()
    http_text = httpx.post(base + "/v1/completions", headers=AUTH, timeout=60, json={
        "prompt": "Once upon a time", "max_tokens": 6, "temperature": 0, "ignore_eos": True}).json()
    expected = http_chat["choices"][0]["message"]["content"]
    assert expected and http_text["choices"][0]["text"]

    async def calls(session: ClientSession) -> tuple:
        tools = (await session.list_tools()).tools
        chat = await session.call_tool("chat", {"model": NAME, "messages": CHAT, "max_tokens": 8, "temperature": 0,
                                                "ignore_eos": True})
        done = await session.call_tool("complete", {"prompt": "Once upon a time", "max_tokens": 6,
                                                    "temperature": 0, "ignore_eos": True})
        models = await session.call_tool("list_models", {})
        return tools, chat, done, models

    tools, chat, done, models = with_session(base + "/mcp", calls)
    by_name = {t.name: t for t in tools}
    assert set(by_name) == {"chat", "complete", "list_models"}
    chat_schema = by_name["chat"].inputSchema
    assert chat_schema["required"] == ["messages"] and chat_schema["additionalProperties"] is False
    assert {"messages", "model", "max_tokens", "temperature", "tools", "tool_choice", "top_k"} <= set(
        chat_schema["properties"])
    assert "stream" not in chat_schema["properties"] and "$defs" not in json.dumps(chat_schema)
    assert NAME in chat_schema["properties"]["model"]["description"]
    assert by_name["complete"].inputSchema["required"] == ["prompt"]
    assert by_name["list_models"].inputSchema["properties"] == {}

    assert not chat.isError
    assert chat.content[0].type == "text" and chat.content[0].text == expected
    sc = chat.structuredContent
    assert sc["object"] == "chat.completion" and sc["model"] == NAME and sc["usage"]["completion_tokens"] == 8
    assert sc["choices"][0]["message"]["content"] == expected
    assert not done.isError and done.content[0].text == http_text["choices"][0]["text"]
    assert done.structuredContent["object"] == "text_completion"
    assert not models.isError
    assert models.structuredContent["data"][0]["id"] == NAME and models.structuredContent["data"][0]["default"]
    assert NAME in models.content[0].text


def test_chat_content_has_reasoning_and_tool_calls():
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}
    blocks = chat_content({"choices": [{"index": 0, "message": {
        "role": "assistant", "content": None, "reasoning_content": "think hard", "tool_calls": [call]}}]})
    assert [b.text.split("\n")[0] for b in blocks] == ["", "Reasoning:", "Tool calls:"]
    assert [b.meta["mistralpy/part"] for b in blocks] == ["answer", "reasoning", "tool_calls"]
    assert "think hard" in blocks[1].text
    assert json.loads(blocks[2].text.split("\n", 1)[1]) == [
        {"id": "call_1", "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}]
    two = chat_content({"choices": [{"index": i, "message": {"content": f"a{i}"}} for i in range(2)]})
    assert [b.text for b in two] == ["[choice 0] a0", "[choice 1] a1"]


def test_chat_tool_calls_and_reasoning_end_to_end(tmp_path):
    """Qwen3's real template and parsers: a forced tool call and a grammar-forced reasoning come back
    as their own text blocks and in the structured chat.completion, as the HTTP route answers them."""
    from assets import qwen3_tokenizer_dir
    from tokenizers import Tokenizer

    tok_dir = qwen3_tokenizer_dir()
    vocab = Tokenizer.from_file(str(tok_dir / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    ckpt = build_checkpoint(tmp_path / "qwen3", "qwen3", tok_dir, vocab_size=vocab, eos_token_id=151645, head_dim=32)
    engine = AsyncEngine(str(ckpt), dtype="f32", num_kv_blocks=64, max_model_len=512, max_seqs=4)
    think, end = (engine.engine.tokenizer.encode(t, add_special_tokens=False) for t in ("<think>", "</think>"))
    search = {"type": "function", "function": {"name": "search", "parameters": {
        "type": "object", "properties": {"q": {"type": "string", "maxLength": 8}}, "required": ["q"]}}}
    forced = {"messages": CHAT, "tools": [search], "tool_choice": {"type": "function", "function": {"name": "search"}},
              "temperature": 1.0, "seed": 3, "max_tokens": 40}
    reasoned = {"messages": CHAT, "temperature": 1.0, "seed": 1, "max_tokens": 40, "grammar": {
        "type": "lark", "value": f'start: <[{think[0]}]> "\\nplan " /[a-z]{{3}}/ "\\n" <[{end[0]}]> "\\n\\nok"'}}
    try:
        with running_server(create_app(engine, ServerOptions(log_interval_s=0))) as url:
            http_call = httpx.post(url + "/v1/chat/completions", json=forced, timeout=60).json()
            http_think = httpx.post(url + "/v1/chat/completions", json=reasoned, timeout=60).json()

            async def calls(session: ClientSession) -> tuple:
                return await session.call_tool("chat", forced), await session.call_tool("chat", reasoned)

            called, thought = with_session(url + "/mcp", calls)
    finally:
        engine.shutdown()
    want = http_call["choices"][0]["message"]["tool_calls"]
    got = called.structuredContent["choices"][0]["message"]["tool_calls"]
    assert [c["function"] for c in got] == [c["function"] for c in want] and want[0]["function"]["name"] == "search"
    assert called.structuredContent["choices"][0]["finish_reason"] == "tool_calls"
    parts = {b.meta["mistralpy/part"]: b.text for b in called.content}
    assert json.loads(parts["tool_calls"].split("\n", 1)[1])[0]["arguments"] == want[0]["function"]["arguments"]
    want_msg = http_think["choices"][0]["message"]
    assert want_msg["reasoning_content"].startswith("plan ")
    parts = {b.meta["mistralpy/part"]: b.text for b in thought.content}
    assert parts["reasoning"] == "Reasoning:\n" + want_msg["reasoning_content"]
    assert parts["answer"] == want_msg["content"] == thought.structuredContent["choices"][0]["message"]["content"]


def test_bad_arguments_and_unknown_tool(base):
    async def calls(session: ClientSession) -> list:
        results = [await session.call_tool("chat", args) for args in (
            {},                                                        # messages missing (schema)
            {"messages": CHAT, "max_tokenz": 3},                       # misspelt field (schema)
            {"messages": "hello"},                                     # wrong type (schema)
            {"messages": CHAT, "model": "nope", "max_tokens": 2},      # unknown model (route: 404)
            {"messages": CHAT, "max_tokens": 10_000},                  # too long for the context (route)
        )]
        results.append(await session.call_tool("complete", {"prompt": []}))  # empty prompt list (schema: minItems)
        with pytest.raises(McpError) as err:
            await session.call_tool("no_such_tool", {})
        results.append(err.value.error)
        # the session still works after all that
        results.append(await session.call_tool("chat", {"messages": CHAT, "max_tokens": 2}))
        return results

    *bad, unknown, ok = with_session(base + "/mcp", calls)
    for result in bad:
        assert result.isError and result.content[0].type == "text", result
    assert "messages" in bad[0].content[0].text and "max_tokenz" in bad[1].content[0].text
    assert bad[3].structuredContent["error"]["type"] == "not_found_error" and "nope" in bad[3].content[0].text
    assert "error 400" in bad[4].content[0].text and "not valid" in bad[5].content[0].text
    assert unknown.code == types.INVALID_PARAMS and "no_such_tool" in unknown.message
    assert not ok.isError and ok.structuredContent["usage"]["completion_tokens"] >= 1


# ---- transport, auth, raw JSON-RPC ------------------------------------------------------------------
def test_api_key_and_raw_jsonrpc(base):
    url = base + "/mcp"
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = _post(url, INIT, headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", r.text
    with pytest.raises(ExceptionGroup) as group:  # the SDK client gets the 401 too
        with_session(url, lambda s: s.list_tools(), headers={})
    assert "401" in str(group.value.exceptions[0])
    # the key as x-api-key works as on every route; a trailing slash too
    r = _post(url + "/", INIT, {"x-api-key": KEY})
    assert r.status_code == 200 and _sse_json(r)["result"]["serverInfo"]["name"] == "mistralpy"
    sid = r.headers["mcp-session-id"]
    session = {**AUTH, "mcp-session-id": sid, "mcp-protocol-version": "2025-06-18"}
    r = _post(url, {"jsonrpc": "2.0", "method": "notifications/initialized"}, session)
    assert r.status_code == 202 and not r.content
    r = _post(url, {"jsonrpc": "2.0", "id": 2, "method": "no/such/method"}, session)
    assert _sse_json(r)["error"]["code"] == types.METHOD_NOT_FOUND
    r = _post(url, {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "list_models",
                                                                                 "arguments": {}}}, session)
    assert _sse_json(r)["result"]["structuredContent"]["data"][0]["id"] == NAME
    r = httpx.post(url, content=b"{not json", headers={**MCP_ACCEPT, **session})
    assert r.status_code == 400 and r.json()["error"]["code"] == types.PARSE_ERROR
    # browsers: an Origin outside --cors-origins is refused (DNS rebinding), an allowed one passes
    assert _post(url, INIT, {**AUTH, "origin": "http://evil.test"}).status_code == 403
    assert _post(url, INIT, {**AUTH, "origin": "http://ok.test"}).status_code == 200
    assert httpx.delete(url, headers=session).status_code in (200, 204)  # the client ends its session
    # /mcp is counted in /metrics under its own label
    assert 'endpoint="/mcp"' in httpx.get(base + "/metrics").text


def _gauge(base: str, suffix: str) -> float:
    lines = [l for l in httpx.get(base + "/metrics").text.splitlines() if l.split(" ")[0].endswith(suffix)]
    return float(lines[0].rsplit(" ", 1)[1])


def test_cancelled_call_aborts_the_generation(base):
    """notifications/cancelled stops the engine request at once (its KV blocks freed), as a
    disconnect does on the HTTP routes."""
    url = base + "/mcp"
    r = _post(url, INIT, AUTH)
    session = {**AUTH, "mcp-session-id": r.headers["mcp-session-id"], "mcp-protocol-version": "2025-06-18"}
    assert _post(url, {"jsonrpc": "2.0", "method": "notifications/initialized"}, session).status_code == 202
    aborted = _gauge(base, "requests_aborted_total")
    call = {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "chat", "arguments": {
        "messages": CHAT, "max_tokens": 230, "ignore_eos": True}}}
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(_post, url, call, session)
        deadline = time.time() + 20
        while _gauge(base, "requests_in_flight") < 1:
            assert time.time() < deadline and not pending.done(), "the call never started"
            time.sleep(0.02)
        cancel = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 7, "reason": "x"}}
        assert _post(url, cancel, session).status_code == 202
        pending.result(timeout=20)
    deadline = time.time() + 10
    while _gauge(base, "requests_in_flight") > 0:
        assert time.time() < deadline, "the generation kept running"
        time.sleep(0.02)
    assert _gauge(base, "requests_aborted_total") == aborted + 1


# ---- mistralpy serve --mcp-port ----------------------------------------------------------------------
def test_serve_mcp_port(ckpt, tmp_path):
    port, mcp_port = free_port(), free_port()
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mistralpy.cli.main", "serve", "-m", str(ckpt), "--port", str(port), "--mcp-port",
             str(mcp_port), "--dtype", "f32", "--num-kv-blocks", "64", "--max-model-len", "256",
             "--served-model-name", NAME, "--api-key", KEY, "--log-interval", "0"],
            stdout=log_file, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "server did not come up"
            time.sleep(0.2)
        mcp_url = f"http://127.0.0.1:{mcp_port}/mcp"
        assert _post(mcp_url, INIT).status_code == 401  # the key guards the MCP port too

        async def calls(session: ClientSession) -> tuple:
            return (await session.call_tool("list_models", {}),
                    await session.call_tool("chat", {"messages": CHAT, "max_tokens": 4, "temperature": 0}))

        models, chat = with_session(mcp_url, calls)
        assert models.structuredContent["data"][0]["id"] == NAME
        assert not chat.isError and chat.structuredContent["usage"]["completion_tokens"] >= 1
        # the same answer on the main port's /mcp
        again = with_session(f"http://127.0.0.1:{port}/mcp", lambda s: s.call_tool(
            "chat", {"messages": CHAT, "max_tokens": 4, "temperature": 0}))
        assert again.content[0].text == chat.content[0].text
        assert httpx.get(f"http://127.0.0.1:{mcp_port}/v1/models", headers=AUTH).status_code == 404  # MCP only
        proc.send_signal(signal.SIGINT)  # both servers stop together and the process ends cleanly
        assert proc.wait(timeout=30) == 0, log_path.read_text()
        assert "Traceback" not in log_path.read_text()  # sessions ended and the servers stopped quietly
        for p in (port, mcp_port):
            with pytest.raises(httpx.TransportError):
                httpx.get(f"http://127.0.0.1:{p}/health", timeout=1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
