"""Native decode: every decoder layer of a decode-only CPU step in one C++ op call.

Eager decode of a small model is bound by Python and per-op dispatch, not by its kernels
(SmolLM2-135M Q8_0, 30 layers, 2 threads: 5.8 ms of C++ kernels in a 9.9 ms step, ~13 ops a layer).
``mistralpy_cpu::decode_layers`` (kernels/cpu/decode_layers.cpp) makes, for each layer, exactly
the kernel calls the eager path makes (RMSNorm, qmm or dense products, RoPE, paged attention,
gated activation, torch's residual adds), so its output is bitwise the eager one.

``NativeDecode.install(model)`` takes the place of ``model.model.decode_layers`` when the model
qualifies (checked once: Llama-family or Gemma 1/2/3 layers with their stock forwards (exact classes'
forwards; Gemma's (1 + w) norms, its four norms per layer from Gemma 2 on, q/k norms, attention
soft-capping), bf16, a gated MLP with a fused activation, every linear a ``CpuQMatmulKernel``, an
``Int4PlaneKernel`` (Q6_K and the other plane formats; steps of 128+ rows stay eager, where it takes
another product), a ``ConcatKernel`` of those (merged shards of mixed formats) or a dense pair-tiled
weight, full-head standard RoPE (one table per distinct ``RotaryEmbedding``: Gemma 3's local and
global layers differ), the torch_ref backend with the C++ paged op); it then serves steps whose rows
are all decode rows and hands every other step to the original eager ``decode_layers``. The per-layer
tensors and sizes are gathered once, here. ``MISTRALPY_NATIVE_DECODE=0`` turns it off
(worker/model_runner.py); where it is installed, ``compile=True`` does not compile (this is faster).
"""
from __future__ import annotations

import logging
from typing import Any, NamedTuple

import torch
from torch import nn

from mistralpy.attention import cpu_paged
from mistralpy.attention.torch_ref import TorchRefBackend, TorchRefMetadata
from mistralpy.kernels import cpu as cpu_ext
from mistralpy.layers import activation, cpu_fused, dense_cpu
from mistralpy.layers.linear import ConcatKernel, Linear
from mistralpy.layers.mlp import GatedMLP
from mistralpy.layers.norm import RMSNorm
from mistralpy.layers.rotary import RotaryEmbedding
from mistralpy.models.gemma import GemmaDecoderLayer, GemmaModel
from mistralpy.models.gemma2 import Gemma2DecoderLayer
from mistralpy.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaModel

log = logging.getLogger(__name__)

_DTYPE = torch.bfloat16  # the dtype every kernel of the op takes (dense_mm is bf16 only)
_NORM_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_ARG_NAMES = ("norms", "eps", "offsets", "weights", "parts", "biases", "formats", "outs", "extras", "part_ints",
              "part_his", "scales", "windows", "softcaps")  # the op's per-layer / per-part lists, in its order
_INT4 = -1  # decode_layers.cpp's format code of an Int4PlaneKernel part
_INT4_MAX_ROWS = 128  # quant/gguf/kernels.py _DENSE_MIN_ROWS: Int4PlaneKernel's few-row branch below it


class NotEligible(Exception):
    """Why a model keeps the eager path."""


def _register_fake(namespace: str) -> None:
    @torch.library.register_fake(f"{namespace}::decode_layers")
    def _(hidden, positions, cos, sin, rope_ids, slots, block_tables, seq_lens, k_caches, v_caches, norms, eps,
          offsets, weights, parts, biases, formats, outs, extras, part_ints, part_his, scales, windows, softcaps,
          num_heads, num_kv_heads, head_dim, act, layout, qk_norm):
        return torch.empty_like(hidden, memory_format=torch.contiguous_format)


cpu_ext.register_fakes(_register_fake)


def _norm(m: nn.Module) -> tuple[torch.Tensor, float, float]:
    """(weight, eps, offset) of a norm the eager path runs as one fused rms_norm call with these."""
    if not isinstance(m, RMSNorm) or type(m).forward is not RMSNorm.forward:
        raise NotEligible(f"norm {type(m).__name__} is not a plain RMSNorm")
    w = m.weight
    # RMSNorm.forward takes the fused op for an offset norm whatever its weight dtype, else a bf16 weight
    if w.device.type != "cpu" or w.dim() != 1 or not (w.dtype == _DTYPE or (m.offset and w.dtype in _NORM_DTYPES)):
        raise NotEligible("norm weight is not a 1-D CPU tensor the fused norm takes")
    return w.detach(), float(m.eps), float(m.offset)


