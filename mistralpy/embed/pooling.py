"""Pooling: token hidden states -> one vector per sequence, as sentence-transformers' modules do.

``PoolState`` accumulates one sequence's statistics chunk by chunk (a causal decoder embedder's
long prompt runs in several steps through the paged KV cache; an encoder's in one), so nothing
but a few [H] vectors is kept between steps. ``EmbedHead.finish`` then applies the dense layers
and the L2 normalisation to the pooled vectors of every sequence that completed in a step at once.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")

_ACTIVATIONS = {
    "identity": lambda x: x, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "relu": F.relu,
    "gelu": F.gelu, "silu": F.silu,
}


def activation_by_name(path: str | None) -> str:
    """sentence-transformers' class path of an activation ("torch.nn.modules.activation.Tanh")
    -> our name; unknown ones raise ValueError."""
    if not path:
        return "identity"
    name = path.rsplit(".", 1)[-1].lower()
    if name not in _ACTIVATIONS:
        raise ValueError(f"unsupported activation {path!r}")
    return name


@dataclass(slots=True)
class DenseLayer:
    """sentence-transformers' Dense module: activation(x W^T + b), in float32."""

    weight: torch.Tensor            # [out, in]
    bias: torch.Tensor | None
    activation: str = "identity"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _ACTIVATIONS[self.activation](F.linear(x, self.weight, self.bias))


@dataclass(slots=True)
class PoolingConfig:
    modes: tuple[str, ...] = ("mean",)
    include_prompt: bool = True      # False: the instruction prefix is not pooled (INSTRUCTOR)
    dense: list[DenseLayer] = field(default_factory=list)
    normalize: bool = True

    def __post_init__(self) -> None:
        for mode in self.modes:
            if mode not in POOLING_MODES:
                raise ValueError(f"unknown pooling mode {mode!r}; known: {', '.join(POOLING_MODES)}")

    @property
    def needs_all_rows(self) -> bool:
        """Whether every row of the sequence is pooled (a prefix-cache hit would skip some)."""
        return self.modes != ("lasttoken",)


class PoolState:
    """One sequence's running pooling statistics over rows [lo, total), fed chunk by chunk."""

    __slots__ = ("cfg", "count", "first", "last", "lo", "max", "sum", "total", "wcount", "wsum")

    def __init__(self, cfg: PoolingConfig, total: int, prompt_len: int = 0) -> None:
        self.cfg = cfg
        self.total = total
        lo = 0 if cfg.include_prompt else prompt_len
        self.lo = lo if lo < total else 0   # nothing but the prompt: pool it all
        self.reset()

    def reset(self) -> None:
        self.sum = self.wsum = self.max = self.first = self.last = None
        self.count = 0
        self.wcount = 0.0

    def add(self, start: int, rows: torch.Tensor) -> None:
        """Rows [n, H] of sequence indices [start, start + n). A chunk starting at 0 starts over
        (the request was preempted and is being recomputed)."""
        if start == 0:
            self.reset()
        end = start + rows.shape[0]
        if end <= self.lo:
            return
        part = rows[max(self.lo - start, 0):].float()
        p0 = max(self.lo, start)
        modes = self.cfg.modes
        if "cls" in modes and self.first is None:
            self.first = part[0].clone()
        if end == self.total:
            self.last = part[-1].clone()
        if "mean" in modes or "mean_sqrt_len_tokens" in modes:
            s = part.sum(0)
            self.sum = s if self.sum is None else self.sum + s
        if "max" in modes:
            m = part.amax(0)
            self.max = m if self.max is None else torch.maximum(self.max, m)
        if "weightedmean" in modes:   # weights: 1-based positions in the sequence (prompt included)
            w = torch.arange(p0 + 1, p0 + 1 + part.shape[0], dtype=part.dtype)
            s = (part * w[:, None]).sum(0)
            self.wsum = s if self.wsum is None else self.wsum + s
            self.wcount += float(w.sum())
        self.count += part.shape[0]

    def result(self) -> torch.Tensor:
        """The pooled vector (modes concatenated in the configured order), before dense / normalize."""
        out = []
        for mode in self.cfg.modes:
            if mode == "cls":
                out.append(self.first)
            elif mode == "lasttoken":
                out.append(self.last)
            elif mode == "max":
                out.append(self.max)
            elif mode == "mean":
                out.append(self.sum / max(self.count, 1))
            elif mode == "mean_sqrt_len_tokens":
                out.append(self.sum / max(self.count, 1) ** 0.5)
            else:
                out.append(self.wsum / max(self.wcount, 1e-9))
        return torch.cat(out)


def pool_reference(hidden: torch.Tensor, cfg: PoolingConfig, prompt_len: int = 0) -> torch.Tensor:
    """The whole-sequence form of PoolState (hidden [n, H]) followed by the head: what tests compare with."""
    state = PoolState(cfg, hidden.shape[0], prompt_len)
    state.add(0, hidden)
    return finish([state.result()], cfg)[0]


def finish(pooled: list[torch.Tensor], cfg: PoolingConfig) -> torch.Tensor:
    """Dense layers then L2 normalisation over a batch of pooled vectors -> [B, D] float32."""
    x = torch.stack(pooled).float()
    for layer in cfg.dense:
        x = layer(x)
    return F.normalize(x, p=2, dim=-1) if cfg.normalize else x


def truncate_dimensions(vectors: torch.Tensor, dimensions: int, normalize: bool = True) -> torch.Tensor:
    """Matryoshka truncation: the first ``dimensions`` channels, renormalised."""
    x = vectors[..., :dimensions]
    return F.normalize(x, p=2, dim=-1) if normalize else x
