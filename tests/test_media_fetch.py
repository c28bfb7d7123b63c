"""mistralpy.multimodal.fetch: the SSRF guard, pinned connections, redirects, caps and timeouts.

A real HTTP server on 127.0.0.1 counts every request it gets, so each refusal also proves that
nothing reached it. The guard itself is never mocked; the DNS-rebinding tests swap the resolver
(``socket.getaddrinfo``) and watch httpcore's connect step to see which address was dialled.
"""
from __future__ import annotations

import asyncio
import gzip
import shutil
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import httpcore
import pytest
from httpcore._backends.anyio import AnyIOBackend
from httpcore._backends.sync import SyncBackend
from test_image_io import jpeg_orientation6, png

from mistralpy.multimodal.fetch import MediaPolicy, address_problem, check_url, fetch_bytes, fetch_bytes_async
from mistralpy.multimodal.image_io import load_image, load_image_async
from mistralpy.multimodal.inputs import MediaError

PNG = png("RGB", (8, 6), (250, 10, 10))
JPEG6 = jpeg_orientation6((8, 4))
BIG = 64 * 1024
PUBLIC = "93.184.215.14"       # a globally routable address the guard accepts (never dialled here)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def _send(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None,
              length: int | None = -1) -> None:
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if length is not None:  # None: no Content-Length, the body ends when the connection closes
            self.send_header("Content-Length", str(len(body) if length == -1 else length))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up on purpose
            pass

    def do_GET(self) -> None:
        with self.server.lock:
            self.server.hits.append((self.path, self.headers.get("Host", "")))
        url = urlsplit(self.path)
        if url.path == "/slow":
            time.sleep(3)
        if url.path == "/redirect":                           # /redirect?to=<anywhere>
            return self._send(302, headers={"Location": parse_qs(url.query)["to"][0]})
        if url.path.startswith("/hop/") and url.path != "/hop/0":  # /hop/N: N redirects to go
            return self._send(302, headers={"Location": f"/hop/{int(url.path[5:]) - 1}"})
        self._send(*ROUTES.get(url.path, (404, b"not found")))


GZ = {"Content-Encoding": "gzip"}
ROUTES: dict[str, tuple] = {   # path -> (status, body, headers, Content-Length: -1 true, None absent)
    "/img.png": (200, PNG, {"Content-Type": "image/png"}), "/hop/0": (200, PNG), "/slow": (200, PNG),
    "/rot.jpg": (200, JPEG6, {"Content-Type": "image/jpeg"}),
    "/big": (200, b"x" * BIG), "/stream-big": (200, b"x" * BIG, {}, None),
    "/huge-cl": (200, b"x" * 10, {}, 10**12), "/short-body": (200, b"x" * 10, {}, 1000),
    "/gzip-png": (200, gzip.compress(PNG), GZ), "/gzip-bomb": (200, gzip.compress(b"\0" * (4 << 20)), GZ),
}


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.hits: list[tuple[str, str]] = []   # (path, Host header) of every request served

    @property
    def port(self) -> int:
        return self.server_address[1]

    def count(self) -> int:
        with self.lock:
            return len(self.hits)


@pytest.fixture(scope="module")
def server():
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(params=["sync", "async"])
def fetch(request) -> Callable[[str, MediaPolicy], bytes]:
    """Every behaviour is checked on both paths (the Python API's and the server's)."""
    if request.param == "sync":
        return fetch_bytes
    return lambda url, policy: asyncio.run(fetch_bytes_async(url, policy))


def local(**kw) -> MediaPolicy:
    """The test server opened up by name, as an intranet deployment would."""
    return MediaPolicy(allowed_domains=frozenset({"localhost"}), **kw)


# ---------------------------------------------------------------------------- default policy refuses

