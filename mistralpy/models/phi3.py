"""Phi-3 / Phi-3.5 / Phi-4 (transformers' modeling_phi3): Llama whose checkpoint stores q/k/v and
gate/up already fused (`qkv_proj`, `gate_up_proj`), loaded as they are.

Long-context variants use longrope ("su") scaling, handled by layers/rotary.py: long factors when
the engine's max_model_len exceeds original_max_position_embeddings (module docstring there), and
the attention factor sqrt(1 + ln(factor) / ln(original_max)) on cos/sin in both cases, as HF.
Phi-4-mini rotates only part of each head (partial_rotary_factor); Phi-3-mini-4k has a sliding
window, read per layer as in Mistral.

GGUF files keep the longrope factors as two tensors instead of config values; they arrive through
load_weights (`rope_factors_long` / `rope_factors_short`) and the rope is rebuilt from them.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from mistralpy.attention.backend import AttentionBackend
from mistralpy.errors import ModelLoadError
from mistralpy.layers.activation import act_and_mul, get_act_fn
from mistralpy.layers.linear import Linear
from mistralpy.layers.norm import RMSNorm
from mistralpy.layers.rotary import get_rope, partial_rotary_factor_from_config, rope_params_from_config
from mistralpy.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaModel
from mistralpy.quant.gguf.tensor import GGUFTensor

# Names the GGUF hooks (loading/gguf_families/phi3.py) give llama.cpp's rope factor tensors.
ROPE_FACTOR_NAMES = {"model.rope_factors_long": "long_factor", "model.rope_factors_short": "short_factor"}


class FusedLinear(Linear):
    """A projection whose checkpoint tensor already holds several outputs side by side (one
    matmul, one weight to load or quantize); `split` cuts the output into them."""

    def __init__(self, in_features: int, shard_sizes: Sequence[int], bias: bool = False) -> None:
        super().__init__(in_features, sum(shard_sizes), bias)
        self.shard_sizes = list(shard_sizes)

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(y.split(self.shard_sizes, dim=-1))


class Phi3MLP(nn.Module):
    """down(act(gate) * up) with gate and up in one [2I, H] tensor (gate first)."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
        self.gate_up_proj = FusedLinear(hidden, [inter, inter])
        self.down_proj = Linear(inter, hidden)
        self.activation_fn = get_act_fn(cfg.get("hidden_act", "silu"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(act_and_mul(self.gate_up_proj(x), self.activation_fn))


class Phi3Attention(LlamaAttention):
    qkv_bias_key = "attention_bias"  # absent in Phi-3 configs: no biases
    o_bias_key = "attention_bias"

    def __init__(self, cfg: dict[str, Any], layer_idx: int, backend: AttentionBackend) -> None:
        super().__init__(cfg, layer_idx, backend)
        bias = bool(cfg.get("attention_bias", False))
        hidden = cfg["hidden_size"]
        self.qkv_proj = FusedLinear(hidden, [self.q_size, self.kv_size, self.kv_size], bias=bias)

    def set_longrope_factors(self, cfg: dict[str, Any], factors: dict[str, list[float]]) -> None:
        """Rebuild the rope with these long/short factors (GGUF files carry them as tensors)."""
        base, scaling = rope_params_from_config(cfg)
        if scaling is None or scaling.get("rope_type") != "longrope":
            raise ModelLoadError("rope factor tensors given to a model without longrope scaling")
        scaling = {**scaling, **factors}
        self.rotary_emb = get_rope(self.head_dim, self.head_dim, int(cfg.get("max_position_embeddings", 4096)),
                                   base, scaling, torch.float32,
                                   partial_rotary_factor=partial_rotary_factor_from_config(cfg),
                                   max_model_len=cfg.get("max_model_len"))


class Phi3DecoderLayer(LlamaDecoderLayer):
    def __init__(self, cfg: dict[str, Any], layer_idx: int, backend: AttentionBackend) -> None:
        nn.Module.__init__(self)
        eps = cfg.get("rms_norm_eps", 1e-5)
        self.self_attn = Phi3Attention(cfg, layer_idx, backend)
        self.mlp = Phi3MLP(cfg)
        self.input_layernorm = RMSNorm(cfg["hidden_size"], eps)
        self.post_attention_layernorm = RMSNorm(cfg["hidden_size"], eps)


class Phi3Model(LlamaModel):
    layer_cls = Phi3DecoderLayer


class Phi3ForCausalLM(LlamaForCausalLM):
    model_cls = Phi3Model
    stacked_params = ()  # the checkpoint's tensors are already fused

    def __init__(self, cfg: dict[str, Any], backend: AttentionBackend) -> None:
        super().__init__(cfg, backend)
        self._cfg = cfg

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        factors: dict[str, list[float]] = {}

        def model_weights() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                if name in ROPE_FACTOR_NAMES:
                    value = tensor.to_float() if isinstance(tensor, GGUFTensor) else tensor
                    factors[ROPE_FACTOR_NAMES[name]] = value.float().reshape(-1).tolist()
                else:
                    yield name, tensor

        super().load_weights(model_weights())
        if factors:
            if len(factors) != 2:
                raise ModelLoadError("GGUF has only one of rope_factors_long / rope_factors_short")
            for layer in self.model.layers:
                layer.self_attn.set_longrope_factors(self._cfg, factors)
