"""K-quant and IQ4 block encoders for `gguf.quantize`, vectorized over blocks.

These follow the reference quantizers of llama.cpp (ggml-quants.c, the paths taken when no
importance matrix is given): the per-group scale searches (`make_qkx2_quants` for Q2_K/Q4_K/Q5_K,
`make_q3_quants` for Q3_K, `make_qx_quants` for Q6_K, the IQ4 scale search), then the 6/8-bit
quantization of the group scales against one f16 super-block scale and a final re-quantization of
every value with the stored scales. The float operations are done in the same order as the C code
(divisions stay divisions, `nearest_int` is round-half-to-even); only the order of the sums over a
group differs (torch reduces pairwise), so the choice between two nearly equal candidates can
differ in a few blocks.

Every encoder takes [n_blocks, block_size] float32 and returns [n_blocks, type_size] uint8, laid
out as ggml-common.h (and `gguf.dequant`) reads them.
"""
from __future__ import annotations

import numpy as np
import torch

from mistralpy.quant.gguf.dequant import IQ4NL_VALUES, QK_K

GROUP_MAX_EPS = 1e-15  # groups whose |max| is below this are all-zero in ggml


# ---------------------------------------------------------------------------------- small helpers
def rdiv(c: float, t: torch.Tensor) -> torch.Tensor:
    """c / t as a true f32 division (torch's `c / t` multiplies by the reciprocal: not exact)."""
    return torch.full_like(t, c) / t


def f16_bytes(d: torch.Tensor) -> torch.Tensor:
    """[n] float32 -> [n, 2] uint8: the little-endian f16 (round to nearest even, as ggml)."""
    return d.reshape(-1, 1).to(torch.float16).view(torch.uint8)


def f16_round(d: torch.Tensor) -> torch.Tensor:
    """The f32 value a stored f16 scale reads back as."""
    return d.to(torch.float16).to(torch.float32)


def pack_nibbles(q: torch.Tensor, group: int) -> torch.Tensor:
    """[n, 2k] values < 16 -> [n, k] bytes: per 2*group values, the first group in the low nibbles."""
    n = q.shape[0]
    q = q.to(torch.uint8).reshape(n, -1, 2, group)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, -1)


def pack_bits(q: torch.Tensor, width: int, group: int) -> torch.Tensor:
    """[n, m] values < 2**width -> bytes: per `group` bytes, field s of byte j is value s*group + j."""
    n = q.shape[0]
    per = 8 // width
    shifts = torch.arange(0, 8, width, dtype=torch.int32, device=q.device).reshape(1, 1, per, 1)
    fields = q.to(torch.int32).reshape(n, -1, per, group) << shifts
    return fields.sum(dim=2).to(torch.uint8).reshape(n, -1)


