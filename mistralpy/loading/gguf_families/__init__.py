"""Per-family GGUF hooks: what differs between llama.cpp's architectures beyond the common table.

``GGUF_ARCHITECTURES`` (loading/gguf_loader.py) names a family module here; the module may define
any of these (the defaults below apply to what it leaves out):

- ``update_config(cfg, get, meta, tensor_names)``: fill family keys of the HF-style config from
  GGUF metadata (``get("key")`` reads ``<arch>.key``).
- ``GLOBAL_NAMES`` / ``LAYER_NAMES``: extra GGUF -> HF tensor names (layer names without the
  ``blk.N.`` prefix and ``.weight``/``.bias`` suffix, as in gguf_loader's ``_LAYER_NAMES``).
- ``SKIPPED``: GGUF tensor names that carry nothing the model needs.
- ``convert(name, tensor, cfg)``: yield ``(hf_name, GGUFTensor)`` pairs for one mapped tensor,
  to split fused or stacked tensors or undo a converter's adjustment.
"""
from __future__ import annotations

import importlib
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

from mistralpy.quant.gguf.tensor import GGUFTensor


def _no_config(cfg: dict[str, Any], get: Any, meta: dict[str, Any], tensor_names: set[str]) -> None:
    return None


def _identity(name: str, tensor: GGUFTensor, cfg: dict[str, Any]) -> Iterator[tuple[str, GGUFTensor]]:
    yield name, tensor


_DEFAULTS = dict(update_config=_no_config, GLOBAL_NAMES={}, LAYER_NAMES={}, SKIPPED=frozenset(), convert=_identity)
_CACHE: dict[str | None, SimpleNamespace] = {}


def family_hooks(family: str | None) -> SimpleNamespace:
    """The hooks of one family module (defaults for anything it does not define)."""
    if family not in _CACHE:
        module = importlib.import_module(f"{__name__}.{family}") if family else None
        _CACHE[family] = SimpleNamespace(**{k: getattr(module, k, v) for k, v in _DEFAULTS.items()})
    return _CACHE[family]
