"""Mixture-of-experts building blocks shared by the MoE families (Mixtral, Qwen3-MoE, Phi-3.5-MoE,
DeepSeek).

``FusedExperts`` holds ``num_experts`` gated MLPs, each an ordinary ``MergedLinear`` gate/up
projection and a ``Linear`` down projection, so ISQ and GGUF kernels apply per expert exactly as
they do to a dense MLP. Tokens are grouped per expert (one argsort by expert id), each expert that
received tokens runs once on its rows, and the routing-weighted results are added back in float32.

Weight names. Our parameters are ``...experts.{e}.gate_up_proj.weight`` (shards gate=0, up=1) and
``...experts.{e}.down_proj.weight``. Families map their checkpoint names onto these with
``stacked_params`` / ``map_weight_name`` (mistralpy/models/base.py):

- Mixtral / Phi-MoE: ``experts.{e}.w1`` (gate) / ``w3`` (up) / ``w2`` (down);
- Qwen3-MoE / DeepSeek: ``experts.{e}.gate_proj`` / ``up_proj`` / ``down_proj``;
- transformers 5 fused 3-D tensors ``experts.gate_up_proj`` [E, 2I, H] and ``experts.down_proj``
  [E, H, I]: ``split_fused_experts`` turns one into per-expert 2-D tensors under the names above;
- GGUF (llama.cpp) stacked ``blk.N.ffn_{gate,up,down}_exps`` [E, out, in]: cut per expert on the
  raw blocks by the loader hook (loading/gguf_families/moe.py), named as Qwen3-MoE's above.

The router (``Router``) stays float under ISQ. Under torch.compile (worker/compile.py compiles
whole decoder layers) the per-expert loop, whose row counts are data-dependent, is one opaque
custom op.
"""
from __future__ import annotations

import itertools
import weakref
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from mistralpy.layers.matmul import linear
from mistralpy.layers.mlp import GatedMLP


class Router(nn.Module):
    """The expert-scoring projection: logits = x W^T, W [num_experts, hidden].

    Not a ``Linear`` on purpose: ISQ leaves it in float (as llama.cpp's quantizer leaves
    ``ffn_gate_inp``), since small errors here flip expert choices. A GGUF weight is dequantized.
    """

    prepackable = True

    def __init__(self, hidden_size: int, num_experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size), requires_grad=False)
        # Only worker/compile.py sets it (an opaque op over the prepacked weight), as on Linear.
        self.qkernel = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> router logits [T, E] in x's dtype."""
        if self.qkernel is not None:
            return self.qkernel(x)
        return linear(x, self.weight)


_KEYS = itertools.count()
_BY_KEY: weakref.WeakValueDictionary[int, FusedExperts] = weakref.WeakValueDictionary()


@torch.library.custom_op("mistralpy_moe::fused_experts", mutates_args=())
def _fused_experts_op(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                      key: torch.Tensor) -> torch.Tensor:
    return _BY_KEY[int(key)].run_experts(x, topk_weights, topk_ids)


