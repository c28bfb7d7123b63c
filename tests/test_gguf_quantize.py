"""ISQ encoders: legacy types bit-exact with gguf.quants, round-trip error bounds for every type, and
agreement with llama.cpp's own quantizer (`llama_model_quantize`) on a tiny llama GGUF."""
from __future__ import annotations

import ctypes
import logging

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants

import mistralpy.quant.gguf.quantize as gq
from mistralpy.quant.gguf.dequant import BLOCK_SIZES, dequantize, nbytes
from mistralpy.quant.gguf.quantize import QUANTIZABLE_TYPES, quantize

logger = logging.getLogger(__name__)

LEGACY = (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0)
ALL_TYPES = sorted(QUANTIZABLE_TYPES, key=int)

# Relative RMSE bounds on Gaussian weights (measured values in the gguf_quantize docstring, ~+5%).
RMSE_BOUND = {Q.Q8_0: 0.0056, Q.Q8_K: 0.0073, Q.Q6_K: 0.0186, Q.Q5_0: 0.045, Q.Q5_1: 0.040, Q.Q5_K: 0.038,
              Q.Q4_0: 0.090, Q.Q4_1: 0.082, Q.Q4_K: 0.075, Q.IQ4_NL: 0.080, Q.IQ4_XS: 0.080,
              Q.Q3_K: 0.159, Q.Q2_K: 0.311}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The encoders run many mid-size ops: on 2 shared cores, OpenMP barriers with a descheduled
    thread make them 5-20x slower than one thread, so the tests (and timings) use one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _weights(rows: int, cols: int, seed: int, specials: bool = True) -> np.ndarray:
    """Gaussian weights; with `specials`, a zero row, a constant row, a positive-only row and outliers."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    if specials:
        w[1] = 0
        w[2] = -0.75
        w[3] = np.abs(w[3]) + 0.1
        w[4, ::37] *= 40
        w[5, :cols // 2] *= 1e-20  # below ggml's all-zero group threshold
    return w


def _rel_rmse(raw: torch.Tensor, qtype: Q, w: np.ndarray) -> float:
    back = dequantize(raw, qtype, w.shape).numpy()
    return float(np.sqrt(((back - w) ** 2).mean() / (w ** 2).mean()))


@pytest.mark.parametrize("qtype", LEGACY, ids=lambda q: q.name)
def test_legacy_types_bit_exact_with_gguf(qtype):
    w = _weights(48, 1024, int(qtype))
    got = quantize(torch.from_numpy(w), qtype)
    assert got.dtype == torch.uint8 and tuple(got.shape) == (48, nbytes(qtype, (1, 1024)))
    assert np.array_equal(got.numpy(), quants.quantize(w, qtype))


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda q: q.name)
def test_round_trip_error(qtype):
    w = _weights(128, 4096, 7, specials=False)
    err = _rel_rmse(quantize(torch.from_numpy(w), qtype), qtype, w)
    logger.info("%s relative RMSE %.4f%%", qtype.name, 100 * err)
    assert err < RMSE_BOUND[qtype]
    # Special rows (zeros, constants, outliers, near-zero groups) decode finite and close.
    s = _weights(8, 512, 3)
    back = dequantize(quantize(torch.from_numpy(s), qtype), qtype, s.shape).numpy()
    assert np.isfinite(back).all()
    assert np.array_equal(back[1], np.zeros(512, np.float32))
    assert np.abs(back[2] + 0.75).max() < 0.02
    assert _rel_rmse(quantize(torch.from_numpy(s[6:]), qtype), qtype, s[6:]) < RMSE_BOUND[qtype]


def test_input_dtypes_chunking_and_errors(monkeypatch):
    w = torch.from_numpy(_weights(16, 512, 11))
    for qtype in (Q.Q4_K, Q.Q3_K, Q.IQ4_XS, Q.Q8_0):
        whole = quantize(w, qtype)
        assert torch.equal(quantize(w.to(torch.bfloat16), qtype), quantize(w.to(torch.bfloat16).float(), qtype))
        assert torch.equal(quantize(w.t().contiguous().t(), qtype), whole)  # non-contiguous input
        enc, _ = gq._ENCODERS[qtype]
        monkeypatch.setitem(gq._ENCODERS, qtype, (enc, 1))  # one block per chunk
        assert torch.equal(quantize(w, qtype), whole)
    with pytest.raises(ValueError, match="multiple"):
        quantize(torch.zeros(4, 300), Q.Q4_K)
    with pytest.raises(ValueError, match="multiple"):
        quantize(torch.zeros(4, 48), Q.Q8_0)
    with pytest.raises(ValueError, match="cannot quantize"):
        quantize(torch.zeros(4, 256), Q.IQ2_XXS)
    assert Q.IQ2_XXS not in QUANTIZABLE_TYPES and QUANTIZABLE_TYPES >= set(LEGACY) | {Q.Q8_K}


def _q8_k_ggml(x: np.ndarray) -> bytes:
    """A scalar port of ggml's quantize_row_q8_K_ref (float32 throughout, nearest_int = half-to-even)."""
    out = bytearray()
    for blk in x.reshape(-1, 256):
        amax, vmax = np.float32(0), np.float32(0)
        for v in blk:
            if abs(v) > amax:
                amax, vmax = abs(v), v
        if amax == 0:
            out += np.float32(0).tobytes() + bytes(256) + bytes(32)
            continue
        iscale = np.float32(-127.0) / vmax
        q = np.minimum(127, np.rint(iscale * blk)).astype(np.int8)
        bsums = q.astype(np.int32).reshape(16, 16).sum(axis=1).astype(np.int16)
        out += (np.float32(1) / iscale).tobytes() + q.tobytes() + bsums.tobytes()
    return bytes(out)


