"""Multimodal RoPE (M-RoPE) of Qwen2-VL / Qwen2.5-VL: 3-D positions (t, h, w) over sections of the
rotary half-dims, as transformers' ``Qwen2VLRotaryEmbedding`` + ``apply_multimodal_rotary_pos_emb``.

transformers splits the rotary half-dims into ``mrope_section`` chunks (summing to rotary_dim / 2);
chunk i rotates with axis i % 3 of the position triple, and the second half repeats the first.
So half-dim j takes cos/sin of position ``positions[axis(j)]`` at frequency j: a lookup into the
same float32 table plain RoPE uses, one axis per dim. Positions [T] (all axes equal) take the plain
path unchanged, fused CPU kernel included.

Qwen3-VL interleaves instead (``interleaved=True``, transformers' Qwen3VLTextRotaryEmbedding
.recomposition_frequencies): half-dim j takes axis 1 (h) when j % 3 == 1 and j < 3 * section[1],
axis 2 (w) when j % 3 == 2 and j < 3 * section[2], else axis 0 (t).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from mistralpy.errors import ModelLoadError
from mistralpy.layers.rotary import RotaryEmbedding, compute_inv_freq

__all__ = ["MRotaryEmbedding", "get_mrope", "interleaved_axes", "mrope_section_from_config"]


def mrope_section_from_config(cfg: dict) -> list[int]:
    """``mrope_section`` from rope_parameters (transformers 5) or rope_scaling (older checkpoints);
    transformers' default [16, 24, 24] when absent."""
    for key in ("rope_parameters", "rope_scaling"):
        raw = cfg.get(key)
        if isinstance(raw, dict) and raw.get("mrope_section") is not None:
            return [int(v) for v in raw["mrope_section"]]
    return [16, 24, 24]


def interleaved_axes(mrope_section: Sequence[int], half: int) -> torch.Tensor:
    """Qwen3-VL's axis of each rotary half-dim [half]: t everywhere, then every third dim from 1
    (h) and from 2 (w) below 3 * its section."""
    axis = torch.zeros(half, dtype=torch.long)
    for ax in (1, 2):
        axis[ax: 3 * mrope_section[ax]: 3] = ax
    return axis


class MRotaryEmbedding(RotaryEmbedding):
    """RoPE that also takes positions [3, T] (t, h, w rows). A subclass, so that code which only
    accepts the plain class (worker/native_decode.py) declines models that use it."""

    def __init__(self, head_dim: int, inv_freq: torch.Tensor, attention_scaling: float, max_position: int,
                 dtype: torch.dtype, mrope_section: Sequence[int], interleaved: bool = False) -> None:
        super().__init__(head_dim, inv_freq, attention_scaling, max_position, dtype)
        half = self.rotary_dim // 2
        if sum(mrope_section) != half:
            raise ModelLoadError(f"mrope_section {list(mrope_section)} must sum to rotary_dim / 2 = {half}")
        self.mrope_section = tuple(int(s) for s in mrope_section)
        self.interleaved = interleaved
        if interleaved:
            self._axis = interleaved_axes(self.mrope_section, half)
        else:   # axis (0 t, 1 h, 2 w) of each rotary half-dim: transformers' chunk i takes axis i % 3
            self._axis = torch.cat([torch.full((n,), i % 3, dtype=torch.long)
                                    for i, n in enumerate(self.mrope_section)])
        self._dims = torch.arange(half)
        self._m_cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # positions, cos, sin

    def extra_repr(self) -> str:
        return super().extra_repr() + f", mrope_section={list(self.mrope_section)}" + (
            ", interleaved" if self.interleaved else "")

    def mrope_cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [3, T] int64 -> float32 cos, sin [T, rotary_dim/2] (times attention_scaling)."""
        self._check(positions)
        if self._axis.device != positions.device:
            self._axis, self._dims = self._axis.to(positions.device), self._dims.to(positions.device)
        per_dim = positions.index_select(0, self._axis).t()   # [T, half]: the position each dim rotates by
        return self._cos[per_dim, self._dims], self._sin[per_dim, self._dims]

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] or [3, T] int64; q [T, Hq, D], k [T, Hk, D] -> rotated, same shapes / dtypes."""
        if positions.dim() == 1:
            return super().forward(positions, q, k)
        cached = self._m_cache
        if cached is None or cached[0] is not positions or torch.compiler.is_compiling():
            cos, sin = self.mrope_cos_sin(positions)
            cached = (positions, cos.unsqueeze(-2), sin.unsqueeze(-2))
            if not torch.compiler.is_compiling():   # every layer of a step passes the same tensor
                self._m_cache = cached
        _, cos, sin = cached
        if q.dim() == 3 and k.dim() == 3 and q.shape[-1] == k.shape[-1]:
            both = self._rotate(torch.cat((q, k), dim=1), cos, sin)
            return both[:, : q.shape[1]], both[:, q.shape[1]:]
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)


def get_mrope(head_dim: int, max_position: int, base: float, mrope_section: Sequence[int],
              dtype: torch.dtype, scaling: dict | None = None,
              max_model_len: int | None = None, interleaved: bool = False) -> MRotaryEmbedding:
    """An MRotaryEmbedding over the full head (Qwen-VL rotates every dim); ``scaling`` as
    rotary.rope_params_from_config returns it (None for the default rope every Qwen-VL uses)."""
    inv_freq, attention_scaling = compute_inv_freq(head_dim, base, scaling, max_position, max_model_len)
    return MRotaryEmbedding(head_dim, inv_freq, attention_scaling, max_model_len or max_position, dtype,
                            mrope_section, interleaved)
