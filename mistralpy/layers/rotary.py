"""Rotary position embeddings (RoPE) with every scaling of HF `modeling_rope_utils`.

Layout is Neox / HF-llama: the first `rotary_dim` dims of a head are split in two halves
(x1, x2) and rotated as `x * cos + rotate_half(x) * sin`; dims past `rotary_dim` pass through.

Numerics follow transformers exactly: `inv_freq` is computed with the same float32 expressions
as `ROPE_INIT_FUNCTIONS`, `freqs = position.float() * inv_freq` in float32, and cos/sin are
multiplied by the attention scaling. The cos/sin cache is float32; the rotation is done in
float32 and cast back to the input dtype (HF rotates in the input dtype, so in bf16/fp16 we are
slightly more accurate than HF, and identical in float32).

Two HF rope types change their frequencies with the sequence length, which a KV cache cannot
follow (cached keys would be rotated with stale frequencies). We fix them once per engine, as
vLLM does; `max_model_len` (the longest sequence the engine will run) picks the setting:

- `dynamic` (NTK): HF recomputes the base for every forward from `seq_len = max(positions)+1`
  (and uses the unscaled base while `seq_len <= max_position_embeddings`). We compute the base
  once for `L = max(max_model_len, max_position)`, where `max_model_len` defaults to
  `max_position * factor` (vLLM's choice). So we equal HF on a sequence of length exactly L;
  passing `max_model_len <= max_position` gives the unscaled base, i.e. HF parity for every
  sequence below the original `max_position_embeddings`.
- `longrope` (Phi-3): HF uses `short_factor` while `seq_len <= original_max_position_embeddings`
  and `long_factor` beyond. We use `long_factor` iff `max_model_len > original_max`
  (`max_model_len` defaults to `max_position`, so a 128k Phi-3 uses long factors everywhere
  unless the engine is capped at <= 4k), as vLLM does. The attention factor is the same in both.
"""
from __future__ import annotations

import math
import weakref
from typing import Any

import torch

from ..errors import ModelLoadError
from . import cpu_fused

__all__ = [
    "RotaryEmbedding",
    "compute_inv_freq",
    "get_rope",
    "partial_rotary_factor_from_config",
    "rope_params_from_config",
]

_SUPPORTED = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")
# Types whose original context length HF moves into the rope dict (standardize_rope_params).
_NEEDS_ORIGINAL_MAX = ("llama3", "yarn", "longrope")
# Old spellings seen in published config.json files.
_ALIASES = {"su": "longrope", "mrope": "default"}


# ---------------------------------------------------------------------------------------------
# config parsing


def _raw_rope_dict(cfg: dict, layer_type: str | None) -> dict:
    # transformers: `self.rope_parameters = rope_scaling or self.rope_parameters`
    raw = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if not isinstance(raw, dict):
        raise ModelLoadError(f"rope_scaling / rope_parameters must be an object, got {raw!r}")
    # Per-layer-type rope (e.g. {"full_attention": {...}, "sliding_attention": {...}}).
    nested = [k for k, v in raw.items() if isinstance(v, dict)]
    if nested:
        if layer_type is None:
            raise ModelLoadError(
                f"rope_parameters is nested by layer type ({', '.join(nested)}); pass layer_type"
            )
        if layer_type not in raw:
            raise ModelLoadError(f"rope_parameters has no entry for layer type {layer_type!r}")
        raw = raw[layer_type] or {}
    return dict(raw)


def rope_params_from_config(cfg: dict, layer_type: str | None = None) -> tuple[float, dict | None]:
    """(rope_theta, scaling dict or None) from an HF config.json dict.

    Reads the older `rope_theta` + `rope_scaling` and transformers-5 `rope_parameters`. `type` is
    renamed `rope_type`; `rope_theta` and `partial_rotary_factor` are taken out of the returned
    dict (see `partial_rotary_factor_from_config`); rope_type 'default' gives None. For llama3 /
    yarn / longrope, `original_max_position_embeddings` is filled in as transformers does: a
    top-level value wins (Phi-3), else the dict's, else `max_position_embeddings`.
    `layer_type` picks an entry when rope_parameters is nested by layer type.
    """
    params = _raw_rope_dict(cfg, layer_type)
    theta = params.pop("rope_theta", None)
    if theta is None:
        theta = cfg.get("rope_theta")
    theta = float(theta) if theta is not None else 10000.0
    params.pop("partial_rotary_factor", None)
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    rope_type = _ALIASES.get(rope_type, rope_type)
    if rope_type == "default":
        return theta, None
    if rope_type not in _SUPPORTED:
        raise ModelLoadError(f"unsupported rope_type {rope_type!r} (supported: {', '.join(_SUPPORTED)})")
    params["rope_type"] = rope_type
    if rope_type in _NEEDS_ORIGINAL_MAX:
        if cfg.get("original_max_position_embeddings") is not None:
            params["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
        elif params.get("original_max_position_embeddings") is None and "max_position_embeddings" in cfg:
            params["original_max_position_embeddings"] = cfg["max_position_embeddings"]
    return theta, params


def partial_rotary_factor_from_config(cfg: dict, layer_type: str | None = None) -> float:
    """Fraction of head_dim that is rotated: rope dict's `partial_rotary_factor`, else the
    top-level one (or GPT-NeoX `rotary_pct`), else 1.0."""
    params = _raw_rope_dict(cfg, layer_type)
    for value in (params.get("partial_rotary_factor"), cfg.get("partial_rotary_factor"), cfg.get("rotary_pct")):
        if value is not None:
            return float(value)
    return 1.0


# ---------------------------------------------------------------------------------------------
# inverse frequencies (each mirrors the matching transformers function expression by expression)


def _default_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))


