"""The built-in web_search / fetch_url tools (mistralpy/search) against local fake backends: a
DuckDuckGo-style HTML result page and a SearxNG JSON API served on 127.0.0.1 (no internet here).
BM25 ranking, token budgets, readable-text extraction, and fetch_url behind the media SSRF guard."""
from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, urlsplit

import pytest

from mistralpy.engine.tool_rounds import ToolContext
from mistralpy.multimodal.fetch import MediaPolicy
from mistralpy.search import SearchTools, cut_to_budget, parse_backend
from mistralpy.search.bm25 import bm25_scores, rank
from mistralpy.search.html_text import html_to_text, parse_duckduckgo

# Results in the backend's order; the one about the query's words is listed third.
RESULTS = [
    {"title": "Gardening basics", "url": "https://garden.example/basics", "content": "Soil, water and light."},
    {"title": "Cooking pasta", "url": "https://food.example/pasta", "content": "Boil water, add salt."},
    {"title": "Rust borrow checker explained", "url": "https://rust.example/borrow",
     "content": "How the borrow checker enforces ownership in Rust."},
    {"title": "Travel tips", "url": "https://travel.example/tips", "content": "Pack light."},
]


def ddg_page(results: list[dict[str, str]]) -> str:
    """A result page shaped like html.duckduckgo.com/html/ (wrapped links, an ad first)."""
    items = [('<div class="result result--ad"><h2 class="result__title"><a class="result__a" '
              'href="https://ads.example/x">Sponsored thing</a></h2>'
              '<a class="result__snippet" href="https://ads.example/x">Buy now</a></div>')]
    for r in results:
        link = "//duckduckgo.com/l/?uddg=" + quote(r["url"], safe="") + "&amp;rut=abc"
        items.append(f'<div class="result results_links web-result"><div class="links_main">'
                     f'<h2 class="result__title"><a rel="nofollow" class="result__a" href="{link}">{r["title"]}</a>'
                     f'</h2><a class="result__snippet" href="{link}">{r["content"].replace("Rust", "<b>Rust</b>")}'
                     f'</a></div></div>')
    return f"<!DOCTYPE html><html><head><title>q at DuckDuckGo</title></head><body>{''.join(items)}</body></html>"


ARTICLE = """<!doctype html><html><head><title>The Article</title><style>.x{color:red}</style>
<script>var secret = "SCRIPT-TEXT";</script></head><body><nav>Home | About</nav>
<h1>Borrowing in Rust</h1><p>First paragraph about &amp; ownership.</p><p>Second   paragraph.</p>
<ul><li>one</li><li>two</li></ul><footer>Copyright</footer></body></html>"""


class FakeWeb:
    """The local HTTP server's state: what it received, and knobs."""

    def __init__(self) -> None:
        self.received: list[tuple[str, str, bytes]] = []
        self.results = list(RESULTS)
        self.long_page = "<html><body>" + "".join(f"<p>word{i} " * 40 + "</p>" for i in range(200)) + "</body></html>"


@contextmanager
def fake_web() -> Iterator[tuple[str, FakeWeb]]:
    """Serve the fake DuckDuckGo (POST /html/), SearxNG (GET /search), pages, and a tool
    dispatch endpoint (POST /dispatch: behaviour by tool name) on 127.0.0.1."""
    web = FakeWeb()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _send(self, code: int, body: bytes | str, ctype: str) -> None:
            data = body.encode() if isinstance(body, str) else body
            self.send_response(code)
            self.send_header("content-type", ctype)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            web.received.append(("GET", self.path, b""))
            if parts.path == "/search":
                q = parse_qs(parts.query)
                assert q.get("format") == ["json"]
                self._send(200, json.dumps({"query": q["q"][0], "results": web.results}), "application/json")
            elif parts.path == "/page.html":
                self._send(200, ARTICLE, "text/html; charset=utf-8")
            elif parts.path == "/long.html":
                self._send(200, web.long_page, "text/html")
            elif parts.path == "/dispatch":
                self._send(200, json.dumps({"tools": DISPATCH_TOOLS}), "application/json")
            else:
                self._send(404, "not found", "text/plain")

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            web.received.append(("POST", self.path, body))
            if self.path == "/html/":
                self._send(200, ddg_page(web.results), "text/html")
            elif self.path == "/broken/":
                self._send(503, "down", "text/plain")
            elif self.path == "/dispatch":
                call = json.loads(body)
                name = call["name"]
                if name == "d_json":
                    self._send(200, json.dumps({"ok": True, "got": call}), "application/json")
                elif name == "d_text":
                    self._send(200, "plain text answer", "text/plain")
                elif name == "d_fail":
                    self._send(500, "it broke", "text/plain")
                elif name == "d_slow":
                    time.sleep(3)
                    self._send(200, "too late", "text/plain")
                else:
                    self._send(404, "no such tool", "text/plain")
            else:
                self._send(404, "not found", "text/plain")

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", web
    finally:
        srv.shutdown()
        srv.server_close()


