"""The C++ paged decode attention (kernels/cpu/paged_attention.cpp, attention/cpu_paged.py).

References: the torch path it replaces (TorchRefBackend's index_copy_ + gather + SDPA, which it
must match: cache contents bit for bit, since both round k/v to the cache dtype the same way) and
a float64 oracle over the same caches. Tolerances: float32 outputs within 2e-5 of max |out| (float32
summation order and the polynomial exp, ~1e-7 relative, against float64); bf16 / f16 outputs within
one rounding of the output dtype plus that float32 error (the op accumulates in float32 and rounds
once). The torch path itself is looser for bf16 batches > 4 (bf16 matmuls, _cpu_low_precision_decode),
so it is compared at the tolerance that path has against the oracle (and not at all for a bf16
query over a float32 cache in batches > 4, which that path does not handle; the engine's caches
have the model's dtype).
"""
from __future__ import annotations

import math

import pytest
import torch

from mistralpy.attention import cpu_paged
from mistralpy.attention.backend import AttentionSpec
from mistralpy.attention.torch_ref import TorchRefBackend, TorchRefMetadata
from mistralpy.worker.forward_batch import ForwardBatch

needs_ext = pytest.mark.skipif(not cpu_paged.available(), reason="CPU extension could not be built")
EPS = {torch.float32: 2e-5, torch.bfloat16: 2 ** -8 + 2e-5, torch.float16: 2 ** -11 + 2e-5}


