"""One guarded fetcher for remote media (images now; the web-search / fetch_url tools later).

* Schemes: http(s); ``data:`` decoded in place; ``file://`` and bare paths only with
  ``allow_local_files`` (Python API / CLI), never from the server.
* SSRF: the host is resolved with ``socket.getaddrinfo`` (in a thread on the async path); the fetch
  is refused when ANY address is loopback, private, link-local, CGNAT, unspecified, reserved,
  multicast, broadcast or otherwise not globally routable (documentation ranges too), or an IPv6
  address embedding such an IPv4 (mapped, compatible, 6to4, Teredo, NAT64). ``allowed_domains``
  narrows hosts to an exact list whose addresses are then trusted (tests, intranets);
  ``allow_private`` trusts every address. Userinfo (``a@b``) is refused.
* No DNS rebinding: we connect to the exact address checked, requesting ``scheme://<ip>:<port>/path``
  with ``Host: <hostname>`` and httpcore's per-request ``sni_hostname`` extension, so TLS sends SNI
  for, and verifies the certificate of, the real name (CA bundle: certifi, or SSL_CERT_FILE).
  Requests go straight to httpx's transports, not a Client: no environment proxies (they would
  resolve names themselves), no cookie jar, no Client redirect handling (it parses Location first).
* Redirects: followed here, at most ``max_redirects``, each target re-parsed, re-resolved and
  re-checked before connecting.
* Size: a ``Content-Length`` above ``max_bytes`` is refused up front; the raw body is streamed and
  counted; gzip / deflate bodies are inflated under the same cap (no compression bombs).
* Time: ``timeout_s`` bounds connect, each read, and the whole fetch (all hops). The sync path's
  DNS is bounded by the system resolver; the async path's by ``timeout_s`` as well.

Every refusal is a ``MediaError`` (HTTP 400 from the server) whose message names the problem.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import os
import re
import socket
import stat
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, unquote_to_bytes, urljoin, urlsplit

import httpx

from mistralpy.multimodal.inputs import MediaError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_MAX_BYTES = 20 * 1024 * 1024
_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
_MAX_URL_CHARS = 8192
_MAX_ADDRS_TRIED = 4          # a host with a dead AAAA still works through its A record
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")   # RFC 8215: site-specific, never public
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")
_HOST_RE = re.compile(r"^[a-z0-9_\-.]+$")
_HEADERS = {"User-Agent": "mistralpy-media-fetch/0.1", "Accept": "*/*", "Accept-Encoding": "identity"}


@dataclass
class MediaPolicy:
    """What a fetch may reach and how much it may read. The server builds one from its flags."""

    max_bytes: int = DEFAULT_MAX_BYTES                 # --max-media-mb
    allowed_domains: frozenset[str] | None = None      # exact hostnames; their addresses are trusted
    allow_private: bool = False                        # --allow-private-media: any address
    timeout_s: float = 10.0                            # connect, each read, and the whole fetch
    max_redirects: int = 3
    allow_local_files: bool = False                    # paths and file:// (Python API / CLI only)

    def __post_init__(self) -> None:
        if self.allowed_domains is not None:  # compare like parsed hosts: lower case, no trailing dot
            self.allowed_domains = frozenset(d.strip().lower().rstrip(".").strip("[]")
                                             for d in self.allowed_domains)


# ---------------------------------------------------------------------------------------- addresses

def _embedded_v4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for (packets may reach it), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if int(ip) >> 32 == 0 and int(ip) > 1:              # deprecated IPv4-compatible ::a.b.c.d
        return ipaddress.IPv4Address(int(ip))
    return None


def address_problem(ip: IPAddress) -> str | None:
    """Why a fetch must not connect to ``ip`` ("loopback", ...), or None for a public address."""
    if isinstance(ip, ipaddress.IPv6Address):
        v4 = _embedded_v4(ip)
        if v4 is not None:              # judged by where it leads (::ffff:8.8.8.8 is fine)
            inner = address_problem(v4)
            return f"{inner} (embedded IPv4 {v4})" if inner else None
        if ip in _NAT64_LOCAL:
            return "NAT64 local-use"
        if ip.is_site_local:
            return "site-local"
    checks = (("unspecified", ip.is_unspecified), ("loopback", ip.is_loopback),
              ("link-local", ip.is_link_local), ("multicast", ip.is_multicast),
              ("broadcast", ip == _BROADCAST), ("shared / CGNAT", ip in _CGNAT),
              ("reserved", ip.is_reserved), ("private", ip.is_private),
              ("not globally routable", not ip.is_global))
    return next((name for name, hit in checks if hit), None)


# -------------------------------------------------------------------------------------- URL parsing

@dataclass(frozen=True)
class _Target:
    url: str                     # the logical URL (with the hostname): messages, joining redirects
    scheme: str
    host: str                    # ASCII, lower case, no brackets, no trailing dot
    port: int
    path: str                    # path + query, "/" when empty
    literal: IPAddress | None    # the host when the URL names an address


def _parse_http(url: str) -> _Target:
    if len(url) > _MAX_URL_CHARS:
        raise MediaError(f"URL longer than {_MAX_URL_CHARS} characters")
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
        raise MediaError("URL contains whitespace or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise MediaError(f"malformed URL {url!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise MediaError(f"unsupported URL scheme {scheme + ':' if scheme else '(none)'} in {url!r}")
    if "@" in parts.netloc:
        raise MediaError("URLs with credentials (user@host) are not accepted")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise MediaError(f"URL {url!r} has no host")
    try:
        literal: IPAddress | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise MediaError(f"invalid host name {host!r}") from None
        if not _HOST_RE.match(host):
            raise MediaError(f"invalid host name {host!r}")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return _Target(url, scheme, host, port or (443 if scheme == "https" else 80), path, literal)


def _check_host(t: _Target, policy: MediaPolicy) -> None:
    """Before any DNS query: a disallowed name is not even looked up."""
    if policy.allowed_domains is not None and t.host not in policy.allowed_domains:
        raise MediaError(f"host {t.host!r} is not in the allowed media domains")


def _getaddrinfo(t: _Target) -> list[IPAddress]:
    if t.literal is not None:
        return [t.literal]
    try:  # looked up at call time so tests can observe each resolution
        infos = socket.getaddrinfo(t.host, t.port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise MediaError(f"cannot resolve host {t.host!r}: {exc}") from None
    addrs = list(dict.fromkeys(ipaddress.ip_address(str(i[4][0]).split("%")[0]) for i in infos))
    if not addrs:
        raise MediaError(f"host {t.host!r} resolves to no address")
    return addrs


def _check_addresses(t: _Target, addrs: list[IPAddress], policy: MediaPolicy) -> list[IPAddress]:
    if policy.allow_private or policy.allowed_domains is not None:
        return addrs   # allowed_domains already passed _check_host: its hosts may be private
    for ip in addrs:   # ANY bad address refuses: a name must not mix public and private answers
        problem = address_problem(ip)
        if problem:
            where = f"address {ip}" if t.literal is not None else f"host {t.host!r} resolves to an address that"
            raise MediaError(f"refused to fetch {t.url!r}: {where} is {problem}")
    return addrs


def _checked(url: str, policy: MediaPolicy) -> tuple[_Target, list[IPAddress]]:
    t = _parse_http(url)
    _check_host(t, policy)
    return t, _check_addresses(t, _getaddrinfo(t), policy)


def check_url(url: str, policy: MediaPolicy) -> list[IPAddress]:
    """Parse, resolve and check an http(s) URL; the addresses a fetcher may then connect to.
    Connect only to these (never re-resolve the name) or the check can be rebound."""
    return _checked(url, policy)[1]


async def check_url_async(url: str, policy: MediaPolicy) -> list[IPAddress]:
    """``check_url`` with the DNS lookup in a thread."""
    return (await asyncio.to_thread(_checked, url, policy))[1]


# -------------------------------------------------------------------------- request / response steps

def _remaining(deadline: float, t: _Target) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise MediaError(f"fetching {t.url!r} timed out")
    return left


def _pinned_request(t: _Target, ip: IPAddress, deadline: float) -> httpx.Request:
    """A GET to the checked address that still names the host (Host header, TLS SNI + cert check)."""
    netloc = f"[{ip}]" if ip.version == 6 else str(ip)
    host = f"[{t.host}]" if ":" in t.host else t.host
    default_port = 443 if t.scheme == "https" else 80
    headers = dict(_HEADERS, Host=host if t.port == default_port else f"{host}:{t.port}")
    timeout = httpx.Timeout(_remaining(deadline, t)).as_dict()
    return httpx.Request("GET", f"{t.scheme}://{netloc}:{t.port}{t.path}", headers=headers,
                         extensions={"timeout": timeout, "sni_hostname": t.host})


def _next_url(t: _Target, resp: httpx.Response, policy: MediaPolicy) -> str | None:
    """The redirect target, or None when this response carries the body; raises for the rest."""
    code = resp.status_code
    if code in _REDIRECT_CODES:
        location = resp.headers.get("location")
        if not location:
            raise MediaError(f"{t.url!r} returned HTTP {code} without a Location")
        return urljoin(t.url, location.strip())
    if not 200 <= code < 300:
        raise MediaError(f"{t.url!r} returned HTTP {code}")
    length = resp.headers.get("content-length")
    if length is not None:
        if not length.strip().isdigit():
            raise MediaError(f"{t.url!r} sent an invalid Content-Length {length!r}")
        if int(length) > policy.max_bytes:
            raise MediaError(f"{t.url!r} is too large: Content-Length {int(length)} exceeds the "
                             f"{policy.max_bytes}-byte media limit")
    return None


class _Body:
    """Counts streamed bytes against the cap and the deadline; inflates gzip/deflate, capped too."""

    def __init__(self, t: _Target, policy: MediaPolicy, deadline: float) -> None:
        self.t, self.limit, self.deadline = t, policy.max_bytes, deadline
        self.buf = bytearray()
        self.too_large = f"{t.url!r} is too large: more than the {self.limit}-byte media limit"

    def add(self, chunk: bytes) -> None:
        self.buf += chunk
        if len(self.buf) > self.limit:
            raise MediaError(self.too_large)
        _remaining(self.deadline, self.t)

    def finish(self, resp: httpx.Response) -> bytes:
        encoding = resp.headers.get("content-encoding", "identity").strip().lower()
        if encoding in ("", "identity"):
            return bytes(self.buf)
        if encoding not in ("gzip", "x-gzip", "deflate"):
            raise MediaError(f"{self.t.url!r} used an unsupported Content-Encoding {encoding!r}")
        inflater = zlib.decompressobj(32 + zlib.MAX_WBITS)   # 32+: gzip or zlib header, detected
        try:
            out = inflater.decompress(bytes(self.buf), self.limit + 1)
        except zlib.error as exc:
            raise MediaError(f"{self.t.url!r} sent a corrupt {encoding} body: {exc}") from None
        if len(out) > self.limit:
            raise MediaError(self.too_large)
        return out


def _fetch_http(url: str, policy: MediaPolicy) -> bytes:
    deadline = time.monotonic() + policy.timeout_s
    with httpx.HTTPTransport(retries=0) as transport:
        for _hop in range(policy.max_redirects + 1):
            t, addrs = _checked(url, policy)          # every hop: parsed, resolved, checked again
            tried = addrs[:_MAX_ADDRS_TRIED]
            for ip in tried:
                try:
                    resp = transport.handle_request(_pinned_request(t, ip, deadline))
                    break
                except httpx.ConnectError:
                    if ip == tried[-1]:
                        raise
            try:
                next_url = _next_url(t, resp, policy)
                if next_url is None:
                    body = _Body(t, policy, deadline)
                    for chunk in resp.iter_raw():
                        body.add(chunk)
                    return body.finish(resp)
            finally:
                resp.close()
            url = next_url
    raise MediaError(f"too many redirects (more than {policy.max_redirects})")


async def _fetch_http_async(url: str, policy: MediaPolicy) -> bytes:
    """The same steps as ``_fetch_http``, awaiting the sockets; DNS runs in a thread."""
    deadline = time.monotonic() + policy.timeout_s
    async with httpx.AsyncHTTPTransport(retries=0) as transport:
        for _hop in range(policy.max_redirects + 1):
            t, addrs = await asyncio.to_thread(_checked, url, policy)
            tried = addrs[:_MAX_ADDRS_TRIED]
            for ip in tried:
                try:
                    resp = await transport.handle_async_request(_pinned_request(t, ip, deadline))
                    break
                except httpx.ConnectError:
                    if ip == tried[-1]:
                        raise
            try:
                next_url = _next_url(t, resp, policy)
                if next_url is None:
                    body = _Body(t, policy, deadline)
                    async for chunk in resp.aiter_raw():
                        body.add(chunk)
                    return body.finish(resp)
            finally:
                await resp.aclose()
            url = next_url
    raise MediaError(f"too many redirects (more than {policy.max_redirects})")


def _transport_error(url: str, exc: Exception) -> MediaError:
    if isinstance(exc, (httpx.TimeoutException, TimeoutError)):
        return MediaError(f"fetching {url!r} timed out")
    return MediaError(f"{url!r} is unreachable: {exc or type(exc).__name__}")


# ---------------------------------------------------------------------------- data: and local files

def decode_data_url(url: str, max_bytes: int) -> bytes:
    """``data:[<mime>][;...][;base64],<payload>``; sizes are checked before anything is decoded."""
    too_large = MediaError(f"data: URL is too large: more than the {max_bytes}-byte media limit")
    header, comma, payload = url[len("data:"):].partition(",")
    if not comma:
        raise MediaError("malformed data: URL (no comma before the payload)")
    if not payload:
        raise MediaError("empty data: URL")
    if header.split(";")[-1].strip().lower() != "base64":
        if len(payload) > 3 * max_bytes:                  # %XX is 3 characters per byte at most
            raise too_large
        data = unquote_to_bytes(payload)
    else:
        b64_limit = 4 * -(-max_bytes // 3)              # encoded length of max_bytes
        if len(payload) > 2 * b64_limit + 64:            # clearly too large: don't even copy it
            raise too_large
        clean = "".join(unquote(payload).split())        # tolerate %2B and wrapped lines
        if len(clean) > b64_limit + 4:
            raise too_large
        if len(clean) % 4 == 1:
            raise MediaError("invalid base64 in data: URL (bad length)")
        try:
            data = base64.b64decode(clean + "=" * (-len(clean) % 4), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise MediaError(f"invalid base64 in data: URL: {exc}") from None
    if len(data) > max_bytes:
        raise too_large
    return data


def read_local_file(path: str | os.PathLike[str], policy: MediaPolicy) -> bytes:
    if not policy.allow_local_files:
        raise MediaError("local files are not accepted (pass an http(s) or data: URL)")
    p = Path(path).expanduser()
    try:
        st = p.stat()
        if not stat.S_ISREG(st.st_mode):
            raise MediaError(f"{str(p)!r} is not a regular file")
        if st.st_size > policy.max_bytes:
            raise MediaError(f"{str(p)!r} is too large: {st.st_size} bytes, limit {policy.max_bytes}")
        with open(p, "rb") as f:
            data = f.read(policy.max_bytes + 1)    # the file may grow after stat
    except OSError as exc:
        raise MediaError(f"cannot read {str(p)!r}: {exc.strerror or exc}") from None
    if len(data) > policy.max_bytes:
        raise MediaError(f"{str(p)!r} is too large: more than the {policy.max_bytes}-byte media limit")
    return data


def _local_path(url: str, kind: str) -> str:
    """A bare path as is; a file:// URL's path (this machine only: no host or localhost)."""
    parts = urlsplit(url)
    if kind == "file" and parts.netloc not in ("", "localhost"):
        raise MediaError(f"file: URLs must not name a host ({parts.netloc!r})")
    return unquote(parts.path) if kind == "file" else url