class _Part(NamedTuple):
    """One kernel of a linear: weight, fmt (>= 4 qmm, 0 dense pair-tiled, -1 Int4PlaneKernel), out
    features n; an int4 part's scales / zeros, fold multiplier, group, fold width (0: none), fold hi."""
    weight: torch.Tensor
    fmt: int
    n: int
    sz: torch.Tensor | None = None
    hi_mult: torch.Tensor | None = None
    group: int = 0
    h: int = 0
    hi: float = 0.0


def _quant_part(k: Any) -> _Part:
    from mistralpy.quant.gguf.kernels import Int4PlaneKernel
    from mistralpy.quant.gguf.kernels_cpu import CpuQMatmulKernel

    if type(k) is CpuQMatmulKernel and type(k).__call__ is CpuQMatmulKernel.__call__:
        if k.dtype != _DTYPE or k.in_features % 32:
            raise NotEligible("quantized kernel is not a bf16 CpuQMatmulKernel")
        return _Part(k.packed, int(k.fmt), int(k.out_features))
    if type(k) is Int4PlaneKernel and type(k).__call__ is Int4PlaneKernel.__call__:
        # the op runs its few-row bf16 branch: aten's int4 product (steps of more rows stay eager)
        if k.dtype != _DTYPE or k._int4_rows != _INT4_MAX_ROWS or k.packed.shape[0] != k.padded:
            raise NotEligible("Int4PlaneKernel is not a bf16 one")
        h, hi = (int(k.fold[0]), float(k.fold[2])) if k.fold is not None else (0, 0.0)
        return _Part(k.packed, _INT4, int(k.out_features), k.sz, k._hi_mult, int(k.group), h, hi)
    raise NotEligible(f"quantized kernel {type(k).__name__} is not a CpuQMatmulKernel or Int4PlaneKernel")


def _linear(m: nn.Module) -> tuple[list[_Part], torch.Tensor | None]:
    """(its parts, bias): one part, or several (quantized) for a ConcatKernel, their outputs concatenated."""
    if not isinstance(m, Linear) or type(m).forward is not Linear.forward:
        raise NotEligible(f"linear {type(m).__name__} has its own forward")
    bias = m.bias.detach() if m.bias is not None else None
    if bias is not None and (bias.device.type != "cpu" or bias.dtype != _DTYPE):
        raise NotEligible("bias is not a bf16 CPU tensor")
    k = m.qkernel
    if k is not None:
        if type(k) is ConcatKernel and type(k).__call__ is ConcatKernel.__call__:
            parts = [_quant_part(p) for p in k.kernels]
        else:
            parts = [_quant_part(k)]
        if sum(p.n for p in parts) != m.out_features:
            raise NotEligible("quantized kernel sizes do not match the layer")
        return parts, bias
    w = m.weight
    if w is None or w.device.type != "cpu" or w.dtype != _DTYPE or not dense_cpu.is_packed(w) or not w.is_contiguous():
        raise NotEligible("dense weight is not pair-tiled bf16 (layers/dense_cpu.py)")
    n = dense_cpu.out_features(w)
    if n != m.out_features:
        raise NotEligible("dense weight size does not match the layer")
    return [_Part(w.detach(), 0, n)], bias


def _layout(layer: nn.Module) -> int:
    """0: Llama's (and Gemma 1's) layer forward, 1: Gemma 2 / 3's (norms around attention and MLP)."""
    fwd = type(layer).forward
    if isinstance(layer, LlamaDecoderLayer) and fwd is LlamaDecoderLayer.forward:
        return 0
    if isinstance(layer, GemmaDecoderLayer) and fwd is GemmaDecoderLayer.forward:
        return 0
    if isinstance(layer, Gemma2DecoderLayer) and fwd is Gemma2DecoderLayer.forward:
        return 1
    raise NotEligible(f"layer {type(layer).__name__} is not a Llama or Gemma decoder layer")


def _layer_norms(layer: nn.Module, layout: int, qk_norm: bool) -> list[nn.Module]:
    norms = [layer.input_layernorm, layer.post_attention_layernorm]
    if layout == 1:
        norms += [layer.pre_feedforward_layernorm, layer.post_feedforward_layernorm]
    if qk_norm:
        norms += [layer.self_attn.q_norm, layer.self_attn.k_norm]
    return norms