_EMPTY = {"type": "object", "properties": {}, "additionalProperties": False}
DISPATCH_TOOLS = [{"type": "function", "function": {"name": n, "description": d, "parameters": _EMPTY}}
                  for n, d in [("d_json", "JSON answer"), ("d_text", "text answer"), ("d_fail", "HTTP 500"),
                               ("d_slow", "too slow")]]


@pytest.fixture(scope="module")
def web():
    with fake_web() as served:
        yield served


def words(text: str) -> int:
    """A stand-in tokenizer: one token per whitespace-separated word."""
    return len(text.split())


def call(tools: SearchTools, name: str, args: dict, **ctx) -> object:
    return asyncio.run(tools.call(name, json.dumps(args), ToolContext(**ctx)))


# ---- BM25 and text extraction ----------------------------------------------------------------------
def test_bm25_ranks_matching_documents_first():
    docs = ["the cat sat", "rust borrow checker and rust ownership", "a dog", "borrow a cup"]
    scores = bm25_scores("rust borrow", docs)
    assert scores[1] > scores[3] > 0 and scores[0] == scores[2] == 0
    assert rank("rust borrow", docs) == [1, 3, 0, 2]  # ties keep their order
    assert rank("nothing matches", docs) == [0, 1, 2, 3] and rank("", docs) == [0, 1, 2, 3]
    # a rarer term weighs more than a common one
    assert rank("zebra the", ["the cat", "the dog", "zebra one"])[0] == 2


def test_html_to_text_keeps_readable_blocks():
    title, blocks = html_to_text(ARTICLE)
    assert title == "The Article"
    assert blocks == ["Borrowing in Rust", "First paragraph about & ownership.", "Second paragraph.", "one", "two"]


def test_duckduckgo_page_parsed_without_ads():
    got = parse_duckduckgo(ddg_page(RESULTS))
    assert [r["url"] for r in got] == [r["url"] for r in RESULTS]  # uddg links unwrapped, the ad dropped
    assert got[2]["title"] == RESULTS[2]["title"] and got[2]["content"] == RESULTS[2]["content"]


def test_backend_specs():
    assert parse_backend("duckduckgo") == ("duckduckgo", "https://html.duckduckgo.com/html/")
    assert parse_backend("http://sx:8080") == ("searxng", "http://sx:8080/search")
    assert parse_backend("searxng:https://sx/search") == ("searxng", "https://sx/search")
    assert parse_backend("duckduckgo:http://127.0.0.1:9/html/") == ("duckduckgo", "http://127.0.0.1:9/html/")
    with pytest.raises(Exception, match="search_backend"):
        parse_backend("bing")


