"""Built-in server-side tools ``web_search`` and ``fetch_url`` (``--enable-search``,
``Engine(enable_search=True)``), a tool provider of engine/tool_rounds.py.

Backends of ``web_search`` (``search_backend`` / ``--search-backend``):

* ``"duckduckgo"`` (default): DuckDuckGo's HTML endpoint, its result page parsed (html_text.py);
  ``"duckduckgo:URL"`` sends the same query to another DuckDuckGo-compatible HTML endpoint.
* a SearxNG URL (``http(s)://host[/search]``, or ``"searxng:URL"``): its JSON API (``format=json``).
* ``search_callback(query)`` (Python API): returns ``[{"title", "url", "content"}]`` (sync or async).

Results are ranked with BM25 (bm25.py) against the query, the backend's order breaking ties, and
cut to the request's token budget (``web_search_options.search_context_size``: low / medium /
high, engine/tool_rounds.CONTEXT_BUDGETS). The backend is the operator's choice, so its requests
go straight out; ``fetch_url`` fetches model-chosen URLs, so it goes through the media SSRF guard
(multimodal/fetch.py with the server's media policy: ``--allowed-media-domains`` / ``--allow-private-media``).
"""
from __future__ import annotations

import asyncio
import inspect
import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

import httpx

from mistralpy.engine.tool_rounds import ToolContext, ToolOutcome, parse_arguments
from mistralpy.errors import InvalidRequestError
from mistralpy.search.bm25 import rank, tokenize
from mistralpy.search.html_text import html_to_text, looks_like_html, parse_duckduckgo

log = logging.getLogger(__name__)

DUCKDUCKGO_URL = "https://html.duckduckgo.com/html/"
MAX_RESULTS = 10
_HEADERS = {"User-Agent": "Mozilla/5.0 (compatible; mistralpy-search/0.1)", "Accept-Language": "en"}

WEB_SEARCH = {"type": "function", "function": {
    "name": "web_search", "description": "Search the web. Returns the most relevant results (title, URL, snippet).",
    "parameters": {"type": "object", "properties": {"query": {"type": "string", "description": "what to search for"}},
                   "required": ["query"], "additionalProperties": False}}}
FETCH_URL = {"type": "function", "function": {
    "name": "fetch_url", "description": "Fetch a web page and return its readable text.",
    "parameters": {"type": "object", "properties": {"url": {"type": "string", "description": "an http(s) URL"}},
                   "required": ["url"], "additionalProperties": False}}}

SearchCallback = Callable[[str], Any]


def parse_backend(spec: str) -> tuple[str, str]:
    """(kind, url) of a backend spec: ("duckduckgo", url) or ("searxng", url)."""
    spec = (spec or "duckduckgo").strip()
    if spec == "duckduckgo":
        return "duckduckgo", DUCKDUCKGO_URL
    kind, _, rest = spec.partition(":")
    if kind in ("duckduckgo", "searxng") and rest.startswith(("http://", "https://")):
        url = rest
    elif spec.startswith(("http://", "https://")):
        kind, url = "searxng", spec
    else:
        raise InvalidRequestError(f"search_backend must be 'duckduckgo', 'duckduckgo:URL' or a SearxNG URL, "
                                  f"got {spec!r}", "search_backend")
    if kind == "searxng" and not url.rstrip("/").endswith("/search"):
        url = url.rstrip("/") + "/search"
    return kind, url


