"""Native decode: every decoder layer of a decode-only CPU step in one C++ op call.

Eager decode of a small model is bound by Python and per-op dispatch, not by its kernels
(SmolLM2-135M Q8_0, 30 layers, 2 threads: 5.8 ms of C++ kernels in a 9.9 ms step, ~13 ops a layer).
``mistralpy_cpu::decode_layers`` (quant/cpu_ext/decode_layers.cpp) makes, for each layer, exactly
the kernel calls the eager path makes (RMSNorm, qmm or dense products, RoPE, paged attention,
gated activation, torch's residual adds), so its output is bitwise the eager one.

``NativeDecode.install(model)`` takes the place of ``model.model.decode_layers`` when the model
qualifies (checked once: Llama-family layers with their stock forwards, bf16, every linear a single
``CpuQMatmulKernel`` or a dense pair-tiled weight, full-head standard RoPE shared by all layers, no
logit softcap, the torch_ref backend with the C++ paged op); it then serves steps whose rows are
all decode rows and hands every other step to the original eager ``decode_layers``. The per-layer
tensors and sizes are gathered once, here. ``MISTRALPY_NATIVE_DECODE=0`` turns it off
(worker/model_runner.py); where it is installed, ``compile=True`` does not compile (this is faster).
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from mistralpy.attention import cpu_paged
from mistralpy.attention.torch_ref import TorchRefBackend, TorchRefMetadata
from mistralpy.layers import activation, cpu_fused, dense_cpu
from mistralpy.layers.linear import Linear
from mistralpy.layers.mlp import GatedMLP
from mistralpy.layers.norm import RMSNorm
from mistralpy.layers.rotary import RotaryEmbedding
from mistralpy.models.llama import LlamaAttention, LlamaDecoderLayer
from mistralpy.quant import cpu_ext

log = logging.getLogger(__name__)

_DTYPE = torch.bfloat16  # the dtype every kernel of the op takes (dense_mm is bf16 only)


class NotEligible(Exception):
    """Why a model keeps the eager path."""


def _register_fake(namespace: str) -> None:
    @torch.library.register_fake(f"{namespace}::decode_layers")
    def _(hidden, positions, cos, sin, slots, block_tables, seq_lens, k_caches, v_caches, norms, weights, biases,
          formats, outs, eps, scales, windows, num_heads, num_kv_heads, head_dim, act):
        return torch.empty_like(hidden, memory_format=torch.contiguous_format)


cpu_ext.register_fakes(_register_fake)


def _norm(m: nn.Module) -> tuple[torch.Tensor, float]:
    if not isinstance(m, RMSNorm) or type(m).forward is not RMSNorm.forward or m.offset:
        raise NotEligible(f"norm {type(m).__name__} is not a plain RMSNorm")
    w = m.weight
    if w.device.type != "cpu" or w.dtype != _DTYPE or w.dim() != 1:
        raise NotEligible("norm weight is not a 1-D bf16 CPU tensor")
    return w.detach(), float(m.eps)


def _linear(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, int, int]:
    """(packed weight, bias, fmt, n): fmt >= 4 a qmm format, 0 a dense pair-tiled weight."""
    from mistralpy.quant.gguf_kernels_cpu import CpuQMatmulKernel

    if not isinstance(m, Linear) or type(m).forward is not Linear.forward:
        raise NotEligible(f"linear {type(m).__name__} has its own forward")
    bias = m.bias.detach() if m.bias is not None else None
    if bias is not None and (bias.device.type != "cpu" or bias.dtype != _DTYPE):
        raise NotEligible("bias is not a bf16 CPU tensor")
    k = m.qkernel
    if k is not None:
        if type(k) is not CpuQMatmulKernel or k.dtype != _DTYPE or k.in_features % 32:
            raise NotEligible(f"quantized kernel {type(k).__name__} is not a bf16 CpuQMatmulKernel")
        return k.packed, bias, int(k.fmt), int(k.out_features)
    w = m.weight
    if w is None or w.device.type != "cpu" or w.dtype != _DTYPE or not dense_cpu.is_packed(w) or not w.is_contiguous():
        raise NotEligible("dense weight is not pair-tiled bf16 (layers/dense_cpu.py)")
    n = dense_cpu.out_features(w)
    if n != m.out_features:
        raise NotEligible("dense weight size does not match the layer")
    return w.detach(), bias, 0, n


class NativeDecode:
    """Takes the place of ``model.model.decode_layers``: the C++ op on all-decode steps."""

    def __init__(self, model: nn.Module) -> None:
        inner = getattr(model, "model", None)
        if inner is None or not hasattr(inner, "decode_layers") or not hasattr(inner, "layers"):
            raise NotEligible(f"{type(model).__name__} has no decode_layers")
        if not cpu_ext.load() or not hasattr(torch.ops.mistralpy_cpu, "decode_layers"):
            raise NotEligible("the CPU extension is not loaded")
        if not (cpu_fused.available() and cpu_paged.available()):
            raise NotEligible("the fused / paged CPU ops are not loaded")
        layers = list(inner.layers)
        if not layers:
            raise NotEligible("no layers")
        self.inner = inner
        self.rope: RotaryEmbedding | None = None
        norms, eps, weights, biases, formats, outs, scales, windows = [], [], [], [], [], [], [], []
        shape = None
        for layer in layers:
            if not isinstance(layer, LlamaDecoderLayer) or type(layer).forward is not LlamaDecoderLayer.forward:
                raise NotEligible(f"layer {type(layer).__name__} is not a Llama decoder layer")
            attn, mlp = layer.self_attn, layer.mlp
            if not isinstance(attn, LlamaAttention) or type(attn).forward is not LlamaAttention.forward:
                raise NotEligible(f"attention {type(attn).__name__} has its own forward")
            if type(attn.backend) is not TorchRefBackend:
                raise NotEligible(f"attention backend {type(attn.backend).__name__}")
            if attn.spec.logit_softcap is not None:
                raise NotEligible("logit softcap")
            rope = attn.rotary_emb
            if type(rope) is not RotaryEmbedding or rope.rotary_dim != attn.head_dim:
                raise NotEligible("not a full-head standard RoPE")
            if self.rope is None:
                self.rope = rope
            elif rope is not self.rope:
                raise NotEligible("layers use different RoPE tables")
            layer_shape = (attn.num_heads, attn.num_kv_heads, attn.head_dim, bool(attn.qk_norm))
            if shape is None:
                shape = layer_shape
            elif layer_shape != shape:
                raise NotEligible("layers differ in heads, head dim or q/k norms")
            if list(attn.qkv_proj.shard_sizes) != [attn.q_size, attn.kv_size, attn.kv_size]:
                raise NotEligible("fused qkv shards do not match the heads")
            if not isinstance(mlp, GatedMLP) or type(mlp).forward is not GatedMLP.forward:
                raise NotEligible(f"MLP {type(mlp).__name__} is not a gated MLP")
            act = activation._FUSED.get(mlp.act_fn)
            if act != cpu_fused.ACT_CODES["silu"]:
                raise NotEligible("activation is not SiLU")
            layer_norms = [layer.input_layernorm, layer.post_attention_layernorm]
            if attn.qk_norm:
                layer_norms += [attn.q_norm, attn.k_norm]
            for m in layer_norms:
                w, e = _norm(m)
                norms.append(w)
                eps.append(e)
            for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
                w, b, fmt, n = _linear(m)
                weights.append(w)
                biases.append(b)
                formats.append(fmt)
                outs.append(n)
            scales.append(float(attn.spec.scale))
            windows.append(int(attn.spec.sliding_window or 0))
        self.num_heads, self.num_kv_heads, self.head_dim, _ = shape
        self.num_layers = len(layers)
        self._args = (norms, weights, biases, formats, outs, eps, scales, windows)
        self._op = torch.ops.mistralpy_cpu.decode_layers.default
        self._caches: tuple[Any, list[torch.Tensor], list[torch.Tensor]] | None = None  # (kv_caches, ks, vs)
        self._eager = inner.decode_layers
        self.calls = 0  # steps served by the op (tests check it is really used)

    @classmethod
    def install(cls, model: nn.Module) -> NativeDecode | None:
        """Install on `model` when it qualifies (else None, logged at debug level)."""
        try:
            native = cls(model)
        except NotEligible as why:
            log.debug("native decode not used: %s", why)
            return None
        native.inner.decode_layers = native
        log.debug("native decode installed over %d layers", native.num_layers)
        return native

    def uninstall(self) -> None:
        if self.inner.__dict__.get("decode_layers") is self:
            del self.inner.__dict__["decode_layers"]  # the class's eager method again

    def _cache_lists(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
        """The k and v caches as two lists, checked once per kv_caches list (the runner keeps one)."""
        cached = self._caches
        if cached is not None and cached[0] is kv_caches:
            return cached[1], cached[2]
        if len(kv_caches) != self.num_layers:
            return None
        ks, vs = [kv[0] for kv in kv_caches], [kv[1] for kv in kv_caches]
        for k, v in zip(ks, vs):
            if (k.device.type != "cpu" or k.dtype not in cpu_paged._DTYPES or not k.is_contiguous()
                    or cpu_paged.values_in_keys(k, v) or v.dtype != k.dtype or not v.is_contiguous()
                    or k.shape[2] != self.num_kv_heads or k.shape[3] != self.head_dim or v.shape[3] != self.head_dim):
                return None
        self._caches = (kv_caches, ks, vs)
        return ks, vs

    def __call__(self, positions: torch.Tensor, hidden: torch.Tensor,
                 kv_caches: list[tuple[torch.Tensor, torch.Tensor]], md: Any) -> torch.Tensor:
        if (not isinstance(md, TorchRefMetadata) or not md.all_decode or md.decode_rows is None
                or hidden.device.type != "cpu" or hidden.dtype != _DTYPE or hidden.dim() != 2
                or hidden.requires_grad or torch.compiler.is_compiling()):
            return self._eager(positions, hidden, kv_caches, md)
        caches = self._cache_lists(kv_caches)
        if caches is None:
            return self._eager(positions, hidden, kv_caches, md)
        rope = self.rope
        rope._check(positions)  # grows the cos/sin tables past the step's largest position, as eager
        if positions.dtype not in (torch.int64, torch.int32):
            positions = positions.long()
        norms, weights, biases, formats, outs, eps, scales, windows = self._args
        out = self._op(hidden.contiguous(), positions, rope._cos, rope._sin, md.slot_mapping, md.decode_blocks,
                       md.decode_lens, caches[0], caches[1], norms, weights, biases, formats, outs, eps, scales,
                       windows, self.num_heads, self.num_kv_heads, self.head_dim, cpu_fused.ACT_CODES["silu"])
        self.calls += 1
        return self.inner.norm(out)
