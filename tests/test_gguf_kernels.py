"""GGUF matmul kernels against the reference: dequantize (bit-exact with gguf) + float32 matmul."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants

from mistralpy.quant.gguf import kernels as gk
from mistralpy.quant.gguf.dequant import BLOCK_SIZES, SUPPORTED_TYPES, dequantize
from mistralpy.quant.gguf.kernels import dequantize_kernel_weight, make_gguf_kernel
from mistralpy.quant.gguf.kernels_cpu import CpuQMatmulKernel
from tests.test_gguf_dequant import _random_raw

CPU = torch.device("cpu")
# Max |kernel - reference| / max |reference| per compute dtype (see the module docstring).
TOL = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2}
# The int8-activation kernel (CpuQMatmulKernel) errs like llama.cpp's CPU backend: on random blocks with
# extreme scales up to ~2e-2 of max |y| at one row; tests/test_cpu_kernels.py holds it to llama.cpp's
# own semantics within 2e-6.
INT8_ACT_TOL = 3e-2
ALL_TYPES = sorted(SUPPORTED_TYPES, key=int)
GGUF_WRITABLE = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0]


def _check(raw: np.ndarray | torch.Tensor, qtype: Q, n: int, k: int, dtype: torch.dtype,
           rows=(1, 3, 17), seed: int = 0) -> gk.GGUFKernel:
    raw_t = torch.from_numpy(np.array(raw, copy=True)) if isinstance(raw, np.ndarray) else raw
    w = dequantize(raw_t, qtype, (n, k))
    kern = make_gguf_kernel(raw_t, qtype, n, k, dtype=dtype, device=CPU)
    assert (kern.qtype, kern.out_features, kern.in_features) == (qtype, n, k)
    w_k = dequantize_kernel_weight(kern)
    assert tuple(w_k.shape) == (n, k)
    assert ((w_k - w).abs().max() / w.abs().max()).item() <= (1e-6 if dtype == torch.float32 else 1e-2)
    gen = torch.Generator().manual_seed(seed)
    for m in rows:
        x = torch.randn(m, k, generator=gen).to(dtype)
        ref = x.float() @ w.t()
        y = kern(x)
        assert y.dtype == dtype and tuple(y.shape) == (m, n)
        err = ((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
        tol = INT8_ACT_TOL if isinstance(kern, CpuQMatmulKernel) else TOL[dtype]
        assert err <= tol, f"{qtype.name} {dtype} M={m}: relative error {err:.2e}"
    return kern


def _k_for(qtype: Q) -> list[int]:
    # K = 576 is not a multiple of 256: only the 32-value block types take it.
    return [256, 576] if BLOCK_SIZES[qtype][0] <= 32 else [256, 512]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda q: q.name)
def test_random_blocks(qtype, dtype):
    rng = np.random.default_rng(int(qtype))
    for k in _k_for(qtype):
        _check(_random_raw(qtype, 80, k, rng), qtype, 80, k, dtype)   # 80 rows: not a multiple of 64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("qtype", GGUF_WRITABLE, ids=lambda q: q.name)
def test_blocks_quantized_by_gguf(qtype, dtype):
    rng = np.random.default_rng(7)
    for k in (256, 576):
        w = (rng.standard_normal((64, k)) * 0.02).astype(np.float32)
        w[:, :8] *= 10  # a few outlier columns, as in real projections
        _check(quants.quantize(w, qtype), qtype, 64, k, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_prefill_rows_take_the_expanded_path(dtype, monkeypatch):
    rng = np.random.default_rng(3)
    monkeypatch.setattr(gk, "_CHUNK_ELEMS", 64 * 512)  # several chunks of rows
    for qtype in (Q.Q4_K, Q.Q6_K, Q.Q8_0):
        k = 512
        _check(_random_raw(qtype, 192, k, rng), qtype, 192, k, dtype, rows=(gk._DENSE_MIN_ROWS + 5,))


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda q: q.name)
def test_memory_stays_quantized(qtype):
    """No float copy kept: bytes held stay near the raw size (well under a bf16 copy)."""
    rng = np.random.default_rng(1)
    n, k = 256, 512
    raw = _random_raw(qtype, n, k, rng)
    kern = make_gguf_kernel(torch.from_numpy(raw.copy()), qtype, n, k, dtype=torch.bfloat16, device=CPU)
    held, raw_bytes = kern.nbytes(), raw.nbytes
    if qtype in (Q.F32, Q.F16, Q.BF16):
        assert held == n * k * 2
        return
    if isinstance(kern, CpuQMatmulKernel):
        # u (4, 5 or 8 bits) + a scale and offset (f16 where exact, else f32) per group of 32 (or of 16).
        from mistralpy.quant.gguf.kernels_cpu import FORMATS

        bits, f32, groups, has_m = FORMATS[kern.fmt]
        scale_bytes = 4 if bits == 6 else groups * (4 if f32 else 2) * (1 + has_m)   # Q6_K: f16 d + 2 int8 sc
        assert held == n * k * (bits / 8 + scale_bytes / 32)
        assert held < 0.7 * n * k * 2
        return
    # The int4 planes: 0.5 byte a weight for 4-bit types, 1 for the split / padded ones, plus a bf16
    # scale and zero per group of 32 plane values.
    one_plane = qtype in (Q.Q4_0, Q.Q4_1, Q.Q4_K)
    expect = n * k * (0.5 + 4 / 32) * (1 if one_plane else 2)
    assert held <= 1.05 * expect + 16 * k, (held, expect)
    assert held < 0.7 * n * k * 2           # well under a bf16 copy
    if one_plane:
        assert held <= 1.25 * raw_bytes


def test_dequantize_kernel_weight_and_generic_path():
    rng = np.random.default_rng(5)
    raw = torch.from_numpy(_random_raw(Q.Q5_K, 64, 512, rng).copy())
    ref = dequantize(raw, Q.Q5_K, (64, 512))
    kern = make_gguf_kernel(raw, Q.Q5_K, 64, 512, dtype=torch.float32, device=CPU)
    assert torch.allclose(dequantize_kernel_weight(kern), ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())
    # The device-generic path (what a CUDA device gets) keeps the raw bytes and is exact in float32.
    generic = gk.RawDequantKernel(raw, Q.Q5_K, 64, 512, torch.float32)
    assert generic.nbytes() == raw.numel()
    assert torch.equal(dequantize_kernel_weight(generic), ref)
    x = torch.randn(3, 512)
    assert torch.allclose(generic(x), x @ ref.t(), rtol=1e-5, atol=1e-5 * (x @ ref.t()).abs().max().item())


def test_leading_dims_and_errors():
    rng = np.random.default_rng(2)
    raw = torch.from_numpy(_random_raw(Q.Q4_0, 64, 64, rng).copy())
    kern = make_gguf_kernel(raw, Q.Q4_0, 64, 64, dtype=torch.bfloat16, device=CPU)
    assert tuple(kern(torch.randn(2, 3, 64).bfloat16()).shape) == (2, 3, 64)
    assert tuple(kern(torch.randn(0, 64).bfloat16()).shape) == (0, 64)
    x = torch.randn(64, 5).bfloat16().t()   # a strided view is fine
    assert torch.equal(kern(x), kern(x.contiguous()))
    with pytest.raises(ValueError):
        make_gguf_kernel(raw, Q.Q4_0, 64, 96, dtype=torch.bfloat16, device=CPU)
    with pytest.raises(NotImplementedError):
        make_gguf_kernel(raw, Q.IQ2_XXS, 64, 256, dtype=torch.bfloat16, device=CPU)


@pytest.fixture(scope="module")
def smollm2_reader():
    from gguf import GGUFReader

    from tests.assets import smollm2_gguf_path

    return GGUFReader(smollm2_gguf_path())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_real_smollm2_tensors(dtype, smollm2_reader):
    """Layer-0 projections (Q4_1 here) and the first rows of the Q8_0 token embedding of the real file."""
    seen = set()
    for t in smollm2_reader.tensors:
        qtype = Q(t.tensor_type)
        if qtype in (Q.F32, Q.F16) or len(t.shape) != 2 or qtype in seen:
            continue
        if not (t.name.startswith("blk.0.") or t.name == "token_embd.weight"):
            continue
        seen.add(qtype)
        data = np.ascontiguousarray(t.data[:512])
        _check(data.view(np.uint8).reshape(data.shape[0], -1), qtype, data.shape[0], int(t.shape[0]), dtype)
    assert Q.Q4_1 in seen


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q8_0, Q.Q6_K, Q.F16], ids=lambda q: q.name)
def test_cuda_generic_path(qtype):
    rng = np.random.default_rng(4)
    n, k = 128, 512
    raw = torch.from_numpy(_random_raw(qtype, n, k, rng).copy())
    w = dequantize(raw, qtype, (n, k))
    dev = torch.device("cuda")
    kern = make_gguf_kernel(raw.to(dev), qtype, n, k, dtype=torch.bfloat16, device=dev)
    x = torch.randn(5, k).bfloat16()
    y = kern(x.to(dev))
    assert y.device.type == "cuda" and y.dtype == torch.bfloat16
    ref = x.float() @ w.t()
    assert ((y.float().cpu() - ref).abs().max() / ref.abs().max()).item() <= TOL[torch.bfloat16]


@pytest.mark.parametrize("qtype", sorted(gk.PLANE_TYPES, key=int), ids=lambda q: q.name)
def test_fast_extension_matches_the_plane_index(qtype):
    """The kernel's one-op x -> x' equals the documented gather x_ext[:, idx] * mult."""
    from mistralpy.quant.gguf.kernels_encode import encode_planes

    rng = np.random.default_rng(6)
    k = 512
    raw = torch.from_numpy(_random_raw(qtype, 64, k, rng).copy())
    kern = gk.Int4PlaneKernel.from_gguf(raw, qtype, 64, k, torch.bfloat16)
    planes = encode_planes(raw, qtype, k)
    x = torch.randn(3, k).bfloat16()
    want = x if planes.idx is None else torch.nn.functional.pad(x, (0, 1))[:, planes.idx.long()]
    if planes.mult is not None:
        want = want * planes.mult.bfloat16()
    assert torch.equal(kern._extend(x), want)


def test_small_shapes():
    rng = np.random.default_rng(8)
    for qtype, n, k in ((Q.Q4_0, 16, 32), (Q.Q8_0, 48, 96), (Q.Q6_K, 16, 768)):
        _check(_random_raw(qtype, n, k, rng), qtype, n, k, torch.bfloat16, rows=(1, 5, 200))
