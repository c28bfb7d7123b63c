"""Shared pieces of every causal LM: the forward contract and the weight loader."""
from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from mistralpy.errors import ModelLoadError
from mistralpy.layers.linear import default_weight_loader

log = logging.getLogger(__name__)


class CausalLM(nn.Module):
    """Contract the model runner relies on.

    forward(input_ids [T], positions [T], kv_caches [(k, v)] per layer, attn_metadata) -> hidden [T, H]
    compute_logits(hidden [N, H]) -> logits [N, V] in float32
    """

    # (fused param name, HF shard name, shard index): HF tensors copied into fused weights.
    stacked_params: tuple[tuple[str, str, int], ...] = ()
    # checkpoint names that carry nothing we need (buffers HF sometimes saves).
    ignored_suffixes: tuple[str, ...] = ("rotary_emb.inv_freq",)

    num_layers: int
    num_kv_heads: int
    head_dim: int
    # Paged cache layout per layer: k [blocks, block_size, num_kv_heads, head_dim] and v with
    # v_cache_dim channels (None: head_dim). v_in_k: the v cache is a view of k's first v_cache_dim
    # channels, nothing of its own (MLA caches one latent that serves as both key and value).
    v_cache_dim: int | None = None
    v_in_k: bool = False
    # where the LM head's parameters sit (a multimodal wrapper holds the text model one level down)
    lm_head_prefix: str = "lm_head."

    def map_weight_name(self, name: str) -> str | None:
        """HF checkpoint name -> our parameter name (None skips it). Families override."""
        return name

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy each checkpoint tensor into its (already allocated) parameter, one at a time."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        tied = getattr(getattr(self, "lm_head", None), "tied", False)
        for raw_name, tensor in weights:
            if raw_name.endswith(self.ignored_suffixes):
                continue
            name = self.map_weight_name(raw_name)
            if name is None or (tied and name.startswith(self.lm_head_prefix)):
                continue
            shard = None
            for fused, shard_name, index in self.stacked_params:
                if f".{shard_name}." in name:
                    name, shard = name.replace(f".{shard_name}.", f".{fused}."), index
                    break
            param = self._param(params, name, raw_name)
            loader = getattr(param, "weight_loader", default_weight_loader)
            try:
                loader(param, tensor, shard)
            except ModelLoadError as exc:
                raise ModelLoadError(f"{raw_name}: {exc}") from None
            loaded.add(name if shard is None else f"{name}#{shard}")
        self._check_all_loaded(params, loaded)
        for module in self.modules():  # layers that assemble state across tensors (quantized kernels)
            finish = getattr(module, "finish_loading", None)
            if finish is not None:
                finish()

    def _param(self, params: dict[str, nn.Parameter], name: str, raw_name: str) -> nn.Parameter:
        try:
            return params[name]
        except KeyError:
            raise ModelLoadError(f"checkpoint tensor {raw_name!r} has no place in {type(self).__name__}") from None

    def _check_all_loaded(self, params: dict[str, nn.Parameter], loaded: set[str]) -> None:
        shards_per_fused: dict[str, int] = {}
        for fused, _, shard in self.stacked_params:
            shards_per_fused[fused] = max(shards_per_fused.get(fused, 0), shard + 1)
        missing = []
        for name in params:
            if name.startswith(self.lm_head_prefix) and getattr(self.lm_head, "tied", False):
                continue
            fused = next((f for f in shards_per_fused if f".{f}." in name), None)
            if fused is None:
                if name not in loaded:
                    missing.append(name)
            else:
                missing += [f"{name}#{i}" for i in range(shards_per_fused[fused]) if f"{name}#{i}" not in loaded]
        if missing:
            shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
            raise ModelLoadError(f"checkpoint is missing {len(missing)} weights: {shown}")


def cfg_get(cfg: dict[str, Any], *names: str, default: Any = None) -> Any:
    """First present, non-None value among several config spellings."""
    for name in names:
        value = cfg.get(name)
        if value is not None:
            return value
    return default