def _case(seed: int, lens: list[int], hk: int, group: int, d: int, dtype: torch.dtype, cache_dtype: torch.dtype,
          bs: int = 16, dv: int | None = None, v_in_k: bool = False) -> dict:
    """Caches with shuffled block ids, one new token per sequence at position len - 1."""
    g = torch.Generator().manual_seed(seed)
    dv = d if dv is None else dv
    nbs = [-(-n // bs) for n in lens]
    num_blocks = sum(nbs) + 5
    perm = torch.randperm(num_blocks, generator=g)
    nb = max(nbs)
    table = torch.zeros(len(lens), nb, dtype=torch.long)   # padded with block 0, as the engine pads
    at = 0
    for i, n in enumerate(nbs):
        table[i, :n] = perm[at:at + n]
        at += n
    lens_t = torch.tensor(lens)
    slots = table[torch.arange(len(lens)), (lens_t - 1) // bs] * bs + (lens_t - 1) % bs
    # Garbage (large) everywhere, so that a key read outside its sequence's range shows.
    k_cache = (torch.randn(num_blocks, bs, hk, d, generator=g) * 3).to(cache_dtype)
    v_cache = k_cache[..., :dv] if v_in_k else (torch.randn(num_blocks, bs, hk, dv, generator=g) * 3).to(cache_dtype)
    q = torch.randn(len(lens), hk * group, d, generator=g).to(dtype)
    k = torch.randn(len(lens), hk, d, generator=g).to(dtype)
    v = k[..., :dv] if v_in_k else torch.randn(len(lens), hk, dv, generator=g).to(dtype)
    return {"q": q, "k": k, "v": v, "k_cache": k_cache, "v_cache": v_cache, "slots": slots, "table": table,
            "lens": lens_t, "bs": bs}


def _clone_caches(c: dict) -> tuple[torch.Tensor, torch.Tensor]:
    kc = c["k_cache"].clone()
    if c["v_cache"].data_ptr() == c["k_cache"].data_ptr():
        return kc, kc[..., :c["v_cache"].shape[-1]]
    return kc, c["v_cache"].clone()


def _md(c: dict) -> TorchRefMetadata:
    b = c["q"].shape[0]
    return TorchRefMetadata(slot_mapping=c["slots"], block_size=c["bs"], decode_rows=torch.arange(b),
                            decode_blocks=c["table"], decode_lens=c["lens"], decode_max_len=int(c["lens"].max()),
                            all_decode=True)


def _torch_path(c: dict, spec: AttentionSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TorchRefBackend's eager decode (the write of forward, then _decode) on copies of the caches."""
    kc, vc = _clone_caches(c)
    hk, d, dv = kc.shape[2], kc.shape[3], vc.shape[3]
    kc.view(-1, hk, d).index_copy_(0, c["slots"], c["k"].to(kc.dtype))
    vc.view(-1, hk, dv).index_copy_(0, c["slots"], c["v"].to(vc.dtype))
    if c["q"].dtype != kc.dtype and c["q"].shape[0] > 4:   # _cpu_low_precision_decode's matmuls need one dtype
        return None, kc, vc
    return TorchRefBackend()._decode(c["q"], kc, vc, _md(c), spec), kc, vc


def _oracle(c: dict, kc: torch.Tensor, vc: torch.Tensor, spec: AttentionSpec) -> torch.Tensor:
    """float64 attention per sequence over the (already written) caches."""
    q = c["q"].double()
    b, hq, _ = q.shape
    hk, bs = kc.shape[2], c["bs"]
    out = []
    for i in range(b):
        n = int(c["lens"][i])
        keys = kc[c["table"][i]].reshape(-1, hk, kc.shape[3])[:n].double()
        vals = vc[c["table"][i]].reshape(-1, hk, vc.shape[3])[:n].double()
        keys = keys.repeat_interleave(hq // hk, 1).transpose(0, 1)     # [Hq, n, D]
        vals = vals.repeat_interleave(hq // hk, 1).transpose(0, 1)
        s = torch.einsum("hd,hnd->hn", q[i], keys) * spec.scale
        if spec.logit_softcap is not None:
            s = torch.tanh(s / spec.logit_softcap) * spec.logit_softcap
        if spec.sliding_window is not None:
            s[:, : max(0, n - spec.sliding_window)] = -math.inf
        out.append(torch.einsum("hn,hnd->hd", torch.softmax(s, -1), vals))
    assert bs == kc.shape[1]
    return torch.stack(out)


def _run_op(c: dict, spec: AttentionSpec, op=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    kc, vc = _clone_caches(c)
    if op is None:
        out = cpu_paged.decode(c["q"], c["k"], c["v"], kc, vc, c["slots"], c["table"], c["lens"], spec)
    else:
        v_arg = None if cpu_paged.values_in_keys(kc, vc) else vc
        out = op(c["q"], c["k"], c["v"], kc, v_arg, c["slots"], c["table"], c["lens"], spec.scale,
                 spec.sliding_window or 0, spec.logit_softcap or 0.0)
    return out, kc, vc


def _close(out: torch.Tensor, ref: torch.Tensor, eps: float) -> None:
    err = (out.double() - ref.double()).abs().max().item()
    bound = eps * ref.double().abs().max().item()
    assert err <= bound, f"max error {err:.3g} > {bound:.3g}"


def _check(c: dict, spec: AttentionSpec, op=None) -> None:
    out, kc, vc = _run_op(c, spec, op)
    ref, rkc, rvc = _torch_path(c, spec)
    assert out.dtype == c["q"].dtype and out.shape == (*c["q"].shape[:2], vc.shape[-1])
    assert torch.equal(kc, rkc) and torch.equal(vc, rvc)       # the write, bit for bit
    dtype = c["q"].dtype
    _close(out, _oracle(c, rkc, rvc, spec), EPS[dtype])
    # The torch path's own error against the oracle (bf16 batches > 4 round scores and weights).
    if ref is not None:
        loose = 3e-2 if dtype != torch.float32 and c["q"].shape[0] > 4 else EPS[dtype] * 2
        _close(out, ref, loose)


CACHE_DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                (torch.bfloat16, torch.float32)]


@needs_ext
@pytest.mark.parametrize("dtype, cache_dtype", CACHE_DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("batch", [1, 3, 16])
@pytest.mark.parametrize("group, d", [(1, 64), (3, 128), (4, 80)])
def test_matches_torch_path(dtype, cache_dtype, batch, group, d):
    g = torch.Generator().manual_seed(batch * 7 + d)
    lens = torch.randint(1, 140, (batch,), generator=g).tolist()
    lens[0] = 37  # never a multiple of the block size
    c = _case(batch + group, lens, hk=2 if group < 4 else 3, group=group, d=d, dtype=dtype, cache_dtype=cache_dtype)
    _check(c, AttentionSpec(scale=d ** -0.5))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("window, softcap", [(19, None), (None, 5.0), (24, 3.0)])
def test_sliding_window_and_softcap(dtype, window, softcap):
    c = _case(5, [100, 7, 60, 129], hk=2, group=4, d=64, dtype=dtype, cache_dtype=dtype, bs=8)
    _check(c, AttentionSpec(scale=0.125, sliding_window=window, logit_softcap=softcap))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_mla_values_in_key_cache(dtype):
    """MLA: the v cache is a view of the k cache's first Dv channels, the values those of the key."""
    c = _case(11, [45, 3, 200], hk=1, group=16, d=576, dv=512, dtype=dtype, cache_dtype=dtype, v_in_k=True)
    assert cpu_paged.values_in_keys(c["k_cache"], c["v_cache"])
    _check(c, AttentionSpec(scale=0.07))


@needs_ext
def test_strided_rows():
    """q, k and v as views with strided last dims (the op reads them through their strides)."""
    c = _case(31, [50, 17], hk=2, group=2, d=64, dtype=torch.bfloat16, cache_dtype=torch.bfloat16)
    for name in ("q", "k", "v"):
        wide = torch.zeros(*c[name].shape[:2], 2 * c[name].shape[2], dtype=c[name].dtype)
        wide[..., ::2] = c[name]
        c[name] = wide[..., ::2]
        assert c[name].stride(-1) == 2
    _check(c, AttentionSpec(scale=0.125, sliding_window=20))


@needs_ext
def test_large_head_dim_and_threads():
    """Gemma's head dim 256 and more threads than sequences x kv heads (query groups are split)."""
    c = _case(13, [300], hk=1, group=8, d=256, dtype=torch.bfloat16, cache_dtype=torch.bfloat16, bs=32)
    prev = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        _check(c, AttentionSpec(scale=0.0625, logit_softcap=50.0))
    finally:
        torch.set_num_threads(prev)


def _forward_batch(c: dict, prefill_len: int, prefill_blocks: torch.Tensor) -> ForwardBatch:
    """A mixed step: decode rows of `c`, then one prefill chunk of `prefill_len` new tokens."""
    b, bs = c["q"].shape[0], c["bs"]
    table = torch.cat([c["table"], torch.zeros(b, max(0, len(prefill_blocks) - c["table"].shape[1]),
                                               dtype=torch.long)], 1)
    row = torch.zeros(1, table.shape[1], dtype=torch.long)
    row[0, :len(prefill_blocks)] = prefill_blocks
    pslots = prefill_blocks[torch.arange(prefill_len) // bs] * bs + torch.arange(prefill_len) % bs
    lens = c["lens"].tolist() + [prefill_len]
    return ForwardBatch(input_ids=torch.zeros(b + prefill_len, dtype=torch.long),
                        positions=torch.zeros(b + prefill_len, dtype=torch.long),
                        slot_mapping=torch.cat([c["slots"], pslots]), block_tables=torch.cat([table, row]).int(),
                        seq_lens=lens, query_lens=[1] * b + [prefill_len],
                        query_start_loc=list(range(b + 1)) + [b + prefill_len],
                        logits_indices=torch.arange(b + 1), block_size=bs)


@needs_ext
@pytest.mark.parametrize("mixed", [False, True], ids=["all_decode", "mixed"])
def test_backend_forward_uses_op(monkeypatch, mixed):
    """TorchRefBackend.forward with the op against the same call with the op disabled, all rows."""
    c = _case(17, [33, 90, 5], hk=2, group=3, d=64, dtype=torch.bfloat16, cache_dtype=torch.bfloat16, bs=16)
    num_blocks = c["k_cache"].shape[0]
    extra = torch.randn(num_blocks + 4, *c["k_cache"].shape[1:])
    c["k_cache"] = torch.cat([c["k_cache"], extra[num_blocks:].bfloat16()])
    c["v_cache"] = torch.cat([c["v_cache"], extra[:4].bfloat16()])
    b, plen = 3, 21 if mixed else 0
    pblocks = torch.arange(num_blocks, num_blocks + 2)
    batch = _forward_batch(c, plen, pblocks) if mixed else _forward_batch(c, 0, pblocks[:0])
    if not mixed:
        batch.seq_lens, batch.query_lens = batch.seq_lens[:b], batch.query_lens[:b]
        batch.query_start_loc, batch.block_tables = batch.query_start_loc[:b + 1], batch.block_tables[:b]
    g = torch.Generator().manual_seed(3)
    t = b + plen
    q = torch.randn(t, 6, 64, generator=g).bfloat16()
    k, v = torch.randn(t, 2, 64, generator=g).bfloat16(), torch.randn(t, 2, 64, generator=g).bfloat16()
    spec = AttentionSpec(scale=0.125)
    backend = TorchRefBackend()
    calls = []
    real = cpu_paged.decode
    monkeypatch.setattr(cpu_paged, "decode", lambda *a: calls.append(1) or real(*a))
    kc, vc = c["k_cache"].clone(), c["v_cache"].clone()
    out = backend.forward(q, k, v, kc, vc, backend.build_metadata(batch), spec)
    assert calls == [1]
    monkeypatch.setattr(cpu_paged, "usable", lambda *a: False)
    rkc, rvc = c["k_cache"].clone(), c["v_cache"].clone()
    ref = backend.forward(q, k, v, rkc, rvc, backend.build_metadata(batch), spec)
    assert torch.equal(kc, rkc) and torch.equal(vc, rvc)
    _close(out[:b], ref[:b], EPS[torch.bfloat16] * 2)
    assert torch.equal(out[b:], ref[b:])   # prefill rows: the torch path in both


@needs_ext
def test_compiled_call_keeps_cache_write():
    """Under torch.compile the op is one opaque call whose cache writes survive (schema aliasing)."""
    c = _case(19, [20, 50], hk=2, group=2, d=64, dtype=torch.float32, cache_dtype=torch.float32)
    spec = AttentionSpec(scale=0.125)

    def step(q, k, v, kc, vc, slots, table, lens):
        return cpu_paged.decode(q * 1.0, k, v, kc, vc, slots, table, lens, spec) + 0.0

    kc, vc = _clone_caches(c)
    out = torch.compile(step, fullgraph=True)(c["q"], c["k"], c["v"], kc, vc, c["slots"], c["table"], c["lens"])
    ref, rkc, rvc = _torch_path(c, spec)
    assert torch.equal(kc, rkc) and torch.equal(vc, rvc)
    _close(out, ref, EPS[torch.float32] * 2)


@needs_ext
def test_every_build_matches(variant_ops):
    """Each ISA build the CPU runs against the oracle, odd head dims (80, 72: vector tails)."""
    op = variant_ops[1].paged_decode.default
    for dtype, d in ((torch.float32, 80), (torch.bfloat16, 72), (torch.float16, 64)):
        c = _case(23, [1, 40, 77], hk=2, group=3, d=d, dtype=dtype, cache_dtype=dtype, bs=16)
        _check(c, AttentionSpec(scale=0.1, sliding_window=30, logit_softcap=4.0), op=op)
        _check(c, AttentionSpec(scale=0.1))


@needs_ext
def test_bad_block_id_raises():
    c = _case(29, [20], hk=1, group=1, d=64, dtype=torch.float32, cache_dtype=torch.float32)
    c["table"][0, 1] = 10_000
    with pytest.raises(RuntimeError, match="out of range"):
        _run_op(c, AttentionSpec(scale=0.125))
