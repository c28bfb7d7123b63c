"""GGUF block dequantization: bit-exact against gguf.quants on random blocks and on a real file."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants

from mistralpy.quant.gguf.dequant import BLOCK_SIZES, SUPPORTED_TYPES, block_size, dequantize, nbytes, type_size
from tests.assets import smollm2_gguf_path

# Byte offsets of the f16 scale fields of each block: filled with finite values (random bytes could
# be NaN/inf, whose payloads need not survive every conversion path).
_F16_FIELDS = {Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q8_0: [0], Q.Q2_K: [80, 82],
               Q.Q3_K: [108], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208], Q.IQ4_NL: [0], Q.IQ4_XS: [0]}


def _random_raw(qtype: Q, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    bs, ts = BLOCK_SIZES[qtype]
    n = rows * cols // bs
    if qtype == Q.F32:
        return rng.standard_normal(rows * cols).astype(np.float32).view(np.uint8).reshape(rows, -1)
    if qtype == Q.F16:
        return rng.standard_normal(rows * cols).astype(np.float16).view(np.uint8).reshape(rows, -1)
    if qtype == Q.BF16:
        bits = (rng.standard_normal(rows * cols).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
        return bits.view(np.uint8).reshape(rows, -1)
    raw = rng.integers(0, 256, size=(n, ts), dtype=np.uint8)
    if qtype == Q.Q8_K:  # an f32 scale
        scale = rng.standard_normal(n) * rng.choice([1e-6, 1e-3, 1.0, 300.0], n)
        raw[:, :4] = scale.astype(np.float32).view(np.uint8).reshape(n, 4)
    for off in _F16_FIELDS.get(qtype, ()):
        # Scales over several magnitudes, signs and subnormals included.
        scale = rng.standard_normal(n) * rng.choice([1e-6, 1e-3, 1.0, 300.0], n)
        raw[:, off:off + 2] = scale.astype(np.float16).view(np.uint8).reshape(n, 2)
    return raw.reshape(rows, -1)


def test_tables_cover_the_issue_types():
    want = {Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K,
            Q.Q6_K, Q.IQ4_NL, Q.IQ4_XS, Q.Q8_K}
    assert SUPPORTED_TYPES == want
    from gguf.constants import GGML_QUANT_SIZES

    for q in want:
        assert (block_size(q), type_size(q)) == GGML_QUANT_SIZES[q], q.name
    assert nbytes(Q.Q4_K, (3, 512)) == 3 * 2 * 144
    with pytest.raises(ValueError):
        nbytes(Q.Q4_K, (3, 100))


@pytest.mark.parametrize("qtype", sorted(SUPPORTED_TYPES - {Q.Q8_K}, key=int), ids=lambda q: q.name)
def test_bit_exact_against_gguf_on_random_blocks(qtype):
    rng = np.random.default_rng(int(qtype))
    bs = block_size(qtype)
    rows, cols = 6, max(bs, 32) * 4
    raw = _random_raw(qtype, rows, cols, rng)
    ref = quants.dequantize(raw, qtype)
    got = dequantize(torch.from_numpy(raw.copy()), qtype, (rows, cols))
    assert got.dtype == torch.float32 and tuple(got.shape) == ref.shape == (rows, cols)
    assert np.array_equal(got.numpy().view(np.uint32), ref.view(np.uint32))


def test_q8_k_by_construction():
    """gguf.quants has no Q8_K: ggml's dequantize_row_q8_K is y = d * q (f32 d, int8 q), per 256 values."""
    rng = np.random.default_rng(11)
    raw = _random_raw(Q.Q8_K, 3, 512, rng)
    blocks = raw.reshape(-1, 292)
    d = blocks[:, :4].copy().view(np.float32)
    q = blocks[:, 4:260].copy().view(np.int8).astype(np.float32)
    want = (d * q).reshape(3, 512)
    got = dequantize(torch.from_numpy(raw.copy()), Q.Q8_K, (3, 512))
    assert np.array_equal(got.numpy().view(np.uint32), want.view(np.uint32))


def test_chunked_path_and_errors(monkeypatch):
    import mistralpy.quant.gguf.dequant as gd

    rng = np.random.default_rng(1)
    raw = _random_raw(Q.Q4_K, 4, 1024, rng)
    whole = dequantize(torch.from_numpy(raw.copy()), Q.Q4_K, (4, 1024))
    monkeypatch.setattr(gd, "_CHUNK_BLOCKS", 3)
    assert torch.equal(dequantize(torch.from_numpy(raw.copy()), Q.Q4_K, (4, 1024)), whole)
    with pytest.raises(ValueError):
        dequantize(torch.from_numpy(raw.copy()), Q.Q4_K, (4, 768))
    with pytest.raises(NotImplementedError):
        dequantize(torch.zeros(66, dtype=torch.uint8), Q.IQ2_XXS, (1, 256))


def test_bit_exact_on_real_smollm2_tensors():
    from gguf import GGUFReader

    reader = GGUFReader(smollm2_gguf_path())
    seen = set()
    for t in reader.tensors:
        qtype = Q(t.tensor_type)
        # One tensor of each type and each kind of layer-0 / global weight keeps this fast.
        kind = (qtype, t.name.split(".")[-2] if t.name.startswith("blk.0.") else t.name)
        if not (t.name.startswith("blk.0.") or not t.name.startswith("blk.")) or kind in seen:
            continue
        seen.add(kind)
        data = t.data[:1024]  # the first rows: the 49152-row embedding would dominate the time
        shape = (data.shape[0], int(t.shape[0])) if data.ndim == 2 else (int(t.shape[0]),)
        ref = quants.dequantize(data, qtype).reshape(shape)
        raw = torch.from_numpy(np.ascontiguousarray(data).view(np.uint8).reshape(-1).copy())
        got = dequantize(raw, qtype, shape)
        assert np.array_equal(got.numpy().view(np.uint32), ref.view(np.uint32)), t.name
    assert any(q == Q.Q4_1 for q, _ in seen)
