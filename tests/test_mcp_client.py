"""The MCP client (mistralpy/mcp) against real servers on the official SDK: the test server
(tests/mcp_servers/tool_server.py, FastMCP) over stdio, streamable HTTP and WebSocket, and the
npm filesystem server through ``npx -y``; then a tiny model forced to call MCP tools through
Engine.chat, whose next round's prompt must carry the tool's real output.

Failure modes: a server that never starts, one that exits mid-call, one that hangs (timeout),
one that answers isError: the call gets an error result and everything else keeps working."""
from __future__ import annotations

import asyncio
import json
import time

import pytest
from fixtures_mcp import SECRET, alive, network_servers, npm_filesystem_source, pids, stdio_source

from mistralpy.mcp import McpClient, McpConfigError, load_config, parse_config
from mistralpy.mcp.results import McpToolResult

# mistral.rs's examples/mcp-config-reference.json, verbatim (comments, nulls and all)
MISTRALRS_REFERENCE = """{
  "_comment": "MCP Client Configuration Reference for mistral.rs",
  "servers": [
    {"_comment": "HTTP/HTTPS Server Example - Hugging Face MCP", "id": "http_server", "name": "Hugging Face MCP",
     "source": {"type": "Http", "url": "https://hf.co/mcp", "timeout_secs": 30,
                "headers": {"User-Agent": "mistral-rs/0.6.0"}},
     "enabled": false, "tool_prefix": "hf", "resources": null, "bearer_token": "hf_xxx"},
    {"_comment": "Local Process Server Example - Filesystem (Default)", "id": "process_server",
     "name": "Filesystem Tools",
     "source": {"type": "Process", "command": "npx", "args": ["@modelcontextprotocol/server-filesystem", "."],
                "work_dir": null, "env": {"LOG_LEVEL": "info"}},
     "enabled": true, "tool_prefix": "fs", "resources": ["file://**"], "bearer_token": null},
    {"_comment": "WebSocket Server Example", "id": "websocket_server", "name": "WebSocket MCP Server",
     "source": {"type": "WebSocket", "url": "wss://api.example.com/mcp", "timeout_secs": 30,
                "headers": {"Origin": "https://mistral.rs"}},
     "enabled": false, "tool_prefix": "ws", "resources": null, "bearer_token": "your-websocket-token"}
  ],
  "_comment_defaults": "Global settings with recommended defaults:",
  "auto_register_tools": true, "tool_timeout_secs": 30, "max_concurrent_calls": 5
}"""


# ---- configuration ---------------------------------------------------------------------------------
def test_mistralrs_config_files_load_unchanged(tmp_path, caplog):
    path = tmp_path / "mcp.json"
    path.write_text(MISTRALRS_REFERENCE)
    cfg = load_config(str(path))
    assert [s.source.type for s in cfg.servers] == ["Http", "Process", "WebSocket"]
    hf, fs, ws = cfg.servers
    assert (hf.id, hf.name, hf.enabled, hf.prefix, hf.bearer_token) == ("http_server", "Hugging Face MCP", False,
                                                                        "hf", "hf_xxx")
    assert hf.source.headers == {"User-Agent": "mistral-rs/0.6.0"} and hf.source.timeout_secs == 30
    assert fs.source.command == "npx" and fs.source.args == ("@modelcontextprotocol/server-filesystem", ".")
    assert fs.source.env == {"LOG_LEVEL": "info"} and fs.source.work_dir is None and fs.resources == ("file://**",)
    assert ws.source.url == "wss://api.example.com/mcp"
    assert cfg.enabled_servers == [fs] and cfg.max_concurrent_calls == 5 and cfg.tool_timeout_secs == 30
    assert "unknown key" not in caplog.text  # the _comment keys are not even worth a warning
    # the schema page's minimal entry: defaults, and the prefix is the (sanitized) name
    cfg = parse_config({"servers": [{"name": "Git Hub", "source": {"type": "Http", "url": "http://x/mcp"}}],
                        "auto_register_tools": True})
    assert (cfg.tool_timeout_secs, cfg.max_concurrent_calls, cfg.servers[0].prefix, cfg.servers[0].id) == \
        (30.0, 10, "Git_Hub", "Git Hub")