def _kind(url: str) -> str:
    """"data", "http", "file" or "path"; other schemes are refused."""
    m = _SCHEME_RE.match(url)
    if m is None or len(m.group(1)) == 1:        # no scheme, or a Windows drive letter
        return "path"
    scheme = m.group(1).lower()
    if scheme in ("data", "http", "https", "file"):
        return "http" if scheme == "https" else scheme
    raise MediaError(f"unsupported URL scheme {scheme}: (use http, https or data)")


# ---------------------------------------------------------------------------------------- public API

def fetch_bytes(url: str, policy: MediaPolicy) -> bytes:
    """The bytes an http(s) / data: URL (or, when allowed, a file:// URL or path) names."""
    url = url.strip()
    kind = _kind(url)
    if kind == "data":
        return decode_data_url(url, policy.max_bytes)
    if kind != "http":
        return read_local_file(_local_path(url, kind), policy)
    try:
        return _fetch_http(url, policy)
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise _transport_error(url, exc) from None


async def fetch_bytes_async(url: str, policy: MediaPolicy) -> bytes:
    """``fetch_bytes`` for the event loop: DNS and file reads run in threads, sockets are async."""
    url = url.strip()
    kind = _kind(url)
    if kind == "data":
        return decode_data_url(url, policy.max_bytes)
    if kind != "http":
        return await asyncio.to_thread(read_local_file, _local_path(url, kind), policy)
    try:
        async with asyncio.timeout(policy.timeout_s):   # DNS in a thread is bounded too
            return await _fetch_http_async(url, policy)
    except (httpx.HTTPError, httpx.InvalidURL, TimeoutError) as exc:
        raise _transport_error(url, exc) from None


__all__ = ["MediaPolicy", "address_problem", "check_url", "check_url_async",
           "decode_data_url", "fetch_bytes", "fetch_bytes_async", "read_local_file"]
