"""Images through the OpenAI server, over a real socket with the official client: data: URLs and
http URLs (fetched by the guarded fetcher from a local image server opened with
allowed_media_domains), the same answer as the Python API, and every bad input a 400 with
OpenAI's error body that leaves the server serving."""
from __future__ import annotations

import base64
import http.server
import io
import threading

import numpy as np
import openai
import pytest
from fixtures_server import running_server
from fixtures_vlm import build_llava
from PIL import Image

from mistralpy.engine.async_engine import AsyncEngine
from mistralpy.server.app import ServerOptions, create_app


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


class _Images(http.server.BaseHTTPRequestHandler):
    """/cat.png, /redirect-local (-> 127.0.0.1, which the guard must refuse), /missing (404)."""
    hits: list[str] = []

    def do_GET(self) -> None:  # noqa: N802
        _Images.hits.append(self.path)
        if self.path == "/cat.png":
            body = _png(7)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/redirect-local":
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{self.server.server_address[1]}/cat.png")
            self.end_headers()
        else:
            self.send_response(404)
            self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def image_server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://localhost:{srv.server_address[1]}"
    srv.shutdown()


@pytest.fixture(scope="module")
def served(tmp_path_factory, tokenizer_dir, image_server):
    path = build_llava(tmp_path_factory.mktemp("llava"), tokenizer_dir)
    engine = AsyncEngine(str(path), dtype="f32", num_kv_blocks=64, max_model_len=256, max_num_images=2)
    app = create_app(engine, ServerOptions(served_model_name="vlm", allowed_media_domains=("localhost",),
                                           max_num_images=2, max_media_bytes=200_000))
    try:
        with running_server(app) as url:
            yield openai.OpenAI(base_url=url + "/v1", api_key="x"), engine
    finally:
        engine.shutdown()


def _ask(client, *urls: str, text: str = "What is in the picture?"):
    parts = [{"type": "text", "text": text}] + [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return client.chat.completions.create(model="vlm", messages=[{"role": "user", "content": parts}],
                                          temperature=0, max_tokens=8)


def test_data_and_http_urls_answer_like_the_python_api(served, image_server):
    client, engine = served
    data_url = "data:image/png;base64," + base64.b64encode(_png(7)).decode()
    a = _ask(client, data_url).choices[0].message.content
    b = _ask(client, image_server + "/cat.png").choices[0].message.content
    msgs = [{"role": "user", "content": [{"type": "text", "text": "What is in the picture?"},
                                         {"type": "image_url", "image_url": {"url": data_url}}]}]
    c = engine.engine.chat(msgs, temperature=0, max_tokens=8)["choices"][0]["message"]["content"]
    assert a == b == c and a
    usage = _ask(client, data_url).usage
    assert usage.prompt_tokens > 16  # the image's 16 placeholder tokens are counted


def test_tokenize_counts_the_expanded_image_tokens(served, image_server):
    """/tokenize with image parts returns the ids the model runs (placeholders expanded), the same
    count as the chat answer's prompt_tokens; a bad image there is a 400 too."""
    import httpx

    client, _ = served
    data_url = "data:image/png;base64," + base64.b64encode(_png(7)).decode()
    parts = [{"type": "text", "text": "What is in the picture?"}, {"type": "image_url", "image_url": {"url": data_url}}]
    base = str(client.base_url).removesuffix("/v1/")
    toks = httpx.post(base + "/tokenize", json={"model": "vlm", "messages": [{"role": "user", "content": parts}]}).json()
    text_only = httpx.post(base + "/tokenize", json={"model": "vlm", "messages": [
        {"role": "user", "content": parts[:1]}]}).json()
    assert toks["count"] == len(toks["tokens"]) == _ask(client, data_url).usage.prompt_tokens
    assert toks["count"] >= text_only["count"] + 16   # the image's 16 placeholder rows
    bad = [parts[0], {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]
    r = httpx.post(base + "/tokenize", json={"model": "vlm", "messages": [{"role": "user", "content": bad}]})
    assert r.status_code == 400 and "content[1]" in r.json()["error"]["param"]


@pytest.mark.parametrize("url, match", [
    ("http://127.0.0.1:9/x.png", "not in the allowed"),        # not an allowed host, loopback
    ("http://169.254.169.254/latest/meta-data", "not in the allowed"),
    ("file:///etc/passwd", "local files"),
    ("/etc/passwd", "local files|URL"),
    ("data:image/png;base64,aGVsbG8=", "image"),                       # "hello": not an image
    ("data:image/png;base64," + "A" * 400_000, "large|exceeds|limit"),  # over max_media_bytes
])
def test_bad_images_are_400s(served, url, match):
    client, _ = served
    with pytest.raises(openai.BadRequestError) as err:
        _ask(client, url)
    body = err.value.body
    assert body["type"] == "invalid_request_error" and "content[1]" in body["param"]
    import re

    assert re.search(match, body["message"], re.I), body["message"]


def test_redirects_to_loopback_and_missing_images_are_refused(served, image_server):
    client, _ = served
    _Images.hits.clear()
    with pytest.raises(openai.BadRequestError, match="not in the allowed"):
        _ask(client, image_server + "/redirect-local")
    assert _Images.hits == ["/redirect-local"]  # the redirect target was never fetched
    with pytest.raises(openai.BadRequestError, match="404"):
        _ask(client, image_server + "/missing")


def test_too_many_images_and_server_keeps_serving(served):
    client, _ = served
    data_url = "data:image/png;base64," + base64.b64encode(_png(1)).decode()
    with pytest.raises(openai.BadRequestError, match="at most 2"):
        _ask(client, data_url, data_url, data_url)
    assert _ask(client, data_url).choices[0].message.content  # still serving


def test_text_only_model_refuses_images(tmp_path, tokenizer_dir):
    from fixtures_models import build_checkpoint

    path = build_checkpoint(tmp_path / "llama", "llama", tokenizer_dir)
    engine = AsyncEngine(str(path), dtype="f32", num_kv_blocks=32, max_model_len=256)
    try:
        with running_server(create_app(engine)) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="x")
            with pytest.raises(openai.BadRequestError, match="does not take images"):
                client.chat.completions.create(model="default", max_tokens=2, messages=[{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]}])
    finally:
        engine.shutdown()