def test_mistralrs_python_classes():
    from mistralpy import McpClientConfigPy, McpServerConfigPy, McpServerSourcePy

    src = McpServerSourcePy.Process(command="npx", args=["-y", "pkg", "."], work_dir=None, env=None)
    assert isinstance(src, McpServerSourcePy)
    py = McpClientConfigPy(servers=[
        McpServerConfigPy(id="filesystem", name="Filesystem Tools", source=src),
        McpServerConfigPy(id="hf", name="HF", source=McpServerSourcePy.Http("https://hf.co/mcp", 30, None),
                          bearer_token="t", tool_prefix="hf"),
        McpServerConfigPy(id="w", name="W", source=McpServerSourcePy.WebSocket("wss://h/ws", None, None),
                          enabled=False)])
    cfg = load_config(py)
    assert [s.source.type for s in cfg.servers] == ["Process", "Http", "WebSocket"]
    assert cfg.servers[0].prefix == "Filesystem_Tools" and cfg.servers[1].bearer_token == "t"
    assert cfg.tool_timeout_secs == 30 and cfg.max_concurrent_calls == 10 and cfg.auto_register_tools
    with pytest.raises(McpConfigError) as err:
        McpClientConfigPy(servers=[McpServerConfigPy(id="a", name="a", source=McpServerSourcePy.Http(
            "ftp://x", None, None))]).to_config()
    assert err.value.field == "servers[0].source.url"


@pytest.mark.parametrize("config, field", [
    ({"servers": {}}, "servers"),
    ({"servers": [{"name": "a", "source": {"type": "Pipe"}}]}, "servers[0].source.type"),
    ({"servers": [{"name": "a", "source": {"type": "Process"}}]}, "servers[0].source.command"),
    ({"servers": [{"name": "a", "source": {"type": "Process", "command": "x", "args": "y"}}]},
     "servers[0].source.args"),
    ({"servers": [{"name": "a", "source": {"type": "Process", "command": "x", "env": {"K": 1}}}]},
     "servers[0].source.env"),
    ({"servers": [{"name": "a", "source": {"type": "Http", "url": "localhost:80"}}]}, "servers[0].source.url"),
    ({"servers": [{"name": "a", "source": {"type": "Http", "url": "http://h", "timeout_secs": 0}}]},
     "servers[0].source.timeout_secs"),
    ({"servers": [{"name": "a", "enabled": "yes", "source": {"type": "Http", "url": "http://h"}}]},
     "servers[0].enabled"),
    ({"servers": [{"source": {"type": "Http", "url": "http://h"}}]}, "servers[0].name"),
    ({"servers": [{"name": "a"}]}, "servers[0].source"),
    ({"servers": [{"name": "a", "source": {"type": "Http", "url": "http://h"}},
                  {"name": "a", "source": {"type": "Http", "url": "http://g"}}]}, "servers[1].id"),
    ({"servers": [], "tool_timeout_secs": -1}, "tool_timeout_secs"),
    ({"servers": [], "max_concurrent_calls": 2.5}, "max_concurrent_calls"),
    ({"servers": [], "auto_register_tools": "true"}, "auto_register_tools"),
])
def test_bad_config_fields_are_named(config, field):
    with pytest.raises(McpConfigError) as err:
        parse_config(config)
    assert err.value.field == field and field.split(".")[-1].split("[")[0] in str(err.value)


