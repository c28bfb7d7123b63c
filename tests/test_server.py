"""`mistralpy serve`: a real uvicorn on 127.0.0.1 driven by the official openai client."""
from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
from fixtures_models import build_checkpoint
from fixtures_server import running_server

from mistralpy import AsyncEngine
from mistralpy.server import ServerOptions, create_app

KEY = "test-key"
NAME = "tiny-llama"
MAX_LEN = 256
CHAT = [{"role": "user", "content": "Hello there, how are you?"}]



@pytest.fixture(scope="module")
def server(tmp_path_factory, tokenizer_dir):
    ckpt = build_checkpoint(tmp_path_factory.mktemp("llama_server"), "llama", tokenizer_dir)
    engine = AsyncEngine(str(ckpt), dtype="f32", num_kv_blocks=320, max_model_len=MAX_LEN, max_seqs=32)
    app = create_app(engine, ServerOptions(served_model_name=NAME, api_key=KEY, cors_origins=("*",),
                                           max_body_bytes=256 * 1024, log_interval_s=1.0))
    with running_server(app) as base:
        yield base, engine
    engine.shutdown()


@pytest.fixture(scope="module")
def base(server):
    return server[0]


@pytest.fixture(scope="module")
def client(base):
    return openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _chat(client, **kw):
    return client.chat.completions.create(model=NAME, messages=CHAT, **{"max_tokens": 8, "temperature": 0, **kw})


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value}; asserts every sample line is well formed."""
    values = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            assert line == "" or line.startswith(("# HELP ", "# TYPE ")), line
            continue
        name, value = line.rsplit(" ", 1)
        values[name] = float(value)
    return values


def test_models_health_docs_request_id(base, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [NAME]
    r = httpx.get(base + "/health", headers={"x-request-id": "abc-123"})
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.headers["x-request-id"] == "abc-123"
    assert "/v1/chat/completions" in httpx.get(base + "/openapi.json").json()["paths"]
    assert httpx.get(base + "/docs").status_code == 200
    r = httpx.options(base + "/v1/models", headers={"origin": "http://x.test", "access-control-request-method": "GET"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] in ("*", "http://x.test")


def test_chat_and_stream_with_usage(client):
    resp = _chat(client, user="u1", presence_penalty=0.1, frequency_penalty=0.1, logit_bias={"5": 1.0},
                 extra_body={"top_k": 20, "min_p": 0.01, "repetition_penalty": 1.1, "dry_multiplier": 0.5,
                                 "ignore_eos": True, "enable_thinking": False, "chat_template_kwargs": {"x": 1}})
    assert resp.model == NAME and resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 8 and resp.usage.prompt_tokens > 5
    assert resp.usage.model_extra["avg_compl_tok_per_sec"] >= 0
    greedy = _chat(client, max_completion_tokens=8, extra_body={"ignore_eos": True})
    chunks = list(_chat(client, max_completion_tokens=8, stream=True, stream_options={"include_usage": True},
                        extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == greedy.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


def test_n2_logprobs_and_seed(client):
    kw = {"n": 2, "temperature": 1.0, "seed": 7, "logprobs": True, "top_logprobs": 3, "max_tokens": 6,
              "extra_body": {"ignore_eos": True}}
    a, b = _chat(client, **kw), _chat(client, **kw)
    assert len(a.choices) == 2
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    lp = a.choices[0].logprobs.content
    assert len(lp) == 6 and len(lp[0].top_logprobs) == 3 and lp[0].logprob <= 0
    assert a.usage.completion_tokens == 12


def test_stop_string(client):
    full = _chat(client, max_tokens=16, extra_body={"ignore_eos": True}).choices[0].message.content
    stop = full[len(full) // 2: len(full) // 2 + 2]
    resp = _chat(client, max_tokens=16, stop=[stop], extra_body={"ignore_eos": True})
    assert resp.choices[0].finish_reason == "stop"
    assert resp.choices[0].message.content == full[:full.find(stop)]


def test_completions(client):
    one = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=5, temperature=0,
                                    echo=True, logprobs=2, extra_body={"ignore_eos": True})
    choice = one.choices[0]
    assert choice.text.startswith("Once upon a time") and len(choice.logprobs.tokens) == 5
    assert choice.logprobs.text_offset[0] == len("Once upon a time")
    many = client.completions.create(model=NAME, prompt=[[5, 6, 7, 8], "hello world"], n=2, max_tokens=4,
                                     temperature=1.0, seed=1, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in many.choices) == [0, 1, 2, 3] and many.usage.completion_tokens == 16
    best = client.completions.create(model=NAME, prompt="abc", n=1, best_of=3, max_tokens=4, temperature=1.0,
                                     extra_body={"ignore_eos": True})
    assert len(best.choices) == 1 and best.choices[0].logprobs is None
    chunks = list(client.completions.create(model=NAME, prompt="hello", max_tokens=4, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    plain = client.completions.create(model=NAME, prompt="hello", max_tokens=4, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert text == plain.choices[0].text and chunks[-1].usage.completion_tokens == 4


def test_errors(base, client):
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, temperature=-1)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=NAME, messages=[{"content": "no role"}])
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=CHAT)
    long_prompt = list(range(10, 10 + MAX_LEN + 20))
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt=long_prompt, max_tokens=4)
    assert e.value.code == "context_length_exceeded"
    cut = client.completions.create(model=NAME, prompt=long_prompt, max_tokens=4,
                                    extra_body={"truncate_sequence": True, "ignore_eos": True})
    assert cut.usage.prompt_tokens == MAX_LEN - 4
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=NAME, prompt="x", suffix="y", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=NAME, prompt="x", n=2, best_of=1)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).models.list()
    auth = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    r = httpx.post(base + "/v1/chat/completions", content=b"{not json", headers=auth)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(base + "/v1/completions", content=b"x" * 300_000, headers=auth)
    assert r.status_code == 413
    assert httpx.get(base + "/health").status_code == 200


def test_tokenize_round_trip(base):
    auth = {"authorization": f"Bearer {KEY}"}
    text = "The quick brown fox"
    toks = httpx.post(base + "/tokenize", json={"prompt": text, "add_special_tokens": False}, headers=auth).json()
    assert toks["count"] == len(toks["tokens"]) > 0 and toks["max_model_len"] == MAX_LEN
    back = httpx.post(base + "/detokenize", json={"tokens": toks["tokens"]}, headers=auth).json()
    assert back["text"] == text
    chat = httpx.post(base + "/tokenize", json={"messages": CHAT}, headers=auth).json()
    assert chat["count"] > toks["count"]
    assert httpx.post(base + "/detokenize", json={"tokens": [10**9]}, headers=auth).status_code == 400


def test_concurrent_streams_with_cancellation(base):
    N = 32  # the fixture's max_seqs: all of them decode in one batch
    async def one(client: openai.AsyncOpenAI, i: int) -> int:
        cancel = i % 3 == 0  # a client that goes away midway, long before its 200 tokens are done
        stream = await client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": f"story number {i}"}], max_tokens=200 if cancel else 24,
            temperature=1.0, seed=i, stream=True, extra_body={"ignore_eos": True})
        n = 0
        async for chunk in stream:
            n += sum(1 for c in chunk.choices if c.delta.content is not None)
            if cancel and n >= 2:
                await stream.close()
                return -1
        return n

    async def main() -> list[int]:
        client = openai.AsyncOpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=120)
        try:
            return await asyncio.gather(*(one(client, i) for i in range(N)))
        finally:
            await client.close()

    results = asyncio.run(main())
    cancelled = len(range(0, N, 3))
    assert results.count(-1) == cancelled and all(r > 0 for r in results if r != -1)
    deadline = time.time() + 20
    while True:  # aborts reach the engine thread asynchronously
        m = parse_metrics(httpx.get(base + "/metrics").text)
        if m["mistralpy_num_requests_running"] == 0 and m["mistralpy_num_requests_waiting"] == 0:
            break
        assert time.time() < deadline, "requests still running after every client finished"
        time.sleep(0.1)
    assert m["mistralpy_kv_cache_blocks_free"] == m["mistralpy_kv_cache_blocks_total"]
    assert m["mistralpy_requests_aborted_total"] >= cancelled
    assert m['mistralpy_request_finish_total{reason="abort"}'] >= cancelled
    assert httpx.get(base + "/health").status_code == 200


def test_metrics_text(base, client):
    _chat(client)
    text = httpx.get(base + "/metrics").text
    m = parse_metrics(text)
    assert m['mistralpy_requests_total{endpoint="/v1/chat/completions",status="200"}'] >= 1
    assert m["mistralpy_generation_tokens_total"] > 0 and m["mistralpy_prompt_tokens_total"] > 0
    assert m["mistralpy_time_to_first_token_seconds_count"] >= 1
    assert m['mistralpy_inter_token_latency_seconds_bucket{le="+Inf"}'] == m["mistralpy_inter_token_latency_seconds_count"]
    assert 0 <= m["mistralpy_prefix_cache_hit_rate"] <= 1 and 0 <= m["mistralpy_kv_cache_usage_ratio"] <= 1


def test_engine_failure_is_500_with_partial_output_then_recovers(server, client):
    base, engine = server
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
        with pytest.raises(openai.InternalServerError) as e:
            _chat(client, max_tokens=10, extra_body={"ignore_eos": True})
        assert "boom" in e.value.message
        assert e.value.body["code"] == "engine_error"
        assert e.value.response.json()["partial"]["usage"]["completion_tokens"] == 2
        calls = 0
        with pytest.raises(openai.APIError, match="boom"):
            list(_chat(client, max_tokens=10, stream=True, extra_body={"ignore_eos": True}))
    finally:
        runner.execute = real
    assert _chat(client).choices[0].finish_reason in ("stop", "length")
    assert httpx.get(base + "/health").status_code == 200


def test_non_streaming_disconnect_aborts(server, base):
    _, engine = server
    runner = engine.engine.core.runner
    real = runner.execute

    def slow(sched):  # a step of 20 ms: the request outlives the client's timeout on any machine
        time.sleep(0.02)
        return real(sched)

    before = parse_metrics(httpx.get(base + "/metrics").text)["mistralpy_requests_aborted_total"]
    body = {"model": NAME, "prompt": "hi", "max_tokens": MAX_LEN - 8, "ignore_eos": True, "temperature": 0}
    runner.execute = slow
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(base + "/v1/completions", json=body, headers={"authorization": f"Bearer {KEY}"}, timeout=0.5)
        # Steps stay slow until the abort is seen: at full speed the rest of the request can finish
        # (~1 ms a step on this model) before the server notices the client is gone.
        deadline = time.time() + 20
        while True:
            m = parse_metrics(httpx.get(base + "/metrics").text)
            if m["mistralpy_requests_aborted_total"] > before and m["mistralpy_num_requests_running"] == 0:
                break
            assert time.time() < deadline, "the request kept running after its client left"
            time.sleep(0.05)
    finally:
        runner.execute = real
    assert m["mistralpy_kv_cache_blocks_free"] == m["mistralpy_kv_cache_blocks_total"]
