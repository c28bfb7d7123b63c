"""Engine behaviour: batching invariance, chunked prefill, prefix cache, preemption, API surface."""
from __future__ import annotations

import asyncio
import json
import threading

import pytest
import torch

from fixtures_models import build_checkpoint
from mistralpy import AsyncEngine, Engine, InvalidRequestError, PromptTooLongError, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer_dir):
    return build_checkpoint(tmp_path_factory.mktemp("llama_engine"), "llama", tokenizer_dir)


@pytest.fixture(scope="module")
def engine(ckpt):
    eng = Engine(str(ckpt), dtype="f32", num_kv_blocks=256, max_model_len=512)
    yield eng
    eng.shutdown()


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 4096, (n,), generator=g).tolist() for n in lengths]


def _tokens(results):
    return [r.outputs[0].token_ids for r in results]


def test_same_tokens_alone_and_in_mixed_batch(engine):
    prompts = _prompts([5, 37, 64, 3, 100, 18])
    alone = [_tokens(engine.generate(p, GREEDY))[0] for p in prompts]
    batched = _tokens(engine.generate(prompts, GREEDY))
    assert batched == alone


def test_chunked_prefill_and_preemption_give_same_tokens(ckpt, engine):
    prompts = _prompts([90, 70, 45, 120], seed=3)
    reference = _tokens(engine.generate(prompts, GREEDY))
    # 16-token budget chunks every prompt; 24 blocks of 16 cannot hold all four sequences at once.
    small = Engine(str(ckpt), dtype="f32", num_kv_blocks=24, max_num_batched_tokens=16, max_model_len=512,
                   enable_prefix_caching=False)
    try:
        got = _tokens(small.generate(prompts, GREEDY))
        assert small.core.scheduler.num_preemptions > 0
        assert small.core.kv.pool.num_free == 24  # everything freed at the end
    finally:
        small.shutdown()
    assert got == reference


def test_prefix_cache_hit_same_tokens(engine):
    system = _prompts([64], seed=5)[0]
    a, b = system + [11, 12, 13], system + [21, 22]
    first = engine.generate(a, GREEDY)[0]
    hits_before = engine.core.kv.pool.prefix_hits
    second = engine.generate(b, GREEDY)[0]
    assert engine.core.kv.pool.prefix_hits - hits_before == 4  # 64 shared tokens = 4 full blocks
    assert second.num_cached_tokens == 64
    fresh = Engine(str(engine.model_config.path), dtype="f32", num_kv_blocks=64, enable_prefix_caching=False)
    try:
        assert _tokens(fresh.generate([a, b], GREEDY)) == [first.outputs[0].token_ids, second.outputs[0].token_ids]
    finally:
        fresh.shutdown()


