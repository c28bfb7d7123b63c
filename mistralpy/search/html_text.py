"""HTML -> readable text with the standard library's parser: the page's title and its text blocks
(paragraphs, headings, list items, cells) without scripts, styles, navigation and forms; and the
result list of DuckDuckGo's HTML endpoint (html.duckduckgo.com/html/)."""
from __future__ import annotations

import re
from html.parser import HTMLParser
from urllib.parse import parse_qs, urlsplit

_SKIP = {"script", "style", "noscript", "template", "svg", "nav", "footer", "header", "form", "aside",
         "button", "select", "iframe", "head"}
_BLOCK = {"p", "div", "section", "article", "main", "h1", "h2", "h3", "h4", "h5", "h6", "li", "tr", "td",
          "th", "pre", "blockquote", "br", "dd", "dt", "figcaption", "table", "ul", "ol"}
_VOID = {"br", "img", "hr", "meta", "link", "input", "source", "wbr", "area", "base", "col", "embed", "param",
         "track"}
_SPACE = re.compile(r"\s+")


class _TextParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[str] = []
        self.current: list[str] = []
        self.skip_depth = 0
        self.title: list[str] = []
        self.in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "title":
            self.in_title = True
        elif tag in _SKIP and tag not in _VOID:
            self.skip_depth += 1
        if tag in _BLOCK:
            self._flush()

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self.in_title = False
        elif tag in _SKIP and self.skip_depth:
            self.skip_depth -= 1
        if tag in _BLOCK:
            self._flush()

    def handle_data(self, data: str) -> None:
        if self.in_title:
            self.title.append(data)
        elif not self.skip_depth:
            self.current.append(data)

    def _flush(self) -> None:
        text = _SPACE.sub(" ", "".join(self.current)).strip()
        if text:
            self.blocks.append(text)
        self.current = []


def html_to_text(html: str) -> tuple[str, list[str]]:
    """(title, text blocks in page order)."""
    parser = _TextParser()
    parser.feed(html)
    parser.close()
    parser._flush()
    return _SPACE.sub(" ", "".join(parser.title)).strip(), parser.blocks


def looks_like_html(data: bytes) -> bool:
    head = data[:1024].lstrip().lower()
    return head.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in head


class _DuckParser(HTMLParser):
    """Collects DuckDuckGo HTML results: ``a.result__a`` (title + link) and ``.result__snippet``;
    ads (``result--ad``) are skipped."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.results: list[dict[str, str]] = []
        self.field: str | None = None  # "title" | "content" while inside one
        self.depth = 0
        self.ad = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self.field is not None:
            self.depth += tag not in _VOID
            return
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if "result" in classes or any(c.startswith("result--") for c in classes):
            self.ad = "result--ad" in classes
        if "result__a" in classes and not self.ad:
            self.results.append({"title": "", "url": _duck_url(a.get("href") or ""), "content": ""})
            self.field, self.depth = "title", 1
        elif "result__snippet" in classes and not self.ad and self.results:
            self.field, self.depth = "content", 1

    def handle_endtag(self, tag: str) -> None:
        if self.field is not None and tag not in _VOID:
            self.depth -= 1
            if self.depth <= 0:
                self.field = None

    def handle_data(self, data: str) -> None:
        if self.field is not None:
            self.results[-1][self.field] += data


def _duck_url(href: str) -> str:
    """DuckDuckGo wraps links as //duckduckgo.com/l/?uddg=<the URL>&rut=...: unwrap them."""
    if href.startswith("//"):
        href = "https:" + href
    parts = urlsplit(href)
    if parts.path.startswith("/l/"):
        target = parse_qs(parts.query).get("uddg")
        if target:
            return target[0]
    return href


def parse_duckduckgo(html: str) -> list[dict[str, str]]:
    """[{"title", "url", "content"}] of a DuckDuckGo HTML result page, in its order."""
    parser = _DuckParser()
    parser.feed(html)
    parser.close()
    out = []
    for r in parser.results:
        r = {k: _SPACE.sub(" ", v).strip() for k, v in r.items()}
        if r["url"] and r["title"]:
            out.append(r)
    return out
