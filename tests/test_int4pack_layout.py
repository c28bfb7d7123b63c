"""The int4 pack layout derived at run time, and Int4PlaneKernel's expansion through it."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from mistralpy.quant.gguf import int4pack_layout as L
from mistralpy.quant.gguf import kernels as gk
from mistralpy.quant.gguf.dequant import dequantize
from mistralpy.quant.gguf.kernels_encode import Planes, encode_planes
from tests.test_gguf_dequant import _random_raw

TOL = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2}
# One plane, two planes, Q6_K's x * 8 high plane, 16-value sub-blocks padded with a zero column.
PLANE_CASES = [(Q.Q4_0, 576), (Q.Q4_K, 512), (Q.Q8_0, 576), (Q.Q5_K, 512), (Q.Q6_K, 512), (Q.Q3_K, 256)]


def _nibbles(rows: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 16, (rows, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("k_ext", [32, 64, 96, 576, 1536, 2080])
@pytest.mark.parametrize("rows", [64, 128, 192])
def test_derived_layout_round_trips(k_ext, rows):
    layout = L.layout_for(k_ext)
    assert layout is not None, f"no layout derived for K'={k_ext} on this CPU"
    nib = _nibbles(rows, k_ext, seed=rows + k_ext)
    packed = L.pack(nib)
    assert torch.equal(layout.unpack(packed), nib)
    assert torch.equal(layout.unpack(packed, use_gather=True), nib)
    # Blocks of rows unpack on their own: the kernel expands chunks of rows.
    assert torch.equal(layout.unpack(packed[rows - 64:]), nib[rows - 64:])
    assert torch.equal(layout.unpack(packed[:64]), nib[:64])


def test_derived_layout_at_the_encoding_chunk_size():
    nib = _nibbles(4096 + 64, 32, seed=1)   # gk._ENCODE_ROWS + one block
    assert torch.equal(L.layout_for(32).unpack(L.pack(nib)), nib)


def test_gather_index_places_every_nibble():
    k_ext = 96
    layout = L.layout_for(k_ext)
    g = layout.gather
    assert g.dtype == torch.int64 and torch.equal(torch.sort(g).values, torch.arange(64 * k_ext))
    nib = _nibbles(64, k_ext, seed=3)
    b = L.pack(nib).reshape(-1)
    stream = torch.stack((b & 0x0F, b >> 4), dim=-1).reshape(-1)   # byte-major, low then high nibble
    n, k = 17, 41
    assert stream[g[n * k_ext + k]] == nib[n, k]


def test_product_semantics():
    for group in (32, 64):
        assert L.mm_semantics_ok(group)


# ------------------------------------------------------------------ other ISAs' layouts, simulated
def _avx512_pack(nib: torch.Tensor) -> torch.Tensor:
    """torch's AVX512 layout: per 64 rows and column k, 32 bytes holding rows (d, d + 32)."""
    n, k = nib.shape
    v = nib.to(torch.uint8).reshape(n // 64, 2, 32, k).permute(0, 3, 1, 2)   # [blocks, k, half, 32]
    return (v[:, :, 0] | (v[:, :, 1] << 4)).reshape(n, k // 2)


def _scalar_pack(nib: torch.Tensor) -> torch.Tensor:
    """torch's scalar layout: per 32 rows and column k, 16 bytes holding rows (2d, 2d + 1)."""
    n, k = nib.shape
    v = nib.to(torch.uint8).reshape(n // 32, 16, 2, k).permute(0, 3, 1, 2)   # [blocks, k, 16, 2]
    return (v[..., 0] | (v[..., 1] << 4)).reshape(n, k // 2)


_PERM = torch.randperm(16, generator=torch.Generator().manual_seed(9))


def _shuffled_pack(nib: torch.Tensor) -> torch.Tensor:
    """A made-up layout: 16-row sub-blocks whose rows are shuffled (the row_perm path)."""
    n, k = nib.shape
    v = nib.to(torch.uint8).reshape(n // 16, 16, k)[:, _PERM].reshape(n // 16, 8, 2, k).permute(0, 3, 1, 2)
    return (v[..., 0] | (v[..., 1] << 4)).reshape(n, k // 2)


_SCATTER = torch.randperm(64 * 96, generator=torch.Generator().manual_seed(10))


def _scattered_pack(nib: torch.Tensor) -> torch.Tensor:
    """A made-up layout with no sub-block structure, only for K' = 96: the gather path."""
    n, k = nib.shape
    s = nib.to(torch.uint8).reshape(n // 64, 64 * k)[:, _SCATTER].reshape(-1, 2)
    return (s[:, 0] | (s[:, 1] << 4)).reshape(n, k // 2)


@pytest.fixture
def fake_pack(monkeypatch):
    """Swap the packing op for a Python one (layout module and kernel); the layout cache is cleared
    around the test so the real layout is derived again afterwards."""
    def use(fn):
        monkeypatch.setattr(L, "pack", fn)
        monkeypatch.setattr(gk, "pack", fn)
        L.layout_for.cache_clear()
    yield use
    L.layout_for.cache_clear()


@pytest.mark.parametrize("fn, sub_rows, interleaved, permuted", [
    (_avx512_pack, 64, False, False), (_scalar_pack, 32, True, False), (_shuffled_pack, 16, False, True),
    (_scattered_pack, None, False, False)], ids=["avx512", "scalar", "shuffled", "scattered"])
def test_simulated_layouts_are_derived(fake_pack, fn, sub_rows, interleaved, permuted):
    fake_pack(fn)
    layout = L.layout_for(96)
    assert layout is not None
    assert (layout.sub_rows, layout.interleaved, layout.row_perm is not None) == (sub_rows, interleaved, permuted)
    nib = _nibbles(192, 96, seed=4)
    assert torch.equal(layout.unpack(fn(nib)), nib)
    assert torch.equal(layout.unpack(fn(nib), use_gather=True), nib)


def _per_128_rows(nib: torch.Tensor) -> torch.Tensor:
    """Blocks of 128 rows (d, d + 64): not a permutation within 64-row blocks."""
    n, k = nib.shape
    if n % 128:
        raise RuntimeError("N must be a multiple of 128")   # as a real op could reject the shape
    v = nib.to(torch.uint8).reshape(n // 128, 2, 64, k).permute(0, 3, 1, 2)
    return (v[:, :, 0] | (v[:, :, 1] << 4)).reshape(n, k // 2)


def _varying_blocks(nib: torch.Tensor) -> torch.Tensor:
    """The first block laid out one way, the others another."""
    return torch.cat((_avx512_pack(nib[:64]), _scalar_pack(nib[64:])))


def _xor_values(nib: torch.Tensor) -> torch.Tensor:
    """A value transform (nibble ^ 8): no permutation of nibbles explains it."""
    return _avx512_pack(nib.to(torch.uint8) ^ 8)


def _missing_op(nib: torch.Tensor) -> torch.Tensor:
    raise AttributeError("no _convert_weight_to_int4pack_for_cpu")


@pytest.mark.parametrize("fn", [_per_128_rows, _varying_blocks, _xor_values, _missing_op],
                         ids=["128-row blocks", "varying", "xor", "missing"])
def test_underivable_layouts_refuse_the_kernel(fake_pack, fn):
    fake_pack(fn)
    assert L.layout_for(96) is None
    raw = torch.from_numpy(_random_raw(Q.Q4_0, 64, 96, np.random.default_rng(0)).copy())   # K' = 96
    with pytest.raises(RuntimeError, match="int4 packing"):
        gk.Int4PlaneKernel.from_gguf(raw, Q.Q4_0, 64, 96, torch.float32)
    # make_gguf_kernel (the CPU extension is bf16 only) falls back to dequantizing.
    kern = gk.make_gguf_kernel(raw, Q.Q4_0, 64, 96, dtype=torch.float32, device=torch.device("cpu"))
    assert not isinstance(kern, gk.Int4PlaneKernel)


def test_wrong_product_semantics_refuse_bf16_kernels(monkeypatch):
    monkeypatch.setattr(gk, "mm_semantics_ok", lambda group: False)
    raw = torch.from_numpy(_random_raw(Q.Q4_0, 64, 64, np.random.default_rng(0)).copy())
    with pytest.raises(RuntimeError, match="int4 mm"):
        gk.Int4PlaneKernel.from_gguf(raw, Q.Q4_0, 64, 64, torch.bfloat16)
    gk.Int4PlaneKernel.from_gguf(raw, Q.Q4_0, 64, 64, torch.float32)   # float32 never calls the mm


# ------------------------------------------------------------------ the kernel against references
def _planes_reference(p: Planes, k: int, group: int, round_sz: torch.dtype) -> torch.Tensor:
    """W [N, K] from the planes by their documented meaning: W' = (nib - 8) * scale + zero per group,
    then W[:, j] = sum of W'[:, k'] * mult[k'] over the k' with idx[k'] = j (idx = K: padding)."""
    n, k_ext = p.nib.shape
    s, z = p.scale.to(round_sz).float(), p.zero.to(round_sz).float()
    w = ((p.nib.float() - 8).reshape(n, -1, group) * s.unsqueeze(-1) + z.unsqueeze(-1)).reshape(n, k_ext)
    if p.idx is None:
        return w
    if p.mult is not None:
        w = w * p.mult
    return torch.zeros(n, k + 1).index_add_(1, p.idx.long(), w)[:, :k]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("qtype, k", PLANE_CASES, ids=lambda v: getattr(v, "name", str(v)))
def test_expand_matches_the_planes(qtype, k, dtype):
    n = 200   # four blocks of 64, the last one padded
    raw = torch.from_numpy(_random_raw(qtype, n, k, np.random.default_rng(int(qtype))).copy())
    kern = gk.Int4PlaneKernel.from_gguf(raw, qtype, n, k, dtype)
    ref = _planes_reference(encode_planes(raw, qtype, k), k, 32, dtype)
    w = kern.dequantized()
    assert w.dtype == torch.float32 and tuple(w.shape) == (n, k)
    assert _rel(w, ref) <= 1e-6
    assert torch.equal(kern.expand(64, 192), w[64:192])   # a chunk of rows from inside
    if dtype == torch.float32:
        assert _rel(w, dequantize(raw, qtype, (n, k))) <= 1e-6


def test_expand_matches_random_hqq_style_planes():
    """Planes as HQQ builds them (groups of 64, no gather), random values, chunks of 128 rows."""
    gen = torch.Generator().manual_seed(11)
    n, k, group = 320, 384, 64
    nib = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
    scale = torch.rand(n, k // group, generator=gen) * 0.1
    zero = torch.randn(n, k // group, generator=gen)
    chunks = [Planes(nib[s:s + 128], scale[s:s + 128], zero[s:s + 128], None, None, None) for s in range(0, n, 128)]
    kern = gk.Int4PlaneKernel(chunks, Q.Q4_0, n, k, torch.float32, group=group)
    ref = _planes_reference(Planes(nib, scale, zero, None, None, None), k, group, torch.float32)
    assert _rel(kern.dequantized(), ref) <= 1e-6


@pytest.mark.parametrize("fn", [_avx512_pack, _scalar_pack, _shuffled_pack], ids=["avx512", "scalar", "shuffled"])
def test_f32_kernel_under_simulated_layouts(fake_pack, fn):
    """The float32 kernel only expands (no int4 mm), so any derivable layout must give the weight."""
    fake_pack(fn)
    qtype, n, k = Q.Q8_0, 130, 576
    raw = torch.from_numpy(_random_raw(qtype, n, k, np.random.default_rng(12)).copy())
    kern = gk.Int4PlaneKernel.from_gguf(raw, qtype, n, k, torch.float32)
    assert _rel(kern.dequantized(), dequantize(raw, qtype, (n, k))) <= 1e-6


@pytest.mark.parametrize("dtype, rows", [(torch.float32, (1, 3, 17, 130)), (torch.bfloat16, (3, 133))],
                         ids=["f32", "bf16"])
@pytest.mark.parametrize("qtype, k", PLANE_CASES, ids=lambda v: getattr(v, "name", str(v)))
def test_kernel_matches_dequantize_matmul(qtype, k, dtype, rows, monkeypatch):
    monkeypatch.setattr(gk, "_CHUNK_ELEMS", 64 * 2 * k)   # several chunks of rows in the expanded path
    n = 200
    raw = torch.from_numpy(_random_raw(qtype, n, k, np.random.default_rng(int(qtype) + 1)).copy())
    w = dequantize(raw, qtype, (n, k))
    kern = gk.Int4PlaneKernel.from_gguf(raw, qtype, n, k, dtype)
    gen = torch.Generator().manual_seed(13)
    for m in rows:   # bf16: 3 rows take the int4 mm, 133 the expanded path
        x = torch.randn(m, k, generator=gen).to(dtype)
        y = kern(x)
        assert y.dtype == dtype and tuple(y.shape) == (m, n)
        err = _rel(y, x.float() @ w.t())
        assert err <= TOL[dtype], f"{qtype.name} {dtype} M={m}: relative error {err:.2e}"