def test_text_prompt_chat_and_stream(engine):
    out = engine.generate("def main():", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    assert out.prompt == "def main():" and len(out.outputs[0].token_ids) == 8
    assert out.outputs[0].text == engine.detokenize(out.outputs[0].token_ids)
    assert engine.tokenize("def main():") == out.prompt_token_ids

    messages = [{"role": "user", "content": "hello"}]
    resp = engine.chat(messages, temperature=0, max_tokens=6, ignore_eos=True)
    assert resp.object == "chat.completion" and resp.choices[0].message.role == "assistant"
    assert resp.usage.completion_tokens == 6
    chunks = list(engine.chat(messages, stream=True, temperature=0, max_tokens=6, ignore_eos=True,
                              stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content for c in chunks if c.choices)
    assert streamed == resp.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 6


def test_n_choices_seed_and_logprobs(engine):
    params = SamplingParams(n=3, temperature=1.0, seed=42, max_tokens=10, ignore_eos=True, logprobs=True,
                            top_logprobs=3)
    r1 = engine.generate("import os", params)[0]
    r2 = engine.generate("import os", params)[0]
    assert [o.token_ids for o in r1.outputs] == [o.token_ids for o in r2.outputs]
    assert len({tuple(o.token_ids) for o in r1.outputs}) > 1
    for o in r1.outputs:
        assert len(o.logprobs) == 10
        for entry, tok in zip(o.logprobs, o.token_ids):
            assert entry.token_id == tok and entry.logprob <= 0
            assert len(entry.top_logprobs) == 3
            assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-6


def test_stop_strings_and_stop_tokens(engine):
    base = engine.generate("class A:", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0].outputs[0]
    text = base.text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop
    out = engine.generate("class A:", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                                     stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[: text.index(stop)]
    tok = base.token_ids[5]
    out = engine.generate("class A:", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                                     stop_token_ids=[tok]))[0].outputs[0]
    assert out.token_ids == base.token_ids[: base.token_ids.index(tok) + 1] and out.stop_reason == tok


def test_eos_min_tokens_and_ignore_eos(engine):
    eos = engine.tokenizer.eos_token_id
    bias = {eos: 100.0}  # force EOS
    out = engine.generate("x", SamplingParams(max_tokens=10, logit_bias=bias))[0].outputs[0]
    assert out.token_ids == [eos] and out.finish_reason == "stop" and out.text == ""
    out = engine.generate("x", SamplingParams(max_tokens=10, min_tokens=4, logit_bias=bias))[0].outputs[0]
    assert len(out.token_ids) == 5 and out.token_ids[-1] == eos
    out = engine.generate("x", SamplingParams(max_tokens=7, logit_bias=bias, ignore_eos=True))[0].outputs[0]
    assert out.token_ids == [eos] * 7 and out.finish_reason == "length"


def test_errors_are_typed(engine):
    with pytest.raises(InvalidRequestError) as exc:
        engine.generate("x", SamplingParams(top_p=1.5))
    assert exc.value.field == "top_p"
    with pytest.raises(PromptTooLongError):
        engine.generate([5] * 600)
    with pytest.raises(InvalidRequestError):
        engine.generate([5, 99999])
    with pytest.raises(InvalidRequestError) as exc:
        engine.chat([{"role": "user", "content": "hi"}], bogus=1)
    assert exc.value.field == "bogus"
    # the engine still works afterwards
    assert engine.generate("x", SamplingParams(max_tokens=2, ignore_eos=True))[0].outputs[0].token_ids


def test_generation_config_defaults_apply(tmp_path_factory, tokenizer_dir):
    path = build_checkpoint(tmp_path_factory.mktemp("gencfg"), "llama", tokenizer_dir)
    (path / "generation_config.json").write_text(json.dumps({"do_sample": False, "eos_token_id": 2}))
    eng = Engine(str(path), dtype="f32", num_kv_blocks=32)
    try:
        a = eng.generate("abc", SamplingParams(max_tokens=12, ignore_eos=True))[0].outputs[0].token_ids
        b = eng.generate("abc", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].outputs[0].token_ids
        assert a == b  # do_sample=False in generation_config -> greedy when the request says nothing
    finally:
        eng.shutdown()


def test_many_threads_share_one_engine(engine):
    prompts = _prompts([7, 19, 33, 50, 12, 28, 9, 41], seed=9)
    expected = [_tokens(engine.generate(p, GREEDY))[0] for p in prompts]
    results: dict[int, list[int]] = {}

    def worker(i):
        results[i] = _tokens(engine.generate(prompts[i], GREEDY))[0]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [results[i] for i in range(len(prompts))] == expected


def test_stream_abort_frees_blocks(engine):
    pool = engine.core.kv.pool
    stream = engine.generate_stream("hello", SamplingParams(max_tokens=200, ignore_eos=True))
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    for _ in range(100):
        if not engine.core.requests:
            break
        threading.Event().wait(0.02)
    assert not engine.core.requests
    assert all(b.ref_cnt == 0 for b in pool.blocks)


def test_async_engine_concurrent(engine):
    aeng = AsyncEngine.from_engine(engine)
    prompts = _prompts([8, 30, 15], seed=11)
    expected = _tokens(engine.generate(prompts, GREEDY))

    async def main():
        results = await aeng.generate(prompts, GREEDY)
        chunks = [c async for c in await aeng.chat([{"role": "user", "content": "hi"}], stream=True,
                                                    temperature=0, max_tokens=5, ignore_eos=True)]
        full = await aeng.chat([{"role": "user", "content": "hi"}], temperature=0, max_tokens=5, ignore_eos=True)
        deltas = [d async for d in aeng.generate_stream(prompts[0], GREEDY)]
        return results, chunks, full, deltas

    results, chunks, full, deltas = asyncio.run(main())
    assert _tokens(results) == expected
    assert "".join(c.choices[0].delta.content for c in chunks) == full.choices[0].message.content
    assert [t for d in deltas for t in d.outputs[0].token_ids] == expected[0]


def test_step_failure_fails_only_requests_in_flight(engine, monkeypatch):
    runner = engine.core.runner
    real_execute = runner.execute
    calls = {"n": 0}

    def flaky(sched):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected kernel failure")
        return real_execute(sched)

    monkeypatch.setattr(runner, "execute", flaky)
    out = engine.generate("boom", SamplingParams(max_tokens=20, ignore_eos=True))[0]
    assert out.outputs[0].finish_reason == "error" and "injected" in out.error
    assert len(out.outputs[0].token_ids) == 1  # the token of the first step is kept
    monkeypatch.setattr(runner, "execute", real_execute)
    assert all(b.ref_cnt == 0 for b in engine.core.kv.pool.blocks)
    again = engine.generate("boom", SamplingParams(max_tokens=5, ignore_eos=True))[0]
    assert again.outputs[0].finish_reason == "length" and again.error is None


def test_garbage_in_unused_kv_slots_never_leaks(ckpt, engine):
    """The cache is allocated uninitialised; padded / unwritten slots are read under a mask."""
    prompts = _prompts([21, 5, 40], seed=13)
    expected = _tokens(engine.generate(prompts, GREEDY))
    fresh = Engine(str(ckpt), dtype="f32", num_kv_blocks=32, max_model_len=512)
    try:
        runner = fresh.core.runner
        for k_cache, v_cache in runner.kv_caches:
            k_cache.fill_(float("nan"))
            v_cache.fill_(float("nan"))
        assert _tokens(fresh.generate(prompts, GREEDY)) == expected
        assert 0 < runner._zeroed_blocks <= 32
    finally:
        fresh.shutdown()