class NativeDecode:
    """Takes the place of ``model.model.decode_layers``: the C++ op on all-decode steps."""

    def __init__(self, model: nn.Module) -> None:
        if getattr(model, "cross_attention", False):   # its decode steps need the media (Mllama's cross layers)
            raise NotEligible(f"{type(model).__name__} cross-attends to media on every step")
        inner = getattr(model, "model", None)
        if inner is None or not hasattr(inner, "decode_layers") or not hasattr(inner, "layers"):
            raise NotEligible(f"{type(model).__name__} has no decode_layers")
        if type(inner).decode_layers not in (LlamaModel.decode_layers, GemmaModel.decode_layers):
            raise NotEligible(f"{type(inner).__name__} has its own decode_layers")
        if not cpu_ext.load() or not hasattr(cpu_ext.ops(), "decode_layers"):
            raise NotEligible("the CPU extension is not loaded")
        if not (cpu_fused.available() and cpu_paged.available()):
            raise NotEligible("the fused / paged CPU ops are not loaded")
        layers = list(inner.layers)
        if not layers:
            raise NotEligible("no layers")
        self.inner = inner
        self.ropes: list[RotaryEmbedding] = []  # the distinct tables, in first-use order
        rope_ids: list[int] = []
        norms, eps, offsets, weights, parts, biases, formats, outs = [], [], [], [], [], [], [], []
        scales, windows, softcaps, extras, part_ints, part_his = [], [], [], [], [], []
        shape = None
        for layer in layers:
            layout = _layout(layer)
            attn, mlp = layer.self_attn, layer.mlp
            if not isinstance(attn, LlamaAttention) or type(attn).forward is not LlamaAttention.forward:
                raise NotEligible(f"attention {type(attn).__name__} has its own forward")
            if type(attn.backend) is not TorchRefBackend:
                raise NotEligible(f"attention backend {type(attn.backend).__name__}")
            rope = attn.rotary_emb
            if type(rope) is not RotaryEmbedding or rope.rotary_dim != attn.head_dim:
                raise NotEligible("not a full-head standard RoPE")
            if not any(rope is r for r in self.ropes):
                self.ropes.append(rope)
            rope_ids.append(next(i for i, r in enumerate(self.ropes) if r is rope))
            act = activation._FUSED.get(mlp.act_fn) if isinstance(mlp, GatedMLP) else None
            layer_shape = (attn.num_heads, attn.num_kv_heads, attn.head_dim, bool(attn.qk_norm), layout, act)
            if shape is None:
                shape = layer_shape
            elif layer_shape != shape:
                raise NotEligible("layers differ in heads, head dim, q/k norms, layout or activation")
            if list(attn.qkv_proj.shard_sizes) != [attn.q_size, attn.kv_size, attn.kv_size]:
                raise NotEligible("fused qkv shards do not match the heads")
            if not isinstance(mlp, GatedMLP) or type(mlp).forward is not GatedMLP.forward:
                raise NotEligible(f"MLP {type(mlp).__name__} is not a gated MLP")
            if act is None:
                raise NotEligible("activation has no fused kernel")
            for m in _layer_norms(layer, layout, bool(attn.qk_norm)):
                w, e, o = _norm(m)
                norms.append(w)
                eps.append(e)
                offsets.append(o)
            for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
                linear_parts, b = _linear(m)
                parts.append(len(linear_parts))
                biases.append(b)
                for p in linear_parts:
                    weights.append(p.weight)
                    formats.append(p.fmt)
                    outs.append(p.n)
                    extras += [p.sz, p.hi_mult]
                    part_ints += [p.group, p.h]
                    part_his.append(p.hi)
            scales.append(float(attn.spec.scale))
            windows.append(int(attn.spec.sliding_window or 0))
            softcaps.append(float(attn.spec.logit_softcap or 0.0))
        self.num_heads, self.num_kv_heads, self.head_dim, qk_norm, self.layout, self.act = shape
        self.qk_norm = qk_norm
        self.rope = self.ropes[0]
        self.num_layers = len(layers)
        self._args = (norms, eps, offsets, weights, parts, biases, formats, outs, extras, part_ints, part_his, scales,
                      windows, softcaps)
        self.args = dict(zip(_ARG_NAMES, self._args))  # by name, for tests and debugging
        # Int4PlaneKernel takes another product from this many rows: such steps stay eager
        self.max_rows = _INT4_MAX_ROWS if _INT4 in formats else None
        self._rope_ids = rope_ids
        self._op = cpu_ext.ops().decode_layers.default
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
                or hidden.requires_grad or torch.compiler.is_compiling()
                or (self.max_rows is not None and hidden.shape[0] >= self.max_rows)):
            return self._eager(positions, hidden, kv_caches, md)
        caches = self._cache_lists(kv_caches)
        if caches is None:
            return self._eager(positions, hidden, kv_caches, md)
        for rope in self.ropes:
            rope._check(positions)  # grows the cos/sin tables past the step's largest position, as eager
        if positions.dtype not in (torch.int64, torch.int32):
            positions = positions.long()
        out = self._op(hidden.contiguous(), positions, [r._cos for r in self.ropes], [r._sin for r in self.ropes],
                       self._rope_ids, md.slot_mapping, md.decode_blocks, md.decode_lens, caches[0], caches[1],
                       *self._args, self.num_heads, self.num_kv_heads, self.head_dim, self.act, self.layout, self.qk_norm)
        self.calls += 1
        return self.inner.norm(out)
