"""Embedding requests through the engine's scheduler: mixed with generation in one engine (a causal
decoder embedder), split by the token budget, holding no KV blocks afterwards; and the refusals."""
from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from fixtures_embed import SENTENCES, tiny

from mistralpy.engine.async_engine import AsyncEngine
from mistralpy.engine.llm_engine import Engine
from mistralpy.errors import InvalidRequestError, PromptTooLongError
from mistralpy.sampling_params import SamplingParams

LONG = " ".join(SENTENCES[:6])   # ~40 tokens


@pytest.fixture(scope="module")
def causal() -> Engine:
    """Qwen3ForCausalLM whose folder also says how to embed (last token): generation + embeddings."""
    with Engine(str(tiny("qwen3causal")), dtype="float32", max_num_batched_tokens=24, max_seqs=8,
                num_kv_blocks=64, block_size=4) as engine:
        yield engine


def test_embeddings_mixed_with_generation_equal_alone(causal: Engine) -> None:
    from mistralpy.embed.engine import embed_plan

    texts = SENTENCES[:10] + [LONG]
    alone = causal.embed(texts)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    gen_alone = [o.outputs[0].token_ids for o in causal.generate(SENTENCES[20:23], params)]

    steps: list[tuple[bool, bool]] = []   # (pooling rows, generation rows) of each step
    execute = causal.core.runner.execute

    def recording(sched):
        steps.append((any(s.req.pooling is not None for s in sched.seqs),
                      any(s.req.pooling is None for s in sched.seqs)))
        return execute(sched)

    plan = embed_plan(causal.embedder, texts)
    gen = [causal._prepare(p, params)[1][0] for p in SENTENCES[20:23]]
    finished: dict = {}
    done = threading.Event()

    def sink(update) -> None:
        if update.finished:
            finished[update.req.request_id] = update
            if len(finished) == len(plan.reqs) + len(gen):
                done.set()

    causal.core.runner.execute = recording
    try:
        with causal.loop._cond:   # both kinds reach the scheduler together
            causal.loop.submit(gen, sink)
            causal.loop.submit(plan.reqs, sink)
        assert done.wait(60)
    finally:
        causal.core.runner.execute = execute
    assert (True, True) in steps                       # steps ran both kinds at once
    during = plan.finish([finished[r.request_id].pooled for r in plan.reqs])
    np.testing.assert_allclose(during, alone, atol=1e-5)
    assert [r.output_token_ids for r in gen] == gen_alone
    # the long text ran in chunks of the 24-token budget through the paged cache, and let it go
    assert causal.core.kv.pool.usage() == 0.0
    assert not causal.core.scheduler.running and not causal.core.scheduler.waiting


def test_causal_chunked_equals_one_step(causal: Engine) -> None:
    with Engine(str(tiny("qwen3causal")), dtype="float32", max_num_batched_tokens=4096) as big:
        np.testing.assert_allclose(causal.embed([LONG, "cat"]), big.embed([LONG, "cat"]), atol=1e-5)


def test_encoder_batch_split_by_token_budget() -> None:
    path = str(tiny("bert"))
    with Engine(path, dtype="float32", max_num_batched_tokens=32, max_seqs=256) as small, \
            Engine(path, dtype="float32", max_num_batched_tokens=8192, max_seqs=256) as big:
        ref = big.embed(SENTENCES)
        steps = small.core.stats.steps
        got = small.embed(SENTENCES)
        assert small.core.stats.steps - steps > 10       # ~500 tokens in 32-token steps
        assert big.core.stats.steps == 1
        np.testing.assert_allclose(got, ref, atol=1e-5)
        # a sequence longer than the budget still runs, alone
        assert len(small.embedder._tok.encode(LONG).ids) > 32
        np.testing.assert_allclose(small.embed(LONG), big.embed(LONG), atol=1e-5)
        assert small.core.runner.kv_caches == []         # an encoder keeps no KV cache at all