def _yarn(base: float, dim: int, s: dict, max_position: int) -> tuple[torch.Tensor, float]:
    factor = s.get("factor")
    original_max = s.get("original_max_position_embeddings") or max_position
    if factor is None:
        factor = max_position / original_max
    attention_factor = s.get("attention_factor")
    mscale, mscale_all_dim = s.get("mscale"), s.get("mscale_all_dim")

    def get_mscale(scale: float, m: float = 1) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast = s.get("beta_fast") or 32
    beta_slow = s.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original_max / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # prevent singularity (as HF)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)

    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp
    inv_freq = (
        inv_freq_interpolation * (1 - extrapolation_factor)
        + inv_freq_extrapolation * extrapolation_factor
    )
    return inv_freq, float(attention_factor)


def _llama3(base: float, dim: int, s: dict, max_position: int) -> torch.Tensor:
    inv_freq = _default_inv_freq(base, dim)
    factor = s["factor"]
    low_freq_factor = s["low_freq_factor"]
    high_freq_factor = s["high_freq_factor"]
    old_context_len = s.get("original_max_position_embeddings") or max_position
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, inv_freq_llama)


def _longrope(base: float, dim: int, s: dict, max_position: int, max_model_len: int) -> tuple[torch.Tensor, float]:
    original_max = s.get("original_max_position_embeddings") or max_position
    factor = s.get("factor")
    if factor is None:
        factor = max_position / original_max  # Phi-3: ratio of the two lengths
    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original_max))
    ext = s["long_factor"] if max_model_len > original_max else s["short_factor"]
    if len(ext) != dim // 2:
        raise ModelLoadError(f"longrope factors have length {len(ext)}, expected rotary_dim/2 = {dim // 2}")
    ext_factors = torch.tensor(ext, dtype=torch.float32)
    inv_freq_shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return 1.0 / (ext_factors * base**inv_freq_shape), float(attention_factor)