def test_q8_k_matches_ggml_reference():
    w = _weights(8, 512, 13)
    w[0, 7] = w[0, 3] = -np.abs(w[0]).max() * 1.5   # a tie for the signed max: the first one wins
    got = quantize(torch.from_numpy(w), Q.Q8_K)
    assert tuple(got.shape) == (8, 2 * 292)
    assert got.numpy().tobytes() == _q8_k_ggml(w)


# ---------------------------------------------------------------------------------- llama.cpp
_LLAMA_FTYPES = ("Q4_K_M", "Q6_K", "Q2_K", "Q3_K_S", "Q5_K_S", "IQ4_NL", "IQ4_XS")


def _write_tiny_llama(path: str, hidden: int = 256, ffn: int = 512, vocab: int = 256) -> dict[str, np.ndarray]:
    """An F32 llama GGUF with 1 layer: all llama.cpp needs to run its quantizer over the tensors."""
    import gguf

    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_block_count(1)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hidden // 4)
    w.add_file_type(0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([bytes([i]).decode("latin-1") for i in range(vocab)])
    w.add_token_types([1] * vocab)
    w.add_token_merges([])
    shapes = {"token_embd.weight": (vocab, hidden), "output.weight": (vocab, hidden),
              "blk.0.ffn_gate.weight": (ffn, hidden), "blk.0.ffn_up.weight": (ffn, hidden),
              "blk.0.ffn_down.weight": (hidden, ffn)}
    shapes.update({f"blk.0.attn_{n}.weight": (hidden, hidden) for n in ("q", "k", "v", "output")})
    weights = {}
    for name, shape in shapes.items():
        weights[name] = (rng.standard_normal(shape) * 0.02).astype(np.float32)
        w.add_tensor(name, weights[name])
    for name in ("output_norm.weight", "blk.0.attn_norm.weight", "blk.0.ffn_norm.weight"):
        w.add_tensor(name, np.ones(hidden, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return weights


@pytest.fixture(scope="module")
def llama_quantized(tmp_path_factory):
    """{ftype: (reader of llama.cpp's output, source weights)}."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import gguf

    folder = tmp_path_factory.mktemp("llama_quant")
    src = str(folder / "f32.gguf")
    weights = _write_tiny_llama(src)
    out = {}
    for ftype in _LLAMA_FTYPES:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
        params.nthread = 1
        dst = str(folder / f"{ftype}.gguf")
        assert llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)) == 0
        out[ftype] = gguf.GGUFReader(dst)
    return out, weights


@pytest.mark.parametrize("ftype", _LLAMA_FTYPES)
def test_matches_llama_cpp_quantizer(llama_quantized, ftype):
    readers, weights = llama_quantized
    seen = set()
    for t in readers[ftype].tensors:
        qtype = Q(t.tensor_type)
        if qtype == Q.F32:
            continue
        w = weights[t.name]
        theirs = torch.from_numpy(np.array(t.data).reshape(w.shape[0], -1).copy())
        ours = quantize(torch.from_numpy(w), qtype)
        assert ours.shape == theirs.shape, t.name
        ts = BLOCK_SIZES[qtype][1]
        same = (ours.reshape(-1, ts) == theirs.reshape(-1, ts)).all(dim=1).double().mean().item()
        e_ours, e_theirs = _rel_rmse(ours, qtype, w), _rel_rmse(theirs, qtype, w)
        logger.info("%s %s %s: RMSE ours %.5f llama.cpp %.5f, identical blocks %.1f%%",
                    ftype, t.name, qtype.name, e_ours, e_theirs, 100 * same)
        assert e_ours <= 1.01 * e_theirs, (t.name, e_ours, e_theirs)
        assert same >= 0.9, (t.name, same)  # the rest differ only on float near-ties
        seen.add(qtype)
    assert seen  # llama.cpp really quantized something (widths are multiples of 256)