def test_bad_config_files(tmp_path):
    with pytest.raises(McpConfigError, match="not found"):
        load_config(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{servers: [")
    with pytest.raises(McpConfigError, match="not valid JSON"):
        load_config(str(tmp_path / "bad.json"))
    with pytest.raises(McpConfigError):
        load_config(42)


def test_cli_and_environment(tmp_path, monkeypatch):
    from mistralpy.cli.main import build_parser, engine_kwargs
    from mistralpy.engine.llm_engine import _mcp_config

    path = tmp_path / "mcp.json"
    path.write_text(json.dumps({"servers": [{"name": "py", "source": stdio_source()}]}))
    for command in ("run", "serve"):
        args = build_parser().parse_args([command, "-m", "x", "--mcp-config", str(path)])
        assert engine_kwargs(args)["mcp_config"] == str(path)
    monkeypatch.delenv("MCP_CONFIG_PATH", raising=False)
    assert _mcp_config(None) is None
    monkeypatch.setenv("MCP_CONFIG_PATH", str(path))
    assert _mcp_config(None).servers[0].name == "py"
    assert _mcp_config(False) is None  # explicitly off, whatever the environment says


# ---- the client against live servers ------------------------------------------------------------------
@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """One client on: py (stdio), web (streamable HTTP + bearer token), webx (streamable HTTP,
    killed by a test), ws (WebSocket through the SDK's client) and wsb (the same with a bearer
    token: our header-sending transport), sse (HTTP+SSE), crashy (stdio, crashed by a test), two
    that never start, and a disabled one."""
    pidfile = tmp_path_factory.mktemp("mcp") / "pids"  # the client's child processes write their pids here
    with network_servers("all", "http") as (urls, webx_urls):
        http_url, ws_url, sse_url, httpx_url = urls["http"], urls["ws"], urls["sse"], webx_urls["http"]
        cfg = parse_config({"servers": [
            {"name": "py", "source": stdio_source("py", pidfile), "resources": ["note://*"]},
            {"name": "web", "tool_prefix": "web", "bearer_token": "tok-123", "resources": ["file://**"],
             "source": {"type": "Http", "url": http_url, "headers": {"X-Test": "1"}, "timeout_secs": 10}},
            {"name": "webx", "source": {"type": "Http", "url": httpx_url}},
            {"id": "ws", "name": "WebSocket server", "tool_prefix": "wsk",
             "source": {"type": "WebSocket", "url": ws_url}},
            {"name": "wsb", "bearer_token": "tok-ws", "source": {"type": "WebSocket", "url": ws_url,
                                                                 "headers": {"X-Test": "2"}}},
            {"name": "sse", "source": {"type": "Sse", "url": sse_url}},
            {"name": "crashy", "source": stdio_source("crashy", pidfile)},
            {"name": "ghost", "source": {"type": "Process", "command": "/nonexistent/mcp-server"}},
            {"name": "dead", "source": {"type": "Process", "command": "python3", "args": ["-c", "exit(3)"]}},
            {"name": "off", "enabled": False, "source": stdio_source("off", pidfile)},
        ], "tool_timeout_secs": 2, "max_concurrent_calls": 2})
        client = McpClient(cfg, backoff_initial_s=0.2, backoff_max_s=1.0, connect_timeout_s=30).start()
        try:
            yield client, pidfile
        finally:
            client.close()


@pytest.fixture(scope="module")
def network_urls(live):
    """The live fixture's servers' URLs (HTTP, SSE, WebSocket of one process)."""
    return {s.key: s.source.url for s in live[0].config.servers if hasattr(s.source, "url")}


def _status(client):
    return {s["id"]: s for s in client.status()}


def test_tools_registered_with_whole_schemas(live):
    client, _ = live
    status = _status(client)
    up = ["py", "web", "webx", "ws", "wsb", "sse", "crashy"]
    assert set(status) == {*up, "ghost", "dead"}  # "off" is disabled
    assert [status[k]["connected"] for k in (*up, "ghost", "dead")] == [True] * len(up) + [False] * 2
    assert "FileNotFoundError" in status["ghost"]["last_error"] and status["dead"]["last_error"]
    defs = {d["function"]["name"]: d["function"] for d in client.tool_definitions()}
    for prefix in ("py", "web", "webx", "wsk", "wsb", "sse", "crashy"):
        assert {f"{prefix}_echo", f"{prefix}_configure", f"{prefix}_secret"} <= set(defs)
    assert not any(n.startswith(("ghost_", "dead_", "off_")) for n in defs)
    conf = defs["py_configure"]
    assert conf["strict"] is True and conf["description"] == "Apply settings (nested object schema)."
    params = conf["parameters"]
    assert params["required"] == ["settings"] and params["properties"]["dry_run"]["type"] == "boolean"
    settings = params["$defs"]["Settings"]
    assert settings["required"] == ["label", "limits"] and settings["properties"]["tags"]["items"] == {"type": "string"}
    assert params["$defs"]["Limits"]["properties"]["low"]["minimum"] == 0
    # strict: objects are closed for the model (OpenAI's strict rule); the server's schema is kept as it is
    assert params["additionalProperties"] is False and settings["additionalProperties"] is False
    tool = next(t for t in client.tools() if t.name == "py_configure")
    assert "additionalProperties" not in tool.input_schema and tool.input_schema["$defs"]["Settings"] == {
        k: v for k, v in settings.items() if k != "additionalProperties"}


def test_calls_over_every_transport(live):
    client, _ = live
    for prefix in ("py", "web", "wsk", "wsb", "sse"):
        res = client.call_tool_sync(f"{prefix}_echo", {"text": "hi"})
        assert res == McpToolResult(False, [{"type": "text", "text": "echo: hi"}], {"result": "echo: hi"})
    assert client.call_tool_sync("web_whoami").text() == "Bearer tok-123"  # bearer_token became the header
    res = client.call_tool_sync("py_add", '{"a": 2, "b": 40}')  # JSON text arguments too
    assert res.structured == {"result": 42} and res.text() == "42"
    res = client.call_tool_sync("py_configure", {"settings": {"label": "x", "limits": {"low": 1, "high": 2}}})
    assert res.text() == "configured x 1..2 dry=False"


def test_error_results(live):
    client, _ = live
    res = client.call_tool_sync("py_fail")
    assert res.is_error and "failed on purpose" in res.text() and res.text().startswith("error: ")
    res = client.call_tool_sync("py_configure", {"settings": {"label": "x", "limits": {"low": -1, "high": 2}}})
    assert res.is_error and "invalid arguments" in res.text() and "minimum" in res.text()
    assert "unknown MCP tool" in client.call_tool_sync("nope_echo", {}).text()
    res = client.call_tool_sync("py_echo", "[1, 2]")
    assert res.is_error and "JSON object" in res.text()


def test_images_are_kept(live):
    client, _ = live
    res = client.call_tool_sync("py_picture")
    (img,) = res.images
    assert img["mime_type"] == "image/png" and img["data"].startswith("iVBORw0KGgo")
    assert res.message_content(vision=False).startswith("[image: image/png, ")  # a note for text models
    parts = res.message_content(vision=True)
    assert parts[1] == {"type": "image_url", "image_url": {"url": "data:image/png;base64," + img["data"]}}


def test_timeout_and_concurrency_limit(live):
    client, _ = live
    start = time.monotonic()
    res = client.call_tool_sync("py_stall")
    took = time.monotonic() - start
    assert res.is_error and "timed out after 2 s" in res.text() and 1.9 < took < 5
    assert client.call_tool_sync("py_echo", {"text": "still here"}).text() == "echo: still here"

    # max_concurrent_calls = 2: four 0.6 s calls take two turns; async calls from another event loop
    async def four():
        return await asyncio.gather(*(client.call_tool("web_hang", {"seconds": 0.6}) for _ in range(4)))

    start = time.monotonic()
    results = asyncio.run(four())
    took = time.monotonic() - start
    assert [r.text() for r in results] == ["woke up"] * 4 and 1.15 < took < 3.0


def test_tool_list_changes_and_resources(live):
    client, _ = live
    assert not client.has_tool("py_extra")
    assert client.call_tool_sync("py_grow").text() == "grown"
    deadline = time.monotonic() + 10  # the client lists the tools again on notifications/tools/list_changed
    while not client.has_tool("py_extra") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.call_tool_sync("py_extra").text() == "extra!"

    async def resources():
        return await client.list_resources(), await client.read_resource("note://greeting", server="sse")

    listed, contents = asyncio.run(resources())
    servers = {r["server"] for r in listed if r["uri"] == "note://greeting"}
    assert "py" in servers and "sse" in servers and "web" not in servers  # web allows file://** only
    assert contents == [{"uri": "note://greeting", "mime_type": "text/plain", "text": "hello from all"}]


def test_http_server_dying_mid_call(live):
    """An HTTP server killed during a call: the call fails soon (not at its timeout), the rest works."""
    client, _ = live
    start = time.monotonic()
    res = client.call_tool_sync("webx_crash", timeout_s=30)
    assert res.is_error and "closed the connection" in res.text() and time.monotonic() - start < 15
    assert not _status(client)["webx"]["connected"] and "webx_echo" not in {t.name for t in client.tools()}
    assert "unavailable" in client.call_tool_sync("webx_echo", {"text": "x"}).text()
    assert client.call_tool_sync("web_echo", {"text": "y"}).text() == "echo: y"


def test_server_exiting_mid_call_reconnects(live):
    client, _ = live
    before = _status(client)["crashy"]["connects"]
    res = client.call_tool_sync("crashy_crash")
    assert res.is_error and "closed the connection" in res.text()
    # the others do not notice
    assert client.call_tool_sync("py_echo", {"text": "a"}).text() == "echo: a"
    assert client.call_tool_sync("web_echo", {"text": "b"}).text() == "echo: b"
    # meanwhile its tools are unavailable, then it comes back (backoff 0.2 s)
    unavailable = client.call_tool_sync("crashy_echo", {"text": "c"})
    assert unavailable.is_error and "unavailable" in unavailable.text()
    assert "crashy_echo" not in {d["function"]["name"] for d in client.tool_definitions()}
    deadline = time.monotonic() + 20
    while not _status(client)["crashy"]["connected"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _status(client)["crashy"]["connects"] == before + 1
    assert client.call_tool_sync("crashy_echo", {"text": "c"}).text() == "echo: c"


def test_close_ends_every_server_process(live):
    """Last of the live tests: closing the client ends every child process (crashy's two included)."""
    client, pidfile = live
    started = pids(pidfile)
    assert len(started) == 3 and sum(alive(p) for p in started) == 2  # py, crashy (crashed), crashy again
    client.close()
    assert not any(alive(p) for p in started) and not client._thread.is_alive()
    assert "shut down" in client.call_tool_sync("py_echo", {"text": "late"}).text()
    client.close()  # idempotent


def test_npm_filesystem_server(tmp_path):
    """@modelcontextprotocol/server-filesystem through npx -y, listing and reading a folder."""
    (tmp_path / "notes.txt").write_text("the quick brown fox\n")
    (tmp_path / "sub").mkdir()
    source = npm_filesystem_source(tmp_path)
    if source is None:
        pytest.skip("npx is not installed")
    cfg = parse_config({"servers": [{"name": "filesystem", "tool_prefix": "fs", "source": source}]})
    with McpClient(cfg, connect_timeout_s=120) as client:
        (status,) = client.status()
        if not status["connected"]:
            pytest.skip(f"npx could not start {source['args'][1]}: {status['last_error']}")
        names = {t.name for t in client.tools()}
        assert {"fs_list_directory", "fs_read_text_file", "fs_list_allowed_directories"} <= names
        listing = client.call_tool_sync("fs_list_directory", {"path": str(tmp_path)}).text()
        assert "[FILE] notes.txt" in listing and "[DIR] sub" in listing
        assert client.call_tool_sync("fs_read_text_file", {"path": str(tmp_path / "notes.txt")}).text() == \
            "the quick brown fox\n"
        outside = client.call_tool_sync("fs_read_text_file", {"path": "/etc/hostname"})
        assert outside.is_error and "denied" in outside.text().lower()


# ---- through the engine: a tiny model forced to call MCP tools ------------------------------------------
ASK = [{"role": "user", "content": "Tell me the secret."}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"],
        "additionalProperties": False}}}


def _named(name: str) -> dict:
    return {"type": "function", "function": {"name": name}}


# <|im_end|> pushed up: a forced call ends as soon as its grammar allows, and the answer round is
# one token, so each request is quick; what is tested is the rounds around the model.
QUICK = {"temperature": 1.0, "max_tokens": 40, "max_tool_rounds": 1, "logit_bias": {2: 30.0}}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tokenizer_dir):
    from fixtures_models import build_checkpoint

    # the small ChatML tokenizer (4k vocab: cheap grammar masks); its template renders tool results
    # but not tool definitions, so the offered tools are checked in render_chat's `tools`
    return build_checkpoint(tmp_path_factory.mktemp("mcp_model"), "qwen3", tokenizer_dir, head_dim=32)


@pytest.fixture(scope="module")
def mcp_engine(tiny_model, network_urls):
    from mistralpy import Engine

    # py: the live fixture's HTTP server (one process fewer); crashy: its own, crashed by a test
    config = {"servers": [{"name": "py", "source": {"type": "Http", "url": network_urls["web"]}},
                          {"name": "crashy", "source": stdio_source("crashy")},
                          {"name": "ghost", "source": {"type": "Process", "command": "/nonexistent/mcp"}}],
              "tool_timeout_secs": 2}
    engine = Engine(str(tiny_model), dtype="f32", num_kv_blocks=128, max_model_len=512, max_seqs=4,
                    tool_parser="hermes", mcp_config=config)
    try:
        yield engine
    finally:
        engine.shutdown()


class _Prompts(list):
    """Every rendered prompt of a test, and the tool names offered with each."""

    def __init__(self) -> None:
        super().__init__()
        self.tools: list[set[str]] = []


@pytest.fixture
def prompts(mcp_engine, monkeypatch):
    seen = _Prompts()
    render = mcp_engine.render_chat

    def recording(*args, **kwargs):
        seen.tools.append({t["function"]["name"] for t in kwargs.get("tools") or []})
        seen.append(render(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(mcp_engine, "render_chat", recording)
    return seen


def test_engine_runs_forced_mcp_call(mcp_engine, prompts):
    res = mcp_engine.chat(ASK, tool_choice=_named("py_secret"), seed=3, **QUICK)
    (call,) = res["agentic_tool_calls"]
    assert (call["round"], call["name"], call["result"]) == (0, "py_secret", SECRET)
    assert call["mcp"]["isError"] is False
    assert len(prompts) == 2 and SECRET not in prompts[0] and SECRET in prompts[1]
    assert {"py_configure", "crashy_echo"} <= prompts.tools[0]  # MCP definitions were offered
    assert not any(name.startswith("ghost_") for name in prompts.tools[0])
    assert res["tool_rounds"] == 1 and res["choices"][0]["finish_reason"] in ("stop", "length")
    # a call with arguments: the schema constrains them, and the server's answer is in the prompt
    del prompts[:]
    res = mcp_engine.chat(ASK, tool_choice=_named("py_echo"), seed=4, **QUICK)
    (call,) = res["agentic_tool_calls"]
    assert call["result"] == "echo: " + json.loads(call["arguments"])["text"]
    assert call["result"] in prompts[1] and call["result"] not in prompts[0]


def test_engine_streams_mcp_rounds(mcp_engine, prompts):
    chunks = list(mcp_engine.chat(ASK, stream=True, tool_choice=_named("py_secret"), seed=5, **QUICK))
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finishes[0] == "tool_calls" and len(finishes) == 2
    assert SECRET in prompts[1]


def test_engine_survives_failing_tools(mcp_engine, prompts):
    for tool, expect in [("py_fail", "failed on purpose"), ("py_stall", "timed out after 2 s"),
                         ("crashy_crash", "closed the connection")]:
        del prompts[:]
        res = mcp_engine.chat(ASK, tool_choice=_named(tool), seed=6, **QUICK)
        (call,) = res["agentic_tool_calls"]
        assert call["result"].startswith("error: ") and expect in call["result"] and call["mcp"]["isError"]
        assert expect in prompts[1]
    # the engine and the other tools carry on
    res = mcp_engine.chat(ASK, tool_choice=_named("py_secret"), seed=7, **QUICK)
    assert res["agentic_tool_calls"][0]["result"] == SECRET


def test_client_tools_stay_client_side(mcp_engine, prompts):
    res = mcp_engine.chat(ASK, tools=[WEATHER], tool_choice=_named("get_weather"), temperature=1.0, seed=8,
                          max_tokens=40)
    choice = res["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["tool_calls"][0]["function"]["name"] == \
        "get_weather"
    assert res["agentic_tool_calls"] == [] and len(prompts) == 1
    assert {"get_weather", "py_secret"} <= prompts.tools[0]  # both kinds offered in one request
    # n > 1: one conversation cannot continue, so no MCP tools (and no error)
    res = mcp_engine.chat(ASK, n=2, temperature=1.0, seed=9, max_tokens=4)
    assert len(res["choices"]) == 2 and "agentic_tool_calls" not in res


def test_runner_with_mistralrs_mcp_classes(tiny_model, network_urls):
    from mistralpy import ChatCompletionRequest, McpClientConfigPy, McpServerConfigPy, McpServerSourcePy, Runner, Which

    # (the Process variant is converted in test_mistralrs_python_classes and spawned by the live tests)
    cfg = McpClientConfigPy(servers=[McpServerConfigPy(
        id="rs", name="rs", source=McpServerSourcePy.Http(network_urls["web"], 30, None), bearer_token="b")])
    with Runner(which=Which.Plain(model_id=str(tiny_model)), mcp_client_config=cfg, dtype="f32",
                num_kv_blocks=128) as runner:
        kw = {"model": "default", "messages": ASK, "max_tokens": 40, "temperature": 1.0, "logit_bias": {2: 30.0},
              "tool_choice": _named("rs_secret")}
        res = runner.send_chat_completion_request(ChatCompletionRequest(**kw))
        assert res.agentic_tool_calls[0].result == SECRET and res.choices[0].finish_reason == "stop"
        chunks = list(runner.send_chat_completion_request(ChatCompletionRequest(**kw, stream=True)))
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finishes == ["tool_calls", "stop"]
        mcp = runner.engine.mcp
    assert mcp.stopping and not mcp._thread.is_alive()  # Runner.shutdown closed the client


def test_image_results_reach_a_vision_model(tmp_path, tokenizer_dir, network_urls):
    """A tiny LLaVA: an MCP tool's image comes back as an image part of the tool message, so the
    next round's prompt holds the image (its placeholder, expanded into image features)."""
    from fixtures_vlm import build_llava

    from mistralpy import Engine

    ckpt = build_llava(tmp_path / "llava", tokenizer_dir)
    config = {"servers": [{"name": "py", "source": {"type": "Http", "url": network_urls["web"]}}]}
    with Engine(str(ckpt), dtype="f32", num_kv_blocks=64, max_model_len=512, tool_parser="hermes",
                mcp_config=config) as engine:
        seen: list[str] = []
        render = engine.render_chat
        engine.render_chat = lambda *a, **k: seen.append(render(*a, **k)) or seen[-1]
        res = engine.chat(ASK, tool_choice=_named("py_picture"), seed=1, **QUICK)
    (call,) = res["agentic_tool_calls"]
    assert call["mcp"]["content"][0]["type"] == "image" and "cannot view images" not in seen[1]
    assert seen[0].count("<image>") == 0 and seen[1].count("<image>") == 1
    # the placeholder was expanded to the image's features: more prompt tokens than the two texts hold
    texts = sum(len(engine.tokenize(p, add_special_tokens=False)) for p in seen)
    assert res["usage"]["prompt_tokens"] > texts