def test_inputs_truncation_and_dimensions() -> None:
    with Engine(str(tiny("bert")), dtype="float32") as engine:
        ids = engine.embedder._tok.encode(SENTENCES[3]).ids
        np.testing.assert_allclose(engine.embed([ids]), engine.embed(SENTENCES[3]), atol=1e-6)
        for bad in ([], "", [""], ["a", 3], [[]]):
            with pytest.raises(InvalidRequestError):
                engine.embed(bad)
        too_long = " ".join(["cat"] * 100)          # the tiny BERT takes 64 positions
        with pytest.raises(PromptTooLongError):
            engine.embed(too_long)
        cut = engine.embed(too_long, truncate=True)
        np.testing.assert_allclose(cut, engine.embed(" ".join(["cat"] * 62)), atol=1e-6)  # + [CLS], [SEP]
        np.testing.assert_allclose(engine.embed(too_long, truncate=10), engine.embed(" ".join(["cat"] * 8)),
                                   atol=1e-6)
        with pytest.raises(InvalidRequestError, match="Matryoshka"):
            engine.embed("cat", dimensions=8)        # not a Matryoshka model
        assert engine.embed("cat", dimensions=32).shape == (1, 32)
        with pytest.raises(InvalidRequestError, match="generate"):
            engine.generate("cat")
        with pytest.raises(InvalidRequestError, match="generate"):
            engine.chat([{"role": "user", "content": "hi"}])


def test_matryoshka_dimensions_and_async() -> None:
    with Engine(str(tiny("qwen3emb")), dtype="float32") as engine:   # Qwen3: a Matryoshka family
        full = engine.embed(SENTENCES[:4], prompt_name="query")
        short = engine.embed(SENTENCES[:4], prompt_name="query", dimensions=8)
        expect = full[:, :8] / np.linalg.norm(full[:, :8], axis=1, keepdims=True)
        np.testing.assert_allclose(short, expect, atol=1e-6)
        with pytest.raises(InvalidRequestError, match="prompt"):
            engine.embed("cat", prompt_name="nope")
        aengine = AsyncEngine(engine=engine)
        got = asyncio.run(aengine.embed(SENTENCES[:4], prompt_name="query"))
        np.testing.assert_allclose(got, full, atol=1e-6)
        # the score of an embedding model: cosine similarity
        scores = asyncio.run(aengine.score(SENTENCES[0], SENTENCES[:3]))
        assert scores[0] == pytest.approx(1.0, abs=1e-5) and len(scores) == 3


def test_generation_model_without_embedding_config_refuses(tmp_path) -> None:
    import shutil

    src = tiny("qwen3causal")
    dst = tmp_path / "plain"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("modules.json", "1_Pooling"))
    with Engine(str(dst), dtype="float32") as engine:
        with pytest.raises(InvalidRequestError, match="does not produce embeddings"):
            engine.embed("cat")
        assert engine.generate("cat", SamplingParams(max_tokens=2))[0].outputs[0].token_ids


def test_mistralrs_compat_embedding_request() -> None:
    from mistralpy import EmbeddingArchitecture, EmbeddingRequest, Runner, Which

    which = Which.Embedding(model_id=str(tiny("qwen3emb")), arch=EmbeddingArchitecture.Qwen3Embedding)
    with Runner(which=which, dtype="float32") as runner:
        out = runner.send_embedding_request(EmbeddingRequest(input=SENTENCES[:2], truncate_sequence=True))
        assert isinstance(out, list) and len(out) == 2 and len(out[0]) == 32
        np.testing.assert_allclose(out, runner.engine.embed(SENTENCES[:2]), atol=1e-6)
        assert len(runner.send_embedding_request(EmbeddingRequest(input="cat"))) == 1


def test_qwen3_embedding_config_naming_causal_lm(tmp_path) -> None:
    """Qwen3-Embedding's config.json says Qwen3ForCausalLM over a bare Qwen3Model's weights."""
    import json
    import shutil

    dst = tmp_path / "qwen3emb"
    shutil.copytree(tiny("qwen3emb"), dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["architectures"] = ["Qwen3ForCausalLM"]
    (dst / "config.json").write_text(json.dumps(cfg))
    with Engine(str(tiny("qwen3emb")), dtype="float32") as ref, Engine(str(dst), dtype="float32") as engine:
        assert engine.model_config.architecture == "Qwen3Model"
        np.testing.assert_allclose(engine.embed(SENTENCES[:3]), ref.embed(SENTENCES[:3]), atol=1e-6)
