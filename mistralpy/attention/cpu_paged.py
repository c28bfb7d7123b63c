"""CPU decode attention over the paged KV cache: ``mistralpy_cpu::paged_decode`` (kernels/cpu/paged_attention.cpp).

One call per layer writes the step's k/v rows into the cache and attends each decode row over its
blocks in place (float32 math), instead of gathering the whole context with ``index_select``
every layer (attention/torch_ref.py, which stays the reference and the fallback). The op declares
its cache writes in its schema and has a fake, so torch.compile keeps it as one opaque, mutating
call (worker/compile.py).
"""
from __future__ import annotations

import torch

from mistralpy.attention.backend import AttentionSpec
from mistralpy.kernels import cpu as cpu_ext

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_state: dict[str, bool] = {}


def _register_fake(namespace: str) -> None:
    @torch.library.register_fake(f"{namespace}::paged_decode")
    def _(q, k, v, k_cache, v_cache, slots, block_tables, seq_lens, scale, window, softcap):
        return q.new_empty(q.shape[0], q.shape[1], v.shape[2])


cpu_ext.register_fakes(_register_fake)


def available() -> bool:
    """The extension is loaded (built on the first eager call; under torch.compile only read)."""
    if "ok" not in _state:
        if torch.compiler.is_compiling():
            return False
        _state["ok"] = cpu_ext.load() and hasattr(cpu_ext.ops(), "paged_decode")
        if _state["ok"]:
            _op.append(cpu_ext.ops().paged_decode.default)
    return _state["ok"]


_op: list = []   # the op's handle, looked up once (~0.2 us a call otherwise)


def values_in_keys(k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """v_cache is k_cache's first Dv channels (MLA's latent cache, worker/model_runner._layer_cache):
    not contiguous, with k_cache's strides. Under torch.compile data pointers are not available and
    the strides decide (nothing else in the engine builds such a v cache)."""
    if v_cache is k_cache:
        return True
    if v_cache.is_contiguous() or v_cache.stride() != k_cache.stride():
        return False
    return torch.compiler.is_compiling() or v_cache.data_ptr() == k_cache.data_ptr()


def usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """The op handles this layer: CPU tensors, supported dtypes, contiguous caches (or MLA's view).
    (Called per layer and step: only cheap checks; q, k and v may have any strides.)"""
    if not q.is_cpu or not available():
        return False
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype or k_cache.dtype not in _DTYPES:
        return False
    if not k_cache.is_contiguous():
        return False
    return values_in_keys(k_cache, v_cache) or v_cache.dtype == k_cache.dtype


def decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           slots: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
           spec: AttentionSpec) -> torch.Tensor:
    """Write k/v [W, Hk, D|Dv] at `slots` [W] (W = 0: nothing to write), then attend q [B, Hq, D]
    over block_tables [B, nb] / seq_lens [B] (int64) -> [B, Hq, Dv] in q's dtype."""
    # The op takes one window for all rows; torch_ref hands chunked rows over as plain rows
    # (torch_ref._chunk_rows) or keeps them.
    if spec.attention_chunk_size is not None:
        raise ValueError("paged_decode has no chunked attention: pass each row's own chunk (torch_ref._chunk_rows)")
    vc = None if values_in_keys(k_cache, v_cache) else v_cache
    return _op[0](q, k, v, k_cache, vc, slots, block_tables, seq_lens, spec.scale, spec.sliding_window or 0,
                  spec.logit_softcap or 0.0)
