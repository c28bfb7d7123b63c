"""torch.compile of decode steps (opt-in: ``Engine(..., compile=True)``, ``--compile``).

On a small model the eager decode step spends more time dispatching ~40 small ops per decoder
layer (norm upcasts, rotary, residual adds, casts, the attention gather and softmax) than in its
matmuls. Here decode-only steps run every decoder layer through one compiled function, shared
by all layers (parameters are graph inputs, so the layer is traced once, not once per layer).
Inductor's C++ codegen turns each layer into a few fused loops around the matmuls and the
attention: input norm + rotary; residual + post-attention norm; SiLU-and-mul. Attention is the
kernel extension's ``paged_decode`` op (cache write + attention in place, ``attention/cpu_paged.py``)
or, without the extension, gathers and products over the paged cache
(``attention/torch_ref._traced_decode``) that inductor fuses; the quantized and dense matmuls stay
opaque ops. Steps with prefill rows run eagerly
(their time is in the matmuls), so only decode shapes are compiled: one graph for a single
sequence and one with a dynamic batch size, both dynamic in the context length.

Each compiled call costs ~30-50 us of dynamo/AOT wrapper work, so consecutive layers run in
groups of up to ``MAX_GROUP`` (6) per graph when every layer has the same class (the group size
divides the layer count: one graph shape): on SmolLM2-135M Q4_1 (30 layers, 2 threads) groups of
6 decode ~10-15% faster than one layer per call, for ~10 s of compiling instead of ~5 (the whole
stack as one graph compiles for ~40 s and was not faster). Mixed stacks (Gemma's sliding/global
layers) compile one layer per call.
Once the graph of a step's kind (single-sequence or batched) exists, guards are evaluated only
where they tell cached graphs apart (``skip_guard_eval_unsafe``; ~1 ms a step on 30 layers); the
kind itself is checked here, torch raises instead of running a wrong graph when a new one would
be needed, and the call then reruns with full guards.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


_LIB = torch.library.Library("mistralpy", "DEF")
# Inductor would lower oneDNN's linear on a prepacked (mkldnn) weight that is a graph input to a
# plain mm, which cannot read that layout: the product stays one opaque op. (The low-level
# Library API: a call costs ~3 us against ~12 us for torch.library.custom_op.)
_LIB.define("packed_linear(Tensor x, Tensor weight) -> Tensor")
_LIB.impl("packed_linear", lambda x, weight: torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], ""),
          "CompositeExplicitAutograd")


@torch.library.register_fake("mistralpy::packed_linear")
def _(x, weight):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


class _PackedLinear:
    """A Linear's qkernel slot holding its oneDNN-prepacked weight behind the opaque op."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mistralpy.packed_linear(x, self.weight)


def _wrap_packed_linears(root: nn.Module) -> int:
    count = 0
    for m in root.modules():
        w = getattr(m, "weight", None)
        if hasattr(m, "qkernel") and m.qkernel is None and isinstance(w, torch.Tensor) and w.is_mkldnn:
            m.qkernel = _PackedLinear(w)  # Linear.forward adds the bias
            count += 1
    return count


MAX_GROUP = 6


def _run_group(layers: tuple[nn.Module, ...], positions: torch.Tensor, hidden: torch.Tensor,
               kv_caches: tuple[tuple[torch.Tensor, torch.Tensor], ...], md: Any) -> torch.Tensor:
    """`layers` one after another (compiled once per group length: parameters are graph inputs)."""
    for layer, kv_cache in zip(layers, kv_caches):
        hidden = type(layer).forward(layer, positions, hidden, kv_cache, md)
    return hidden


def group_size(num_layers: int, same_class: bool, max_group: int = MAX_GROUP) -> int:
    """Layers per compiled call: the largest divisor of `num_layers` up to `max_group` (1 if mixed)."""
    if not same_class:
        return 1
    return max(g for g in range(1, max(1, min(max_group, num_layers)) + 1) if num_layers % g == 0)


def _rotary_modules(model: nn.Module) -> list[nn.Module]:
    from mistralpy.layers.rotary import RotaryEmbedding

    return [m for m in model.modules() if isinstance(m, RotaryEmbedding)]


