"""torch.compile of decode steps (opt-in: ``Engine(..., compile=True)``, ``--compile``).

On a small model the eager decode step spends more time dispatching ~40 small ops per decoder
layer (norm upcasts, rotary, residual adds, casts, the attention gather and softmax) than in its
matmuls. Here decode-only steps run every decoder layer through one compiled function, shared
by all layers (parameters are graph inputs, so the layer is traced once, not once per layer).
Inductor's C++ codegen turns each layer into four fused loops around the four matmuls: input
norm; rotary + KV-cache write + one-query attention over the paged cache
(``attention/torch_ref._traced_decode``); residual + post-attention norm; SiLU-and-mul; the
quantized and dense matmuls stay the aten ops they are. Steps with prefill rows run eagerly
(their time is in the matmuls), so only decode shapes are compiled: one graph for a single
sequence and one with a dynamic batch size, both dynamic in the context length.

Compiling the whole layer stack as one graph runs a step ~0.6 ms faster (less per-call
dispatch) but takes ~50 s per graph instead of ~8-18 s, so layers are compiled one at a time.
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


def _rotary_modules(model: nn.Module) -> list[nn.Module]:
    from mistralpy.layers.rotary import RotaryEmbedding

    return [m for m in model.modules() if isinstance(m, RotaryEmbedding)]


class CompiledDecode:
    """Takes the place of ``model.model.decode_layers``: compiled layers on decode-only steps."""

    skip_guards = True

    def __init__(self, model: nn.Module, max_model_len: int) -> None:
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
        self._graphs: set[bool] = set()  # `batched` of each graph compiled so far
        self.compile_seconds = 0.0
        inner.decode_layers = self

    def _run(self, positions: torch.Tensor, hidden: torch.Tensor,
             kv_caches: list[tuple[torch.Tensor, torch.Tensor]], md: Any) -> torch.Tensor:
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
