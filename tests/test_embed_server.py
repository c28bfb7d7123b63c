"""/v1/embeddings through the official openai client over a real socket, /v1/rerank and /v1/score
through httpx, and the 400s (OpenAI's error body)."""
from __future__ import annotations

import base64
import shutil

import httpx
import numpy as np
import pytest
from fixtures_embed import SENTENCES, tiny
from fixtures_server import running_server

from mistralpy.server import ServerOptions, create_app
from mistralpy.server.registry import ModelRegistry, ModelSpec

openai = pytest.importorskip("openai")
F32 = {"dtype": "float32"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    plain = tmp_path_factory.mktemp("gen") / "plain"   # a generation model with no embedding config
    shutil.copytree(tiny("qwen3causal"), plain, ignore=shutil.ignore_patterns("modules.json", "1_Pooling"))
    registry = ModelRegistry.from_specs([
        ModelSpec("emb", str(tiny("qwen3emb")), F32, default=True),
        ModelSpec("bert", str(tiny("bert")), F32),
        ModelSpec("ce", str(tiny("crossencoder")), F32),
        ModelSpec("gen", str(plain), F32),
    ])
    app = create_app(registry, ServerOptions(log_interval_s=0))
    try:
        with running_server(app) as base:
            yield base, registry
    finally:
        registry.shutdown()


def _engine(registry, name):
    return registry.entries[name].engine.engine


def test_openai_client_embeddings(server) -> None:
    base, registry = server
    client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=60)
    expect = _engine(registry, "emb").embed(SENTENCES[:3])
    res = client.embeddings.create(model="emb", input=SENTENCES[:3])
    got = np.array([d.embedding for d in sorted(res.data, key=lambda d: d.index)], dtype=np.float32)
    np.testing.assert_allclose(got, expect, atol=1e-6)
    assert res.usage.prompt_tokens == res.usage.total_tokens > 0 and res.model == "emb"
    # base64 (the client asks for it by default and decodes it: the call above) equals float
    raw = client.embeddings.create(model="emb", input=SENTENCES[:3], encoding_format="base64")
    floats = httpx.post(base + "/v1/embeddings", json={"model": "emb", "input": SENTENCES[:3],
                                                      "encoding_format": "float"}).json()
    b64 = httpx.post(base + "/v1/embeddings", json={"model": "emb", "input": SENTENCES[:3],
                                                    "encoding_format": "base64"}).json()
    decoded = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in b64["data"]])
    np.testing.assert_array_equal(decoded, expect)
    np.testing.assert_array_equal(decoded, np.array([d["embedding"] for d in floats["data"]], dtype=np.float32))
    np.testing.assert_array_equal(np.stack([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4")
                                            for d in raw.data]), decoded)
    # one string, token ids, lists of token ids
    one = client.embeddings.create(model="emb", input=SENTENCES[0])
    ids = _engine(registry, "emb").embedder._tok.encode(SENTENCES[0]).ids
    by_ids = client.embeddings.create(model="emb", input=ids)
    by_id_lists = client.embeddings.create(model="emb", input=[ids, ids])
    np.testing.assert_allclose(one.data[0].embedding, expect[0], atol=1e-6)
    np.testing.assert_allclose(by_ids.data[0].embedding, expect[0], atol=1e-6)
    assert len(by_id_lists.data) == 2
    # dimensions: Matryoshka truncation, renormalised
    short = client.embeddings.create(model="emb", input=SENTENCES[:2], dimensions=8)
    v = np.array([d.embedding for d in short.data])
    np.testing.assert_allclose(v, expect[:2, :8] / np.linalg.norm(expect[:2, :8], axis=1, keepdims=True), atol=1e-6)


def _error(resp: httpx.Response, status: int = 400) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["type"] == "invalid_request_error"
    return body


def test_embedding_errors(server) -> None:
    base, _ = server
    post = lambda body: httpx.post(base + "/v1/embeddings", json=body, timeout=60)
    _error(post({"model": "emb", "input": []}))
    _error(post({"model": "emb", "input": ""}))
    _error(post({"model": "emb", "input": ["a", ""]}))
    _error(post({"model": "emb", "input": "cat", "encoding_format": "int8"}))
    assert _error(post({"model": "bert", "input": "cat " * 100}))["code"] == "context_length_exceeded"
    assert post({"model": "bert", "input": "cat " * 100, "truncate_prompt_tokens": 16}).status_code == 200
    assert "Matryoshka" in _error(post({"model": "bert", "input": "cat", "dimensions": 8}))["message"]
    assert "embeddings" in _error(post({"model": "gen", "input": "cat"}))["message"]
    chat = httpx.post(base + "/v1/chat/completions", timeout=60,
                      json={"model": "bert", "messages": [{"role": "user", "content": "hi"}]})
    assert "does not generate" in _error(chat)["message"]
    done = httpx.post(base + "/v1/completions", json={"model": "bert", "prompt": "hi"}, timeout=60)
    assert "does not generate" in _error(done)["message"]


def test_rerank_and_score(server) -> None:
    base, registry = server
    docs = SENTENCES[:5]
    expect = _engine(registry, "ce").score(SENTENCES[9], docs)
    r = httpx.post(base + "/v1/rerank", json={"model": "ce", "query": SENTENCES[9], "documents": docs,
                                              "top_n": 3}, timeout=60).json()
    assert [x["index"] for x in r["results"]] == sorted(range(5), key=lambda i: -expect[i])[:3]
    for x in r["results"]:
        assert x["relevance_score"] == pytest.approx(expect[x["index"]], abs=1e-6)
        assert x["document"]["text"] == docs[x["index"]]
    plain = httpx.post(base + "/rerank", json={"model": "ce", "query": "cat", "documents": [{"text": "dog"}],
                                               "return_documents": False}, timeout=60).json()
    assert set(plain["results"][0]) == {"index", "relevance_score"}
    s = httpx.post(base + "/v1/score", json={"model": "ce", "text_1": SENTENCES[9], "text_2": docs},
                   timeout=60).json()
    assert [d["index"] for d in s["data"]] == list(range(5))
    np.testing.assert_allclose([d["score"] for d in s["data"]], expect, atol=1e-6)
    pairwise = httpx.post(base + "/v1/score", json={"model": "ce", "text_1": docs[:2], "text_2": docs[2:4]},
                          timeout=60).json()
    assert len(pairwise["data"]) == 2
    # an embedding model scores by cosine similarity
    cos = httpx.post(base + "/v1/score", json={"model": "emb", "text_1": "cat", "text_2": ["cat", "dog"]},
                     timeout=60).json()
    assert cos["data"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    _error(httpx.post(base + "/v1/rerank", json={"model": "ce", "query": "cat", "documents": []}, timeout=60))
    _error(httpx.post(base + "/v1/score", json={"model": "ce", "text_1": ["a", "b"], "text_2": ["c", "d", "e"]},
                      timeout=60))
    _error(httpx.post(base + "/v1/rerank", json={"model": "gen", "query": "cat", "documents": ["dog"]}, timeout=60))