@_fused_experts_op.register_fake
def _(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class FusedExperts(nn.Module):
    """``num_experts`` SwiGLU-style expert MLPs applied to routed tokens.

    The experts are children named ``0`` .. ``E-1``, so parameter names are
    ``<block>.experts.{e}.gate_up_proj.weight`` (no extra level); indexing and iteration work as on
    a ModuleList (a plain Module, because torch.compile special-cases ModuleList). ``self.experts[e]``
    (== ``self[e]``) has ``gate_up_proj`` (MergedLinear [2*inter, hidden], shards gate=0, up=1)
    and ``down_proj`` (Linear [hidden, inter]): ordinary layers, so ISQ and GGUF kernels apply per
    expert.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, act: str = "silu",
                 bias: bool = False) -> None:
        super().__init__()
        for e in range(num_experts):
            self.add_module(str(e), GatedMLP(hidden_size, intermediate_size, act, bias))
        self.num_experts = num_experts
        self.hidden_size = hidden_size

        # Key of this module in _BY_KEY, a buffer so that a compiled layer gets it as a graph input
        # (one graph serves every layer) and the opaque op finds the right experts.
        self._key = next(_KEYS)
        _BY_KEY[self._key] = self
        self.register_buffer("moe_key", torch.tensor(self._key, dtype=torch.int64), persistent=False)

    def __getitem__(self, e: int) -> GatedMLP:
        return self._modules[str(e)]

    def __iter__(self) -> Iterator[GatedMLP]:
        return (self._modules[str(e)] for e in range(self.num_experts))

    def __len__(self) -> int:
        return self.num_experts

    @property
    def experts(self) -> FusedExperts:
        return self

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """x [T, H]; topk_weights [T, k] float32 (already normalised as the family wants);
        topk_ids [T, k] int64 -> [T, H] in x's dtype.

        Each (token, slot) pair is one row of work; rows are sorted by expert so every expert
        that got tokens runs once on a contiguous gather of its rows. The per-expert row counts
        are data-dependent, so under torch.compile (worker/compile.py) the whole call is one
        opaque op.
        """
        if torch.compiler.is_compiling():
            return torch.ops.mistralpy_moe.fused_experts(x, topk_weights, topk_ids, self.moe_key)
        return self.run_experts(x, topk_weights, topk_ids)

    def run_experts(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """The eager computation behind ``forward``."""
        t, k = topk_ids.shape
        flat_ids = topk_ids.reshape(-1)
        order = torch.argsort(flat_ids, stable=True)  # stable: deterministic per-token order
        counts = torch.bincount(flat_ids, minlength=self.num_experts).tolist()
        token_of_row = order // k
        weights = topk_weights.reshape(-1)[order].to(torch.float32).unsqueeze(-1)
        out = torch.zeros(t, x.shape[-1], dtype=torch.float32, device=x.device)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            rows = token_of_row[start:start + n]
            y = self[e](x.index_select(0, rows))
            out.index_add_(0, rows, y.float() * weights[start:start + n])
            start += n
        return out.to(x.dtype)


def topk_softmax_routing(router_logits: torch.Tensor, top_k: int, renormalize: bool
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts (float32), keep the top_k; with ``renormalize`` the kept
    probabilities are rescaled to sum to 1 (Mixtral; Qwen3-MoE's ``norm_topk_prob``).

    router_logits [T, E] -> (topk_weights [T, k] float32, topk_ids [T, k] int64).
    """
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def split_fused_experts(name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """A transformers-5 fused expert tensor -> per-expert checkpoint names our loader understands.

    ``...experts.gate_up_proj`` [E, 2I, H] -> ``...experts.{e}.gate_proj.weight`` [I, H] and
    ``...experts.{e}.up_proj.weight`` (first half gate, second half up, as transformers chunks it);
    ``...experts.down_proj`` [E, H, I] -> ``...experts.{e}.down_proj.weight``. Bias variants
    (``gate_up_proj_bias`` [E, 2I], ``down_proj_bias`` [E, H]) likewise. Other names pass through.
    """
    prefix, _, leaf = name.rpartition(".")
    if not isinstance(tensor, torch.Tensor) or not prefix.endswith("experts") or tensor.dim() not in (2, 3):
        yield name, tensor
        return
    kind = "weight" if tensor.dim() == 3 else "bias"
    if leaf in ("gate_up_proj", "gate_up_proj_bias") and (kind == "weight") == (leaf == "gate_up_proj"):
        for e, fused in enumerate(tensor):
            gate, up = fused.chunk(2, dim=0)
            yield f"{prefix}.{e}.gate_proj.{kind}", gate
            yield f"{prefix}.{e}.up_proj.{kind}", up
    elif leaf in ("down_proj", "down_proj_bias") and (kind == "weight") == (leaf == "down_proj"):
        for e, down in enumerate(tensor):
            yield f"{prefix}.{e}.down_proj.{kind}", down
    else:
        yield name, tensor


def split_all_fused_experts(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """``split_fused_experts`` over a whole checkpoint stream."""
    for name, tensor in weights:
        yield from split_fused_experts(name, tensor)