REFUSED = [
    ("http://127.0.0.1:{port}/img.png", "loopback"),
    ("http://localhost:{port}/img.png", "host 'localhost' resolves to an address that is loopback"),
    ("http://2130706433:{port}/img.png", "loopback"),          # 127.0.0.1 spelled as one number
    ("http://10.0.0.1/", "private"),
    ("http://172.16.5.4/", "private"),
    ("http://192.168.1.1/", "private"),
    ("http://169.254.169.254/latest/meta-data", "link-local"),
    ("http://100.64.0.1/", "CGNAT"),
    ("http://0.0.0.0:{port}/img.png", "unspecified"),
    ("http://[::]:{port}/img.png", "unspecified"),
    ("http://[::1]:{port}/img.png", "loopback"),
    ("http://[::ffff:127.0.0.1]:{port}/img.png", r"loopback \(embedded IPv4 127.0.0.1\)"),
    ("http://[::127.0.0.1]:{port}/img.png", "loopback"),       # IPv4-compatible
    ("http://[2002:7f00:1::]:{port}/img.png", "loopback"),     # 6to4 of 127.0.0.1
    ("http://[64:ff9b::7f00:1]:{port}/img.png", "loopback"),   # NAT64 of 127.0.0.1
    ("http://[64:ff9b::a9fe:a9fe]/", "link-local"),            # NAT64 of 169.254.169.254
    ("http://[fc00::1]/", "private"),
    ("http://[fe80::1]/", "link-local"),
    ("http://224.0.0.1/", "multicast"),
    ("http://255.255.255.255/", "broadcast"),
    ("http://240.0.0.1/", "reserved"),
    ("http://192.0.2.1/", "private|not globally routable"),     # documentation range
    ("ftp://example.com/a.png", "unsupported URL scheme ftp"),
    ("gopher://example.com/", "unsupported URL scheme gopher"),
    ("file:///etc/passwd", "local files are not accepted"),
    ("/etc/passwd", "local files are not accepted"),
    ("img.png", "local files are not accepted"),
    ("http://user@localhost:{port}/img.png", "credentials"),
    ("http://user:pw@example.com/a.png", "credentials"),
    ("http://example.com\\@127.0.0.1:{port}/img.png", "credentials"),
    ("http:///img.png", "no host"),
    ("http://localhost:{port}/a b.png", "whitespace"),
    ("http://localhost:99999/", "malformed URL"),
]


@pytest.mark.parametrize("template,why", REFUSED)
def test_default_policy_refuses(fetch, server, template, why):
    before = server.count()
    with pytest.raises(MediaError, match=why):
        fetch(template.format(port=server.port), MediaPolicy())
    assert server.count() == before, "a refused URL reached the server"


def test_allowed_domains_are_exact(fetch, server):
    before = server.count()
    for url in (f"http://127.0.0.1:{server.port}/img.png", f"http://sub.localhost:{server.port}/img.png"):
        with pytest.raises(MediaError, match="not in the allowed media domains"):
            fetch(url, local())
    assert server.count() == before


def test_address_problem_classifies():
    import ipaddress as ipa
    assert address_problem(ipa.ip_address(PUBLIC)) is None
    assert address_problem(ipa.ip_address("::ffff:8.8.8.8")) is None    # mapped public: fine
    assert address_problem(ipa.ip_address("2606:4700::1111")) is None
    assert address_problem(ipa.ip_address("::ffff:10.1.2.3")).startswith("private")


def test_check_url_returns_the_addresses(server):
    assert [str(a) for a in check_url(f"http://{PUBLIC}/x.png", MediaPolicy())] == [PUBLIC]
    assert "127.0.0.1" in [str(a) for a in check_url(f"http://localhost:{server.port}/", local())]
    with pytest.raises(MediaError, match="loopback"):
        check_url("http://127.0.0.1/", MediaPolicy())


# ----------------------------------------------------------------------------- fetching what is allowed

def test_allowed_domain_fetches_images(fetch, server):
    assert fetch(f"http://localhost:{server.port}/img.png", local()) == PNG
    assert server.hits[-1] == ("/img.png", f"localhost:{server.port}")  # Host names the host, not the IP
    img, key = load_image(f"http://localhost:{server.port}/rot.jpg", local())
    assert img.size == (4, 8) and key == JPEG6                  # EXIF rotation applied


def test_load_image_async_over_http(server):
    img, key = asyncio.run(load_image_async(f"http://localhost:{server.port}/img.png", local()))
    assert img.size == (8, 6) and key == PNG