class CompiledDecode:
    """Takes the place of ``model.model.decode_layers``: compiled layers on decode-only steps."""

    skip_guards = True

    def __init__(self, model: nn.Module, max_model_len: int) -> None:
        if getattr(model, "cross_attention", False):   # its decode steps need the media (Mllama's cross layers)
            raise ValueError(f"{type(model).__name__} cross-attends to media on every step: not compiled")
        inner = getattr(model, "model", None)
        if inner is None or not hasattr(inner, "decode_layers") or not hasattr(inner, "layers"):
            raise ValueError(f"{type(model).__name__} has no decode_layers to compile")
        import torch._inductor.config as inductor_config

        # A pool of compile workers keeps polling after compiling and slows a 2-core machine's
        # steps by ~25%: compile in this process.
        inductor_config.compile_threads = 1
        # Graphs of every engine in the process pile up on the one code object of the layer's
        # forward (2 per model and layer kind): allow more than the default 8.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        # Cos/sin tables sized once: a compiled graph does not grow them (RotaryEmbedding._check).
        for rope in _rotary_modules(model):
            rope.ensure_cache(max_model_len)
        _wrap_packed_linears(inner.layers)
        self.inner = inner
        self._eager = inner.decode_layers
        layer_types = {type(layer) for layer in inner.layers}
        self._layer_fns = {t: torch.compile(t.forward, fullgraph=True, dynamic=None) for t in layer_types}
        self.group = group_size(len(inner.layers), len(layer_types) == 1)
        self._group_fn = torch.compile(_run_group, fullgraph=True, dynamic=None) if self.group > 1 else None
        layers = list(inner.layers)
        self._groups = [tuple(layers[i:i + self.group]) for i in range(0, len(layers), self.group)]
        self._graphs: set[bool] = set()  # `batched` of each graph compiled so far
        self.compile_seconds = 0.0
        inner.decode_layers = self

    def _run(self, positions: torch.Tensor, hidden: torch.Tensor,
             kv_caches: list[tuple[torch.Tensor, torch.Tensor]], md: Any) -> torch.Tensor:
        if self._group_fn is not None:
            g = self.group
            for i, layers in enumerate(self._groups):
                hidden = self._group_fn(layers, positions, hidden, tuple(kv_caches[i * g:(i + 1) * g]), md)
            return self.inner.norm(hidden)
        fns = self._layer_fns
        for layer, kv_cache in zip(self.inner.layers, kv_caches):
            hidden = fns[type(layer)](layer, positions, hidden, kv_cache, md)
        return self.inner.norm(hidden)

    def __call__(self, positions: torch.Tensor, hidden: torch.Tensor,
                 kv_caches: list[tuple[torch.Tensor, torch.Tensor]], md: Any) -> torch.Tensor:
        if not getattr(md, "all_decode", False):
            return self._eager(positions, hidden, kv_caches, md)
        batched = hidden.shape[0] > 1
        if batched:
            for t in (positions, hidden, md.slot_mapping, md.decode_blocks, md.decode_lens):
                torch._dynamo.maybe_mark_dynamic(t, 0)
        if md.decode_blocks.shape[1] == 1:  # a size of 1 would be specialised: add a masked block
            md.decode_blocks = torch.nn.functional.pad(md.decode_blocks, (0, 1))
        torch._dynamo.maybe_mark_dynamic(md.decode_blocks, 1)
        # Once this step's kind of graph exists, skip the guards (~30 us a layer call): the only
        # other graph of this engine differs by `batched`, which is checked here.
        if self.skip_guards and batched in self._graphs:
            try:
                with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                    return self._run(positions, hidden, kv_caches, md)
            except RuntimeError as exc:
                # Layers already run wrote this step's K/V; the rerun writes the same values.
                if "skip_guard_eval_unsafe" not in str(exc):
                    raise
                log.debug("compiled decode: a new graph is needed, rerunning with guards")
        t0 = time.perf_counter()
        try:
            out = self._run(positions, hidden, kv_caches, md)
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            log.warning("compiled decode: too many graphs in this process, running eagerly from now on")
            self.inner.decode_layers = self._eager
            return self._eager(positions, hidden, kv_caches, md)
        if batched not in self._graphs:
            self._graphs.add(batched)
            dt = time.perf_counter() - t0
            self.compile_seconds += dt
            log.info("compiled the %s decode step in %.1f s", "batched" if batched else "single-sequence", dt)
        return out
