"""Encoder and decoder embedders on our layers against sentence-transformers (the oracle): the real
all-MiniLM-L6-v2 and all-mpnet-base-v2 (when fetched), tiny random XLM-R / MPNet / Qwen3-Embedding /
EmbeddingGemma folders and a BERT cross-encoder; plus the pooling and attention pieces alone."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from assets import minilm_dir, mpnet_dir
from fixtures_embed import SENTENCES, tiny

from mistralpy.attention.backend import AttentionSpec
from mistralpy.embed.attention import BidirectionalBackend, reference_attention
from mistralpy.embed.pooling import POOLING_MODES, PoolingConfig, PoolState, pool_reference
from mistralpy.engine.llm_engine import Engine
from mistralpy.worker.forward_batch import ForwardBatch

st = pytest.importorskip("sentence_transformers")


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _against_st(path, prompt_names=(None,), sentences=SENTENCES, **engine_kw) -> None:
    ref_model = st.SentenceTransformer(str(path), device="cpu")
    with Engine(str(path), dtype="float32", max_num_batched_tokens=4096, max_seqs=64, **engine_kw) as engine:
        for name in prompt_names:
            ref = ref_model.encode(sentences, prompt_name=name, convert_to_numpy=True)
            ours = engine.embed(sentences, prompt_name=name)
            assert ours.shape == ref.shape and ours.dtype == np.float32
            assert _cosines(ours, ref).min() >= 0.9999, name
            assert np.abs(ours - ref).max() < 1e-4, name


@pytest.mark.parametrize("asset", [minilm_dir, mpnet_dir], ids=["all-MiniLM-L6-v2", "all-mpnet-base-v2"])
def test_real_weights_match_sentence_transformers(asset) -> None:
    _against_st(asset())


@pytest.mark.parametrize("name,prompts", [("xlmr", (None,)), ("mpnet", (None,)), ("bert-instr", ("query",)),
                                          ("qwen3emb", (None, "query")), ("gemma", ("query", "document"))])
def test_tiny_embedders_match_sentence_transformers(name: str, prompts: tuple) -> None:
    _against_st(tiny(name), prompts)


def test_cross_encoder_scores_match_sentence_transformers() -> None:
    path = tiny("crossencoder")
    pairs = [(SENTENCES[i], SENTENCES[(i * 7 + 3) % 50]) for i in range(12)]
    ref = st.CrossEncoder(str(path), device="cpu").predict(pairs)
    with Engine(str(path), dtype="float32") as engine:
        one_query = engine.score(pairs[0][0], [d for _, d in pairs[:4]])
        pairwise = engine.score([q for q, _ in pairs], [d for _, d in pairs])
    np.testing.assert_allclose(pairwise, ref, atol=1e-4)
    ref_one = st.CrossEncoder(str(path), device="cpu").predict([(pairs[0][0], d) for _, d in pairs[:4]])
    np.testing.assert_allclose(one_query, ref_one, atol=1e-4)


# ---- pieces ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", POOLING_MODES)
@pytest.mark.parametrize("include_prompt", [True, False])
def test_pool_state_in_chunks_equals_whole(mode: str, include_prompt: bool) -> None:
    torch.manual_seed(0)
    h = torch.randn(23, 8)
    cfg = PoolingConfig((mode,), include_prompt, [], True)
    whole = pool_reference(h, cfg, prompt_len=5)
    state = PoolState(cfg, 23, prompt_len=5)
    for lo, hi in ((0, 4), (4, 11), (11, 23)):
        state.add(lo, h[lo:hi])
    from mistralpy.embed.pooling import finish
    torch.testing.assert_close(finish([state.result()], cfg)[0], whole)
    region = h if include_prompt else h[5:]
    expect = {"cls": region[0], "lasttoken": h[-1], "max": region.amax(0), "mean": region.mean(0),
              "mean_sqrt_len_tokens": region.sum(0) / len(region) ** 0.5}.get(mode)
    if expect is not None:
        torch.testing.assert_close(whole, torch.nn.functional.normalize(expect, dim=0))


@pytest.mark.parametrize("window", [None, 3])
def test_bidirectional_backend_matches_reference(window) -> None:
    torch.manual_seed(0)
    lens = [5, 1, 9]
    t = sum(lens)
    q, k, v = torch.randn(t, 4, 8), torch.randn(t, 2, 8), torch.randn(t, 2, 8)
    starts = [0, 5, 6, 15]
    batch = ForwardBatch(torch.zeros(t, dtype=torch.long), torch.zeros(t, dtype=torch.long),
                         torch.full((t,), -1), torch.zeros(3, 0, dtype=torch.int32), lens, lens, starts,
                         torch.zeros(0, dtype=torch.long), 16)
    backend = BidirectionalBackend()
    md = backend.build_metadata(batch)
    spec = AttentionSpec(scale=8 ** -0.5, sliding_window=window)
    bias = torch.randn(4, 9, 9)
    torch.testing.assert_close(backend.forward(q, k, v, None, None, md, spec, bias),
                               reference_attention(q, k, v, starts, spec, bias), atol=1e-5, rtol=1e-5)