def test_allow_private_reaches_any_address(fetch, server):
    assert fetch(f"http://127.0.0.1:{server.port}/img.png", MediaPolicy(allow_private=True)) == PNG


def test_gzip_body_is_inflated_within_the_cap(fetch, server):
    assert fetch(f"http://localhost:{server.port}/gzip-png", local()) == PNG
    with pytest.raises(MediaError, match="too large"):           # 4 MiB of zeros in a ~4 KiB body
        fetch(f"http://localhost:{server.port}/gzip-bomb", local(max_bytes=1 << 20))


def test_redirect_on_the_same_host_is_followed(fetch, server):
    base = f"http://localhost:{server.port}"
    assert fetch(f"{base}/redirect?to=/img.png", local()) == PNG
    assert fetch(f"{base}/redirect?to={base}/rot.jpg", local()) == JPEG6


@pytest.mark.parametrize("target", ["http://127.0.0.2:{port}/img.png", "http://[::1]:{port}/img.png",
                                    "http://169.254.169.254/latest/meta-data",
                                    "file:///etc/passwd", "data:image/png;base64,AAAA", "ftp://localhost/x"])
def test_redirect_targets_are_checked_again(fetch, server, target):
    before = server.count()
    with pytest.raises(MediaError, match="not in the allowed media domains|unsupported URL scheme"):
        fetch(f"http://localhost:{server.port}/redirect?to={target.format(port=server.port)}", local())
    assert server.count() == before + 1                          # only the redirecting request


def test_redirect_limit(fetch, server):
    base = f"http://localhost:{server.port}"
    before = server.count()
    assert fetch(f"{base}/hop/3", local()) == PNG                 # 3 redirects: the default limit
    assert server.count() == before + 4
    with pytest.raises(MediaError, match=r"too many redirects \(more than 3\)"):
        fetch(f"{base}/hop/4", local())
    assert server.count() == before + 8                          # the 5th request never went out
    with pytest.raises(MediaError, match="too many redirects"):
        fetch(f"{base}/hop/1", local(max_redirects=0))


def test_http_errors(fetch, server):
    with pytest.raises(MediaError, match="returned HTTP 404"):
        fetch(f"http://localhost:{server.port}/missing.png", local())
    with pytest.raises(MediaError, match="unreachable"):          # body shorter than Content-Length
        fetch(f"http://localhost:{server.port}/short-body", local())


def test_content_length_over_the_cap_is_refused_up_front(fetch, server):
    with pytest.raises(MediaError, match=f"Content-Length {BIG} exceeds the 1000-byte"):
        fetch(f"http://localhost:{server.port}/big", local(max_bytes=1000))
    with pytest.raises(MediaError, match="Content-Length 1000000000000 exceeds"):
        fetch(f"http://localhost:{server.port}/huge-cl", local())
    assert len(fetch(f"http://localhost:{server.port}/big", local(max_bytes=BIG))) == BIG


def test_streamed_body_over_the_cap_is_refused(fetch, server):
    with pytest.raises(MediaError, match="too large: more than the 1000-byte media limit"):
        fetch(f"http://localhost:{server.port}/stream-big", local(max_bytes=1000))
    assert len(fetch(f"http://localhost:{server.port}/stream-big", local())) == BIG


def test_timeout(fetch, server):
    t0 = time.monotonic()
    with pytest.raises(MediaError, match="timed out"):
        fetch(f"http://localhost:{server.port}/slow", local(timeout_s=0.5))
    assert time.monotonic() - t0 < 2.5


def test_unreachable_port(fetch):
    with socket.socket() as s:          # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(MediaError, match="unreachable"):
        fetch(f"http://localhost:{port}/img.png", local())


# ------------------------------------------------------------------------------------- DNS rebinding