class SearchTools:
    """``web_search`` and ``fetch_url``."""

    def __init__(self, backend: str = "duckduckgo", *, callback: SearchCallback | None = None,
                 timeout_s: float = 15.0) -> None:
        if callback is not None and not callable(callback):
            raise InvalidRequestError("search_callback must be callable", "search_callback")
        self.kind, self.url = parse_backend(backend)
        self.callback = callback
        self.timeout_s = timeout_s

    def definitions(self) -> list[dict[str, Any]]:
        return [WEB_SEARCH, FETCH_URL]

    def has(self, name: str) -> bool:
        return name in ("web_search", "fetch_url")

    async def call(self, name: str, arguments: str, ctx: ToolContext) -> ToolOutcome:
        try:
            args = parse_arguments(name, arguments)
            key = "query" if name == "web_search" else "url"
            value = args.get(key)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{name} needs a non-empty string {key!r}")
        except ValueError as exc:
            return ToolOutcome.error(str(exc))
        if name == "web_search":
            return await self.web_search(value.strip(), ctx)
        return await self.fetch_url(value.strip(), ctx)

    # ---- web_search ------------------------------------------------------------------------------
    async def search(self, query: str) -> list[dict[str, str]]:
        """The backend's raw results ({"title", "url", "content"}), in its order."""
        if self.callback is not None:
            got = self.callback(query)
            if inspect.isawaitable(got):
                got = await got
            return _clean(got)
        async with httpx.AsyncClient(timeout=self.timeout_s, trust_env=False, headers=_HEADERS,
                                     follow_redirects=True) as client:
            if self.kind == "duckduckgo":
                resp = await client.post(self.url, data={"q": query, "kl": "wt-wt"})
                resp.raise_for_status()
                return parse_duckduckgo(resp.text)
            resp = await client.get(self.url, params={"q": query, "format": "json"})
            resp.raise_for_status()
            return _clean(resp.json().get("results") or [])

    async def web_search(self, query: str, ctx: ToolContext) -> ToolOutcome:
        try:
            results = await self.search(query)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the model is told
            log.info("web_search %r failed: %s", query, exc)
            return ToolOutcome.error(f"web_search failed: {type(exc).__name__}: {exc}")
        if not results:
            return ToolOutcome(f"No results for {query!r}.", f"No results for {query!r}.")
        ranked = [results[i] for i in rank(query, [f"{r['title']} {r['content']}" for r in results])]
        text = format_results(ranked[:MAX_RESULTS], ctx.token_budget, ctx.count_tokens)
        return ToolOutcome(text, text, extra={"search_results": [
            {"title": r["title"], "url": r["url"]} for r in ranked[:MAX_RESULTS]]})

    # ---- fetch_url -------------------------------------------------------------------------------
    async def fetch_url(self, url: str, ctx: ToolContext) -> ToolOutcome:
        from mistralpy.multimodal.fetch import MediaPolicy, fetch_bytes_async
        from mistralpy.multimodal.inputs import MediaError

        if not url.startswith(("http://", "https://")):
            return ToolOutcome.error("fetch_url takes http(s) URLs only")
        policy = ctx.policy if ctx.policy is not None else MediaPolicy()
        try:
            data = await fetch_bytes_async(url, policy)  # the SSRF guard: private addresses refused
        except MediaError as exc:
            return ToolOutcome.error(f"fetch_url refused or failed: {exc}")
        text = page_text(data)
        out = cut_to_budget(text, ctx.token_budget, ctx.count_tokens)
        return ToolOutcome(out, out)


def _clean(results: Any) -> list[dict[str, str]]:
    out = []
    for r in results if isinstance(results, (list, tuple)) else []:
        if isinstance(r, dict) and (r.get("url") or r.get("title")):
            out.append({"title": str(r.get("title") or ""), "url": str(r.get("url") or ""),
                        "content": str(r.get("content") or r.get("snippet") or r.get("body") or "")})
    return out


_CUT = "\n[... cut to fit the context budget]"


def _approx_tokens(text: str) -> int:
    return max(1, len(text) // 4)


def format_results(results: Sequence[dict[str, str]], budget: int,
                   count: Callable[[str], int] | None = None) -> str:
    """Numbered results, as many whole ones as the token budget holds (at least the first, cut)."""
    count = count or _approx_tokens
    pieces, used = [], 0
    for i, r in enumerate(results, 1):
        piece = f"[{i}] {r['title']}\n{r['url']}\n{r['content']}".rstrip()
        n = count(piece) + 2
        if used + n > budget:
            if not pieces:
                pieces.append(cut_to_budget(piece, budget, count))
            break
        pieces.append(piece)
        used += n
    return "\n\n".join(pieces)


def page_text(data: bytes) -> str:
    """A fetched page as readable text (HTML parsed; JSON and text kept as they are)."""
    text = data.decode("utf-8", errors="replace")
    if looks_like_html(data):
        title, blocks = html_to_text(text)
        return "\n".join(([f"# {title}"] if title else []) + blocks)
    try:
        return json.dumps(json.loads(text), ensure_ascii=False, indent=1)
    except ValueError:
        return text


def cut_to_budget(text: str, budget: int, count: Callable[[str], int] | None = None) -> str:
    """The longest prefix of whole lines (then words) within ``budget`` tokens."""
    count = count or _approx_tokens
    if count(text) <= budget:
        return text
    budget = max(1, budget - count(_CUT))  # room for the note saying it was cut
    lo, hi = 0, len(text)
    while lo < hi:  # binary search on characters: count() is monotone enough for a cut
        mid = (lo + hi + 1) // 2
        if count(text[:mid]) <= budget:
            lo = mid
        else:
            hi = mid - 1
    cut = text[:lo]
    for sep in ("\n", " "):
        at = cut.rfind(sep)
        if at > lo // 2:
            cut = cut[:at]
            break
    return cut.rstrip() + _CUT


__all__ = ["FETCH_URL", "WEB_SEARCH", "SearchTools", "cut_to_budget", "format_results", "page_text",
           "parse_backend", "rank", "tokenize"]