def compute_inv_freq(
    rotary_dim: int, base: float, scaling: dict | None, max_position: int, max_model_len: int | None = None
) -> tuple[torch.Tensor, float]:
    """(inv_freq [ceil(rotary_dim/2)] float32 on CPU, attention_scaling) for a rope dict.

    `max_position` is the config's max_position_embeddings; `max_model_len` the engine's longest
    sequence (only dynamic and longrope use it; see the module docstring).
    """
    dim = rotary_dim
    rope_type = (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "default"
    rope_type = _ALIASES.get(rope_type, rope_type)
    s = scaling or {}
    if rope_type == "default":
        return _default_inv_freq(base, dim), 1.0
    if rope_type == "linear":
        inv_freq = _default_inv_freq(base, dim)
        inv_freq /= s["factor"]
        return inv_freq, 1.0
    if rope_type == "dynamic":
        factor = s["factor"]
        seq_len = max_model_len if max_model_len is not None else int(max_position * factor)
        seq_len = max(seq_len, max_position)
        base = base * ((factor * seq_len / max_position) - (factor - 1)) ** (dim / (dim - 2))
        return _default_inv_freq(base, dim), 1.0
    if rope_type == "llama3":
        return _llama3(base, dim, s, max_position), 1.0
    if rope_type == "yarn":
        return _yarn(base, dim, s, max_position)
    if rope_type == "longrope":
        return _longrope(base, dim, s, max_position, max_model_len if max_model_len is not None else max_position)
    raise ModelLoadError(f"unsupported rope_type {rope_type!r} (supported: {', '.join(_SUPPORTED)})")


# ---------------------------------------------------------------------------------------------
# module


INITIAL_CACHE = 8192   # cos/sin rows built up front (RotaryEmbedding grows them on demand)


class RotaryEmbedding(torch.nn.Module):
    """Applies RoPE to flat-batch q/k. Build one per model (get_rope) and share it across layers.

    The float32 cos/sin cache ([n, rotary_dim/2], scaled by `attention_scaling`) is a plain
    attribute, not a buffer, so `model.to(torch.bfloat16)` cannot lower its precision; it follows
    q's device on first use. A position past the cache grows it (a host sync per call on GPU; a
    runner that calls `ensure_cache(max_pos)` once per step may set `check_bounds = False`).
    """

    def __init__(
        self,
        head_dim: int,
        inv_freq: torch.Tensor,
        attention_scaling: float,
        max_position: int,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = 2 * inv_freq.numel()  # an odd rotary dim is rounded up, as in HF
        if self.rotary_dim > head_dim:
            raise ModelLoadError(f"rotary_dim {self.rotary_dim} exceeds head_dim {head_dim}")
        self.inv_freq = inv_freq.to(device=device, dtype=torch.float32)
        self.attention_scaling = float(attention_scaling)
        self.dtype = dtype  # the model's dtype; outputs take q/k's dtype, the cache stays float32
        self.check_bounds = True
        self._step_cache: tuple[torch.Tensor, ...] | None = None  # positions, cos, sin, cos2, sin2
        self._fused_positions: torch.Tensor | None = None  # the step whose positions the cache covers
        self._cos = self._sin = torch.empty(0)
        # Sized for the first sequences only, and grown as positions need it: configs of 1M-10M
        # positions (Llama 4) would otherwise hold GBs of tables no request reaches.
        self._build(min(max(int(max_position), 1), INITIAL_CACHE), self.inv_freq.device)

    def extra_repr(self) -> str:
        return (
            f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, "
            f"attention_scaling={self.attention_scaling}, cached={self._cos.shape[0]}"
        )

    def _build(self, n: int, device: torch.device) -> None:
        inv_freq = self.inv_freq.to(device)
        t = torch.arange(n, dtype=torch.int64, device=device).float()
        freqs = t[:, None] * inv_freq  # same elementwise float32 product as HF
        self._cos = freqs.cos() * self.attention_scaling
        self._sin = freqs.sin() * self.attention_scaling

    @property
    def max_cached_position(self) -> int:
        return self._cos.shape[0]

    def ensure_cache(self, max_pos: int, device: torch.device | str | None = None) -> None:
        """Make positions 0..max_pos valid (grows to at least double the old size)."""
        device = torch.device(device) if device is not None else self._cos.device
        n = self._cos.shape[0]
        if max_pos >= n:
            self._build(max(max_pos + 1, 2 * n), device)
        elif self._cos.device != device:
            self._cos, self._sin = self._cos.to(device), self._sin.to(device)

    def _check(self, positions: torch.Tensor) -> None:
        if self._cos.device != positions.device:
            self._cos, self._sin = self._cos.to(positions.device), self._sin.to(positions.device)
        if not self.check_bounds or positions.numel() == 0 or torch.compiler.is_compiling():
            return
        if positions.is_cuda and torch.cuda.is_current_stream_capturing():
            return
        max_pos = int(positions.max())
        if max_pos >= self._cos.shape[0]:
            self.ensure_cache(max_pos, positions.device)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Half-width float32 cos, sin: [T, rotary_dim/2] each (already times attention_scaling)."""
        self._check(positions)
        return self._cos[positions], self._sin[positions]

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        flat = x.dim() == 2  # [T, H*D] is accepted as well
        if flat:
            x = x.view(x.shape[0], -1, self.head_dim)
        rd, half = self.rotary_dim, self.rotary_dim // 2
        xr = x[..., :rd].float()
        x1, x2 = xr[..., :half], xr[..., half:]
        # HF: x * cat(cos, cos) + cat(-x2, x1) * cat(sin, sin); `a + (-b)` == `a - b` bitwise.
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
        if rd < x.shape[-1]:
            out = torch.cat((out, x[..., rd:]), dim=-1)
        return out.view(out.shape[0], -1) if flat else out

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] int64; q [T, Hq, D], k [T, Hk, D] (or [T, H*D]) -> rotated, same shapes/dtypes."""
        # Every layer passes the same positions tensor in a step: look cos/sin up once per step.
        if torch.compiler.is_compiling():  # no per-step cache in a graph: the lookup fuses into the rotation
            cos, sin = self._cos[positions].unsqueeze(-2), self._sin[positions].unsqueeze(-2)
            return self._rotate(q, cos, sin), self._rotate(k, cos, sin)
        if cpu_fused.usable(q) and q.dtype == k.dtype and positions.device.type == "cpu":
            return self._fused(positions, q, k)
        cached = self._step_cache
        if cached is None or cached[0] is not positions:
            cos, sin = self.cos_sin(positions)
            cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # [T, 1, rd/2]
            # full-width [cos, cos] and [-sin, sin]: x * cos2 + swap_halves(x) * sin2 is the
            # rotation in 3 ops instead of 6, bitwise equal (a + (-b) == a - b)
            cached = self._step_cache = (positions, cos, sin, torch.cat((cos, cos), -1), torch.cat((-sin, sin), -1))
        _, cos, sin, cos2, sin2 = cached
        if q.dim() == 3 and k.dim() == 3 and q.shape[-1] == k.shape[-1] == self.rotary_dim:
            x = torch.cat((q, k), dim=1).float()
            half = self.rotary_dim // 2
            out = (x * cos2).add_(torch.cat((x[..., half:], x[..., :half]), dim=-1).mul_(sin2)).to(q.dtype)
            return out[:, : q.shape[1]], out[:, q.shape[1]:]
        if q.dim() == 3 and k.dim() == 3 and q.shape[-1] == k.shape[-1]:
            # one rotation over q and k side by side: half the small ops of rotating each
            both = self._rotate(torch.cat((q, k), dim=1), cos, sin)
            return both[:, : q.shape[1]], both[:, q.shape[1]:]
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _fused(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # One CPU op for q and k (new tensors; the kernel looks up the full float32 tables by position
        # and refuses positions past them). Bounds are checked, and the cache grown, once per step.
        if self._fused_positions is not positions:
            self._check(positions)
            self._fused_positions = positions
        if positions.dtype not in (torch.int64, torch.int32):
            positions = positions.long()
        if q.dim() == 3 and k.dim() == 3:  # (a view costs ~1-3 us: only for the flat [T, H*D] form)
            return cpu_fused.rope(positions, q, k, self._cos, self._sin)
        q3 = q.view(q.shape[0], -1, self.head_dim) if q.dim() == 2 else q
        k3 = k.view(k.shape[0], -1, self.head_dim) if k.dim() == 2 else k
        qo, ko = cpu_fused.rope(positions, q3, k3, self._cos, self._sin)
        return qo.view(q.shape), ko.view(k.shape)


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


# Layers of one model ask for identical ropes: share one module (and its cos/sin cache, which is
# 64 MiB for 128k positions x 128 dims) while any model holds it.
_SHARED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def get_rope(
    head_dim: int,
    rotary_dim: int,
    max_position: int,
    base: float,
    scaling: dict | None,
    dtype: torch.dtype,
    device: Any = None,
    *,
    partial_rotary_factor: float = 1.0,
    max_model_len: int | None = None,
) -> RotaryEmbedding:
    """Build a RotaryEmbedding.

    head_dim: size of a head; rotary_dim: dims to rotate (usually head_dim), times
    `partial_rotary_factor` when that is < 1 (HF: int(head_dim * factor)); max_position: the
    config's max_position_embeddings (yarn/longrope derive `factor` from it when absent, dynamic
    scales against it); base: rope_theta; scaling: the dict from `rope_params_from_config`
    (a `partial_rotary_factor` key in it is ignored: pass the keyword). max_model_len: the
    engine's longest sequence; only dynamic and longrope depend on it (module docstring) and it
    sizes the initial cache (default max_position, or max_position*factor for dynamic).
    Identical calls return the same module while it is alive, so per-layer calls share one cache.
    """
    if partial_rotary_factor < 1.0:
        rotary_dim = int(rotary_dim * partial_rotary_factor)
    if rotary_dim <= 0:
        raise ModelLoadError(f"rotary_dim must be positive, got {rotary_dim}")
    key = (head_dim, rotary_dim, max_position, float(base), _freeze(scaling), dtype,
           str(device) if device is not None else None, max_model_len)
    shared = _SHARED.get(key)
    if shared is not None:
        return shared
    inv_freq, attention_scaling = compute_inv_freq(rotary_dim, base, scaling, max_position, max_model_len)
    cache_len = max_model_len
    if cache_len is None:
        cache_len = max_position
        if scaling and scaling.get("rope_type") == "dynamic":
            cache_len = int(max_position * scaling["factor"])
    rope = RotaryEmbedding(head_dim, inv_freq, attention_scaling, cache_len, dtype, device)
    _SHARED[key] = rope
    return rope