# ---- web_search against the fake backends ------------------------------------------------------------
@pytest.mark.parametrize("kind", ["duckduckgo", "searxng", "callback", "async_callback"])
def test_web_search_ranks_results(web, kind):
    base, state = web
    seen = []

    def cb(query):
        seen.append(query)
        return RESULTS

    async def acb(query):
        seen.append(query)
        return RESULTS

    tools = {"duckduckgo": lambda: SearchTools(f"duckduckgo:{base}/html/"),
             "searxng": lambda: SearchTools(base),
             "callback": lambda: SearchTools(callback=cb),
             "async_callback": lambda: SearchTools(callback=acb)}[kind]()
    before = len(state.received)
    out = call(tools, "web_search", {"query": "rust borrow checker"})
    assert not out.is_error, out.text
    first = out.text.split("\n\n")[0]
    assert first.startswith("[1] Rust borrow checker explained") and "https://rust.example/borrow" in first
    assert out.text.count("[") == 4 and "Sponsored" not in out.text  # every result, the ad left out
    assert out.extra["search_results"][0]["url"] == "https://rust.example/borrow"
    if kind.endswith("callback"):
        assert seen == ["rust borrow checker"]
    else:  # the query reached the backend
        method, path, body = state.received[before]
        sent = parse_qs(body.decode())["q"][0] if method == "POST" else parse_qs(urlsplit(path).query)["q"][0]
        assert sent == "rust borrow checker"


def test_web_search_budget(web):
    base, state = web
    state.results = [{"title": f"result {i}", "url": f"https://r.example/{i}", "content": "lorem ipsum " * 100}
                     for i in range(10)]
    try:
        tools = SearchTools(base)
        sizes = {}
        for size in ("low", "medium", "high"):
            out = call(tools, "web_search", {"query": "lorem"}, search_context_size=size, count_tokens=words)
            sizes[size] = words(out.text)
            assert sizes[size] <= ToolContext(search_context_size=size).token_budget
        assert sizes["low"] < sizes["medium"] < sizes["high"]
        # one result larger than the budget is cut, not dropped
        state.results = [{"title": "huge", "url": "https://r.example/h", "content": "word " * 5000}]
        out = call(tools, "web_search", {"query": "word"}, search_context_size="low", count_tokens=words)
        assert out.text.startswith("[1] huge") and "cut to fit" in out.text and words(out.text) <= 1024
    finally:
        state.results = list(RESULTS)


def test_web_search_errors_are_results(web):
    base, _ = web
    out = call(SearchTools(f"duckduckgo:{base}/broken/"), "web_search", {"query": "x"})
    assert out.is_error and "503" in out.text
    out = call(SearchTools(base), "web_search", {"query": ""})
    assert out.is_error and "query" in out.text
    out = asyncio.run(SearchTools(base).call("web_search", "not json", ToolContext()))
    assert out.is_error and "invalid arguments" in out.text
    out = call(SearchTools(callback=lambda q: []), "web_search", {"query": "x"})
    assert not out.is_error and "No results" in out.text


# ---- fetch_url behind the SSRF guard -------------------------------------------------------------------
def test_fetch_url_refuses_private_addresses(web):
    base, state = web
    before = len(state.received)
    out = call(SearchTools(), "fetch_url", {"url": f"{base}/page.html"})  # the default, strict policy
    assert out.is_error and "refused" in out.text
    assert len(state.received) == before  # nothing was requested
    out = call(SearchTools(), "fetch_url", {"url": "file:///etc/passwd"})
    assert out.is_error


def test_fetch_url_extracts_text_within_budget(web):
    base, _ = web
    policy = MediaPolicy(allowed_domains=frozenset({"127.0.0.1"}))  # opened for the local server only
    out = call(SearchTools(), "fetch_url", {"url": f"{base}/page.html"}, policy=policy)
    assert not out.is_error, out.text
    assert out.text.startswith("# The Article\nBorrowing in Rust\nFirst paragraph about & ownership.")
    assert "SCRIPT-TEXT" not in out.text and "Copyright" not in out.text and "color" not in out.text
    out = call(SearchTools(), "fetch_url", {"url": f"{base}/long.html"}, policy=policy, count_tokens=words,
               search_context_size="low")
    assert words(out.text) <= 1024 and out.text.endswith("cut to fit the context budget]")
    out = call(SearchTools(), "fetch_url", {"url": f"{base}/missing"}, policy=policy)
    assert out.is_error and "404" in out.text


def test_cut_to_budget_keeps_whole_lines():
    text = "\n".join(f"line {i} " + "x " * 10 for i in range(100))
    cut = cut_to_budget(text, 50, words)
    assert words(cut) <= 50 and cut.splitlines()[-2].startswith("line")
    assert cut_to_budget("short", 50, words) == "short"