def signed_absmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(|max|, the signed value) over the last dim; the first one on ties, as the C loops."""
    idx = x.abs().argmax(dim=-1, keepdim=True)
    v = x.gather(-1, idx).squeeze(-1)
    return v.abs(), v


def _f32(values: list[float]) -> torch.Tensor:
    return torch.tensor(np.asarray(values, dtype=np.float32))


def _gather_best(l: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
    """[G, C, n] candidates, [G] index -> [G, n]."""
    g, _, n = l.shape
    return l.gather(1, best.reshape(g, 1, 1).expand(g, 1, n)).squeeze(1)


# ---------------------------------------------------------------------------------- scale searches
def make_qkx2(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
              use_mad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric (scale, min) fit per group (make_qkx2_quants): x, w [G, n] -> scale, -min, L.

    Starts from the min/max grid, then tries nstep+1 stretched grids, each refitted by weighted
    least squares, keeping the one with the smallest weighted error. As in ggml, each grid is laid
    from the best min found so far, so the candidates are tried in sequence (vectorized over groups).
    """
    xmin = x.amin(dim=-1, keepdim=True).clamp(max=0.0)
    xmax = x.amax(dim=-1, keepdim=True)
    sum_w = w.sum(dim=-1, keepdim=True)
    sum_x = (w * x).sum(dim=-1, keepdim=True)
    flat = xmax == xmin
    mn = xmin
    iscale = rdiv(float(nmax), torch.where(flat, torch.ones_like(xmax), xmax - xmin))
    l = (iscale * (x - mn)).round_().clamp_(0, nmax)
    scale = 1 / iscale

    def error(s: torch.Tensor, m: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        diff = s * q + m - x
        diff = diff.abs_() if use_mad else diff.square_()
        return diff.mul_(w).sum(dim=-1, keepdim=True)

    best = error(scale, mn, l)
    for k in range(nstep + 1):
        factor = float(np.float32(rmin) + np.float32(rdelta) * np.float32(k) + np.float32(nmax))
        iscale = rdiv(factor, xmax - mn)
        q = (iscale * (x - mn)).round_().clamp_(0, nmax)
        wq = w * q
        sum_l = wq.sum(dim=-1, keepdim=True)
        sum_l2 = (wq * q).sum(dim=-1, keepdim=True)
        sum_xl = (wq * x).sum(dim=-1, keepdim=True)
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        pos = this_min > 0
        this_scale = torch.where(pos, sum_xl / sum_l2, this_scale)
        this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
        err = error(this_scale, this_min, q)
        take = (det > 0) & (err < best)
        l = torch.where(take, q, l)
        best = torch.where(take, err, best)
        scale = torch.where(take, this_scale, scale)
        mn = torch.where(take, this_min, mn)
    # All values equal (and <= 0): zero scale, L = 0, min = that value.
    l = torch.where(flat, torch.zeros_like(l), l)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    mn = torch.where(flat, xmin, mn)
    return scale.squeeze(-1), -mn.squeeze(-1), l


def make_qx(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric scale per group with x^2 weights (make_qx_quants, rmse_type 1): -> scale, L in [0, 2nmax)."""
    amax, vmax = signed_absmax(x)
    zero = amax < GROUP_MAX_EPS
    vmax = torch.where(zero, torch.ones_like(vmax), vmax)
    c = [-float(nmax)] + [-(np.float32(nmax) + np.float32(0.1) * np.float32(i)) for i in range(-9, 10) if i]
    iscale = _f32(c).to(x.device).unsqueeze(0) / vmax.unsqueeze(1)  # [G, C]
    w = x * x
    l = (x.unsqueeze(1) * iscale.unsqueeze(2)).round_().clamp_(-nmax, nmax - 1)
    sumlx = ((w * x).unsqueeze(1) * l).sum(dim=-1)
    suml2 = ((w.unsqueeze(1) * l) * l).sum(dim=-1)
    # The C loop: take a candidate when sumlx^2 > best * suml2 (a scan over candidates, per group).
    s0, q0 = sumlx[:, 0], suml2[:, 0]
    scale = torch.where(q0 != 0, s0 / q0, torch.zeros_like(s0))
    best_val = scale * s0
    best = torch.zeros_like(s0, dtype=torch.long)
    for k in range(1, sumlx.shape[1]):
        s, q = sumlx[:, k], suml2[:, k]
        take = (q > 0) & (s * s > best_val * q)
        scale = torch.where(take, s / q, scale)
        best_val = torch.where(take, scale * s, best_val)
        best = torch.where(take, k, best)
    out_l = _gather_best(l, best) + nmax
    out_l = torch.where(zero.unsqueeze(1), torch.zeros_like(out_l), out_l)
    return torch.where(zero, torch.zeros_like(scale), scale), out_l


def make_q3(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q3_K group scale (make_q3_quants with rmse): a rounding, then up to 5 passes of coordinate descent.

    The passes are sequential over the values of a group (each update changes the sums the next
    one sees), so they run as 16 steps vectorized over all groups.
    """
    amax, vmax = signed_absmax(x)
    zero = amax < GROUP_MAX_EPS
    vmax = torch.where(zero, torch.ones_like(vmax), vmax)
    iscale = rdiv(-float(nmax), vmax).unsqueeze(1)
    l = (iscale * x).round_().clamp_(-nmax, nmax - 1)
    w = x * x
    wx = w * x
    sumlx = (wx * l).sum(dim=-1)
    suml2 = ((w * l) * l).sum(dim=-1)
    cols = [(x[:, i], w[:, i], wx[:, i]) for i in range(x.shape[1])]
    for _ in range(5):
        changed = torch.zeros_like(zero)
        for i, (xi, wi, wxi) in enumerate(cols):
            li = l[:, i]
            slx0 = sumlx - wxi * li
            sl2 = suml2 - (wi * li) * li
            new = (xi * sl2 / slx0).round_().clamp_(-nmax, nmax - 1)
            slx = slx0 + wxi * new
            sl2 = sl2 + (wi * new) * new
            take = (slx0 > 0) & (new != li) & (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            l[:, i] = torch.where(take, new, li)
            sumlx = torch.where(take, slx, sumlx)
            suml2 = torch.where(take, sl2, suml2)
            changed |= take
        # A group with no change in a pass would repeat it identically: stop when none changed.
        if not bool(changed.any()):
            break
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    out_l = torch.where(zero.unsqueeze(1), torch.zeros_like(l), l + nmax)
    return torch.where(zero, torch.zeros_like(scale), scale), out_l


# ---------------------------------------------------------------------------------- IQ4 codebook
_IQ4_LUT_HALF = 512  # 2*x is looked up on the integers [-512, 512]; beyond, the end codes win


def _iq4_luts(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Code index and value for each integer floor(2x): the nearest codebook entry to x.

    ggml's best_index_int8 picks entry i once 2x >= v[i-1] + v[i]; those midpoints are integers, so
    floor(2x) decides.
    """
    vals = np.asarray(IQ4NL_VALUES, dtype=np.int64)
    mids = vals[:-1] + vals[1:]
    t = np.arange(-_IQ4_LUT_HALF, _IQ4_LUT_HALF + 1)
    idx = (t[:, None] >= mids[None, :]).sum(axis=1)
    idx_t = torch.tensor(idx, dtype=torch.long, device=device)
    return idx_t, torch.tensor(vals[idx], dtype=torch.float32, device=device)


def iq4_lookup(a: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """table entry of the codebook value nearest to each a."""
    t = (a + a).floor_().clamp_(-_IQ4_LUT_HALF, _IQ4_LUT_HALF).add_(_IQ4_LUT_HALF).long()
    return table[t]


def iq4_search(x: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    """Scale of each 32-value group on the IQ4 codebook (quantize_row_iq4_nl_impl, ntry 7, x^2 weights)."""
    amax, vmax = signed_absmax(x)
    zero = amax < GROUP_MAX_EPS
    vmax = torch.where(zero, torch.ones_like(vmax), vmax)
    v0 = float(IQ4NL_VALUES[0])
    d0 = -vmax / v0
    ids = [1 / d0] + [rdiv(float(itry) + v0, vmax) for itry in range(-7, 8)]
    inv = torch.stack(ids, dim=1)  # [G, C]
    q = iq4_lookup(x.unsqueeze(1) * inv.unsqueeze(2), vals)
    wq = (x * x).unsqueeze(1) * q
    sumqx = (wq * x.unsqueeze(1)).sum(dim=-1)
    sumq2 = (wq * q).sum(dim=-1)
    d = sumqx[:, 0] / sumq2[:, 0]
    best = d * sumqx[:, 0]
    for k in range(1, inv.shape[1]):
        s, q2 = sumqx[:, k], sumq2[:, k]
        take = (q2 > 0) & (s * s > best * q2)
        d = torch.where(take, s / q2, d)
        best = torch.where(take, d * s, best)
    return torch.where(zero, torch.zeros_like(d), d)


def _safe_inv(d: torch.Tensor) -> torch.Tensor:
    """1/d, and 0 where d == 0 (ggml's `d ? 1/d : 0`)."""
    return torch.where(d != 0, 1 / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(d))


# ---------------------------------------------------------------------------------- block encoders
def _requant(x: torch.Tensor, dg: torch.Tensor, dm: torch.Tensor | None, lo: int, hi: int,
             keep: torch.Tensor) -> torch.Tensor:
    """Re-round x [.., n] with the stored group scales dg [..] (and mins dm): l = round((x + dm) / dg).

    Groups whose stored scale is 0 keep the search's levels `keep` (ggml `continue`s there).
    """
    num = x if dm is None else x + dm.unsqueeze(-1)
    l = (num / dg.unsqueeze(-1)).round_().clamp_(lo, hi)
    return torch.where((dg == 0).unsqueeze(-1), keep, l)


def _u8(v: torch.Tensor) -> torch.Tensor:
    """int -> the low byte, as C's conversion to uint8_t."""
    return (v.to(torch.int64) & 0xFF).to(torch.uint8)


def _pack_k4_scales(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K: 8 6-bit scales and 8 6-bit mins [nb, 8] (int64) -> 12 bytes."""
    lo_s, hi_s, lo_m, hi_m = ls[:, :4], ls[:, 4:], lm[:, :4], lm[:, 4:]
    b0 = lo_s | ((hi_s >> 4) << 6)
    b1 = lo_m | ((hi_m >> 4) << 6)
    b2 = (hi_s & 0xF) | ((hi_m & 0xF) << 4)
    return _u8(torch.cat((b0, b1, b2), dim=1))


def _k4_common(x: torch.Tensor, nmax: int, rmin: float, nstep: int) -> tuple[torch.Tensor, ...]:
    """Q4_K/Q5_K: search, 6-bit scales/mins, requantization -> (d, dmin, 12 scale bytes, L [nb, 256])."""
    nb = x.shape[0]
    g = x.reshape(nb * 8, 32)
    av = ((g * g).sum(dim=-1, keepdim=True) / 32).sqrt_()
    scales, mins, keep = make_qkx2(g, av + g.abs(), nmax, rmin, 0.1, nstep, False)
    scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
    max_scale = scales.amax(dim=1).clamp(min=0.0)
    max_min = mins.amax(dim=1).clamp(min=0.0)
    inv_s = torch.where(max_scale > 0, rdiv(63.0, max_scale), torch.zeros_like(max_scale))
    inv_m = torch.where(max_min > 0, rdiv(63.0, max_min), torch.zeros_like(max_min))
    ls = _u8((inv_s.unsqueeze(1) * scales).round()).to(torch.int64).clamp(max=63)
    lm = _u8((inv_m.unsqueeze(1) * mins).round()).to(torch.int64).clamp(max=63)
    d, dmin = max_scale / 63, max_min / 63
    dg = f16_round(d).unsqueeze(1) * ls.to(torch.float32)
    dm = f16_round(dmin).unsqueeze(1) * lm.to(torch.float32)
    l = _requant(x.reshape(nb, 8, 32), dg, dm, 0, nmax, keep.reshape(nb, 8, 32))
    return d, dmin, _pack_k4_scales(ls, lm), l.reshape(nb, QK_K).to(torch.uint8)


def encode_q4_k(x: torch.Tensor) -> torch.Tensor:
    d, dmin, sc, l = _k4_common(x, 15, -1.0, 20)
    return torch.cat((f16_bytes(d), f16_bytes(dmin), sc, pack_nibbles(l, 32)), dim=1)


def encode_q5_k(x: torch.Tensor) -> torch.Tensor:
    d, dmin, sc, l = _k4_common(x, 31, -0.5, 15)
    qh = pack_bits(l >> 4, 1, 32)
    return torch.cat((f16_bytes(d), f16_bytes(dmin), sc, qh, pack_nibbles(l & 0xF, 32)), dim=1)


def encode_q2_k(x: torch.Tensor) -> torch.Tensor:
    nb = x.shape[0]
    g = x.reshape(nb * 16, 16)
    scales, mins, keep = make_qkx2(g, g.abs(), 3, -0.5, 0.1, 15, True)
    scales, mins = scales.reshape(nb, 16), mins.reshape(nb, 16)
    max_scale = scales.amax(dim=1).clamp(min=0.0)
    max_min = mins.amax(dim=1).clamp(min=0.0)
    has_s, has_m = (max_scale > 0).unsqueeze(1), (max_min > 0).unsqueeze(1)
    ls = (rdiv(15.0, max_scale).unsqueeze(1) * scales).round().to(torch.int64)
    lm = (rdiv(15.0, max_min).unsqueeze(1) * mins).round().to(torch.int64)
    byte = torch.where(has_s, ls & 0xFF, 0) | torch.where(has_m, (lm << 4) & 0xFF, 0)
    d = torch.where(has_s.squeeze(1), max_scale / 15, torch.zeros_like(max_scale))
    dmin = torch.where(has_m.squeeze(1), max_min / 15, torch.zeros_like(max_min))
    dg = f16_round(d).unsqueeze(1) * (byte & 0xF).to(torch.float32)
    dm = f16_round(dmin).unsqueeze(1) * (byte >> 4).to(torch.float32)
    l = _requant(x.reshape(nb, 16, 16), dg, dm, 0, 3, keep.reshape(nb, 16, 16)).reshape(nb, QK_K)
    return torch.cat((byte.to(torch.uint8), pack_bits(l, 2, 32), f16_bytes(d), f16_bytes(dmin)), dim=1)


def _pack_q3_scales(ls: torch.Tensor) -> torch.Tensor:
    """16 6-bit scales [nb, 16] -> 12 bytes: low nibbles in bytes 0-7, 2 high bits each in bytes 8-11."""
    low = (ls[:, :8] & 0xF) | ((ls[:, 8:] & 0xF) << 4)
    high = (ls >> 4).reshape(-1, 4, 4) << (2 * torch.arange(4, device=ls.device)).reshape(1, 4, 1)
    return _u8(torch.cat((low, high.sum(dim=1)), dim=1))


def encode_q3_k(x: torch.Tensor) -> torch.Tensor:
    nb = x.shape[0]
    scales, keep = make_q3(x.reshape(nb * 16, 16), 4)
    _, max_scale = signed_absmax(scales.reshape(nb, 16))
    scales = scales.reshape(nb, 16)
    has = max_scale != 0
    iscale = rdiv(-32.0, torch.where(has, max_scale, torch.ones_like(max_scale)))
    ls = (iscale.unsqueeze(1) * scales).round().clamp(-32, 31).to(torch.int64) + 32
    ls = torch.where(has.unsqueeze(1), ls, 0)
    d = torch.where(has, 1 / iscale, torch.zeros_like(iscale))
    dg = f16_round(d).unsqueeze(1) * (ls - 32).to(torch.float32)
    l = _requant(x.reshape(nb, 16, 16), dg, None, -4, 3, keep.reshape(nb, 16, 16) - 4) + 4
    l = l.reshape(nb, QK_K).to(torch.uint8)
    high = l > 3
    qs = pack_bits(torch.where(high, l - 4, l), 2, 32)
    return torch.cat((pack_bits(high, 1, 32), qs, _pack_q3_scales(ls), f16_bytes(d)), dim=1)


def encode_q6_k(x: torch.Tensor) -> torch.Tensor:
    nb = x.shape[0]
    scales, keep = make_qx(x.reshape(nb * 16, 16), 32)
    scales = scales.reshape(nb, 16)
    amax, max_scale = signed_absmax(scales)
    empty = amax < GROUP_MAX_EPS
    iscale = rdiv(-128.0, torch.where(empty, torch.ones_like(max_scale), max_scale))
    d = 1 / iscale
    sc = (iscale.unsqueeze(1) * scales).round().clamp(max=127)
    dg = f16_round(d).unsqueeze(1) * sc
    l = _requant(x.reshape(nb, 16, 16), dg, None, -32, 31, keep.reshape(nb, 16, 16) - 32) + 32
    l = l.reshape(nb, QK_K).to(torch.uint8)
    out = torch.cat((pack_nibbles(l & 0xF, 64), pack_bits(l >> 4, 2, 32),
                     sc.to(torch.int8).view(torch.uint8), f16_bytes(d)), dim=1)
    return torch.where(empty.unsqueeze(1), torch.zeros_like(out), out)  # ggml memsets empty blocks


def encode_iq4_nl(x: torch.Tensor) -> torch.Tensor:
    idx_t, val_t = _iq4_luts(x.device)
    d = iq4_search(x, val_t)
    l = iq4_lookup(_safe_inv(d).unsqueeze(1) * x, idx_t)
    return torch.cat((f16_bytes(d), pack_nibbles(l, 16)), dim=1)


def encode_iq4_xs(x: torch.Tensor) -> torch.Tensor:
    nb = x.shape[0]
    idx_t, val_t = _iq4_luts(x.device)
    scales = iq4_search(x.reshape(nb * 8, 32), val_t).reshape(nb, 8)
    _, max_scale = signed_absmax(scales)
    d = -max_scale / 32
    ls = (_safe_inv(d).unsqueeze(1) * scales).round_().clamp_(-32, 31)
    dl = d.unsqueeze(1) * ls
    l = iq4_lookup(_safe_inv(dl).unsqueeze(2) * x.reshape(nb, 8, 32), idx_t).reshape(nb, QK_K)
    ls = ls.to(torch.int64) + 32
    scales_l = (ls[:, 0::2] & 0xF) | ((ls[:, 1::2] & 0xF) << 4)
    scales_h = ((ls >> 4) << (2 * torch.arange(8, device=x.device))).sum(dim=1, keepdim=True)
    sh = torch.cat((scales_h & 0xFF, scales_h >> 8), dim=1)
    return torch.cat((f16_bytes(d), _u8(sh), _u8(scales_l), pack_nibbles(l, 16)), dim=1)