@pytest.fixture
def resolver(monkeypatch):
    """Route chosen test names to scripted answers; count each lookup of them."""
    real = socket.getaddrinfo
    answers: dict[str, list[list[str]]] = {}
    calls: dict[str, int] = {}

    def fake(host, port, *args, **kw):
        if host in answers:
            n = calls[host] = calls.get(host, 0) + 1
            script = answers[host]
            ips = script[min(n, len(script)) - 1]
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in ips]
        return real(host, port, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    return answers, calls


@pytest.fixture
def dialled(monkeypatch):
    """The (host, port) httpcore connects to; PUBLIC is refused instead of dialled (no network)."""
    seen: list[tuple[str, int]] = []
    real_sync, real_async = SyncBackend.connect_tcp, AnyIOBackend.connect_tcp

    def sync(self, host, port, *args, **kw):
        seen.append((host, port))
        if host == PUBLIC:
            raise httpcore.ConnectError("refused by the test")
        return real_sync(self, host, port, *args, **kw)

    async def async_(self, host, port, *args, **kw):
        seen.append((host, port))
        if host == PUBLIC:
            raise httpcore.ConnectError("refused by the test")
        return await real_async(self, host, port, *args, **kw)

    monkeypatch.setattr(SyncBackend, "connect_tcp", sync)
    monkeypatch.setattr(AnyIOBackend, "connect_tcp", async_)
    return seen


def test_dns_rebinding_connects_to_the_checked_address(fetch, server, resolver, dialled):
    answers, calls = resolver
    answers["media.rebind.test"] = [[PUBLIC], ["127.0.0.1"]]      # checked public, then rebound
    before = server.count()
    with pytest.raises(MediaError, match="unreachable"):
        fetch(f"http://media.rebind.test:{server.port}/img.png", MediaPolicy())
    assert calls["media.rebind.test"] == 1                         # resolved once, by the guard
    assert dialled == [(PUBLIC, server.port)]                      # and dialled exactly that
    assert server.count() == before


def test_a_name_with_any_private_answer_is_refused(fetch, server, resolver, dialled):
    answers, _ = resolver
    answers["mixed.test"] = [[PUBLIC, "127.0.0.1"]]
    with pytest.raises(MediaError, match="resolves to an address that is loopback"):
        fetch(f"http://mixed.test:{server.port}/img.png", MediaPolicy())
    assert dialled == []


def test_one_resolution_per_hop_and_the_host_header(fetch, server, resolver, dialled):
    answers, calls = resolver
    answers["media.pinned.test"] = [["127.0.0.1"]]
    policy = MediaPolicy(allowed_domains=frozenset({"media.pinned.test"}))
    assert fetch(f"http://media.pinned.test:{server.port}/redirect?to=/img.png", policy) == PNG
    assert calls["media.pinned.test"] == 2                         # one per hop, none by httpx
    assert dialled == [("127.0.0.1", server.port)] * 2
    assert [h for _, h in server.hits[-2:]] == [f"media.pinned.test:{server.port}"] * 2


# ------------------------------------------------------------------------------ https: SNI and certs

@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    """An https server on 127.0.0.1 whose self-signed certificate names only DNS:localhost."""
    import ssl
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    folder = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "2", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-keyout", str(folder / "key.pem"), "-out", str(folder / "cert.pem")],
                   check=True, capture_output=True)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    srv = _Server()
    srv.sni = []
    ctx.sni_callback = lambda _sock, server_name, _ctx: srv.sni.append(server_name)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    srv.handle_error = lambda *a: None   # a client refusing our certificate is expected below
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv, str(folder / "cert.pem")
    srv.shutdown()
    srv.server_close()


def test_https_verifies_the_hostname_while_pinned(fetch, tls_server, monkeypatch):
    srv, cafile = tls_server
    monkeypatch.setenv("SSL_CERT_FILE", cafile)     # the operator's CA bundle (honoured by httpx)
    assert fetch(f"https://localhost:{srv.port}/img.png", local()) == PNG
    assert srv.sni[-1] == "localhost"                # SNI names the host though we dialled its IP
    assert srv.hits[-1] == ("/img.png", f"localhost:{srv.port}")
    before = srv.count()                             # the certificate does not name 127.0.0.1
    with pytest.raises(MediaError, match="unreachable"):
        fetch(f"https://127.0.0.1:{srv.port}/img.png", MediaPolicy(allow_private=True))
    monkeypatch.delenv("SSL_CERT_FILE")              # nor is it trusted without the bundle
    with pytest.raises(MediaError, match="unreachable"):
        fetch(f"https://localhost:{srv.port}/img.png", local())
    assert srv.count() == before
