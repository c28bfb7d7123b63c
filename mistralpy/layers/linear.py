"""Linear layers with weight loaders.

Weights keep HF's [out, in] layout; the product goes through ``layers.matmul.linear`` (the fast
CPU ordering is explained there). Each parameter carries a ``weight_loader(param, hf_tensor,
shard=None)`` so the model's generic loader needs no per-layer knowledge.

``MergedLinear`` fuses several HF projections (q/k/v, gate/up) into one matmul; each checkpoint
tensor lands in its column range (``stacked_params`` in the model maps the names).

A loader may also hand a ``GGUFTensor`` (a GGUF file, or ISQ). A quantized one is not expanded:
the layer drops its float parameter and multiplies with a quantized kernel
(``quant/gguf/kernels.py``) over the raw blocks. Merged shards of one block type are joined row-wise
into one kernel (block rows are independent); mixed types (Q4_K_M files keep attn_v in Q6_K) get
one kernel per shard, their outputs concatenated. ISQ (``isq`` set before loading) encodes float
checkpoint tensors into a GGUF block type on the way in and then takes the same path; the non-GGUF
ISQ types (HQQ4/HQQ8, FP8: ``isq.QuantizedWeight``) build their own kernel (``make_kernel``), merged
shards joined row-wise (``cat``) as GGUF ones are.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from gguf import GGMLQuantizationType as Q
from torch import nn

from mistralpy.errors import ModelLoadError
from mistralpy.layers.matmul import linear
from mistralpy.quant.gguf.tensor import GGUFTensor
from mistralpy.quant.isq import IsqType, QuantizedWeight, quantize_tensor

Kernel = Callable[[torch.Tensor], torch.Tensor]


def _shape_of(loaded: torch.Tensor | GGUFTensor) -> tuple[int, ...]:
    return tuple(loaded.shape)


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor | GGUFTensor, shard: int | None = None) -> None:
    if tuple(param.shape) != _shape_of(loaded):
        raise ModelLoadError(f"checkpoint shape {_shape_of(loaded)} does not match the model's {tuple(param.shape)}")
    if isinstance(loaded, GGUFTensor):
        loaded = loaded.to_float(param.dtype)
    param.data.copy_(loaded)


def _param(*shape: int, loader=default_weight_loader) -> nn.Parameter:
    # torch.empty does not touch memory: weights are written exactly once, by the loader.
    p = nn.Parameter(torch.empty(*shape), requires_grad=False)
    p.weight_loader = loader
    return p


def make_kernel(t: GGUFTensor, dtype: torch.dtype, device: torch.device) -> Kernel:
    """A quantized matmul kernel over `t`'s raw blocks, computing in `dtype`."""
    from mistralpy.quant.gguf.kernels import make_gguf_kernel  # only quantized models need it

    out_features, in_features = t.shape
    rows = t.rows().to(device)
    return make_gguf_kernel(rows, t.qtype, out_features, in_features, dtype=dtype, device=device)


def isq_encode(loaded: torch.Tensor | GGUFTensor, isq: Q | IsqType | None
               ) -> torch.Tensor | GGUFTensor | QuantizedWeight:
    """A float checkpoint tensor encoded to the ISQ type `isq` (unchanged without one or when the
    checkpoint is already quantized)."""
    if isq is None or isinstance(loaded, GGUFTensor):
        return loaded
    return quantize_tensor(loaded, isq)


def kernel_or_float(loaded: torch.Tensor | GGUFTensor | QuantizedWeight, dtype: torch.dtype,
                    device: torch.device) -> Kernel | torch.Tensor:
    """What a weight loader does with a checkpoint value: a quantized kernel for a quantized one,
    else the float values to copy into the parameter."""
    if isinstance(loaded, QuantizedWeight):
        return loaded.make_kernel(dtype, device)
    if isinstance(loaded, GGUFTensor):
        return make_kernel(loaded, dtype, device) if loaded.is_quantized else loaded.to_float(dtype)
    return loaded


def _shard_kernel(s: GGUFTensor | QuantizedWeight, dtype: torch.dtype, device: torch.device) -> Kernel:
    if isinstance(s, QuantizedWeight):
        return s.make_kernel(dtype, device)
    if s.is_float:  # a float shard beside quantized ones (mixed formats)
        from mistralpy.quant.gguf.kernels import make_gguf_kernel
        return make_gguf_kernel(s.rows(), s.qtype, s.shape[0], s.shape[1], dtype=dtype, device=device)
    return make_kernel(s, dtype, device)


class ConcatKernel:
    """Kernels of consecutive output ranges applied to the same input, outputs side by side."""

    def __init__(self, kernels: Sequence[Kernel]) -> None:
        self.kernels = list(kernels)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([k(x) for k in self.kernels], dim=-1)

    def nbytes(self) -> int:
        return sum(k.nbytes() for k in self.kernels)


class Linear(nn.Module):
    """y = x W^T + b with W [out, in] as stored by HF."""

    prepackable = True  # the weight may be swapped for a oneDNN-packed one after loading

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = _param(out_features, in_features, loader=self._load_weight)
        self.bias = _param(out_features) if bias else None
        self.qkernel: Kernel | None = None  # set when the weight stays quantized
        self.isq: Q | IsqType | None = None  # set before loading: quantize float checkpoint tensors to this type

    def _load_weight(self, param: nn.Parameter, loaded: torch.Tensor | GGUFTensor, shard: int | None = None) -> None:
        if _shape_of(loaded) != (self.out_features, self.in_features):
            raise ModelLoadError(f"checkpoint shape {_shape_of(loaded)} does not match "
                                 f"[{self.out_features}, {self.in_features}]")
        value = kernel_or_float(isq_encode(loaded, self.isq), param.dtype, param.device)
        if isinstance(value, torch.Tensor):
            param.data.copy_(value)
        else:
            self.use_kernel(value)

    def use_kernel(self, kernel: Kernel) -> None:
        """Multiply with `kernel` from now on; the float weight is dropped (its memory freed)."""
        del self.weight
        self.weight = None
        self.qkernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qkernel is not None:
            y = self.qkernel(x)
            return y + self.bias if self.bias is not None else y
        return linear(x, self.weight, self.bias)


class MergedLinear(Linear):
    """Several projections of the same input stacked along the output dim."""

    def __init__(self, in_features: int, shard_sizes: Sequence[int], bias: bool = False) -> None:
        super().__init__(in_features, sum(shard_sizes), bias)
        self.shard_sizes = list(shard_sizes)
        self.shard_offsets = [sum(self.shard_sizes[:i]) for i in range(len(self.shard_sizes))]
        self._gguf_shards: dict[int, GGUFTensor | QuantizedWeight] = {}
        if self.bias is not None:
            self.bias.weight_loader = self._load_bias

    def _shard_range(self, loaded: torch.Tensor | GGUFTensor, shard: int | None) -> tuple[int, int]:
        if shard is None:
            raise ModelLoadError("a fused projection needs its shard index")
        start, size = self.shard_offsets[shard], self.shard_sizes[shard]
        if _shape_of(loaded)[0] != size:
            raise ModelLoadError(f"shard {shard} expects {size} rows, got {_shape_of(loaded)}")
        return start, size

    def _load_weight(self, param: nn.Parameter, loaded: torch.Tensor | GGUFTensor, shard: int | None = None) -> None:
        start, size = self._shard_range(loaded, shard)
        if _shape_of(loaded)[1] != self.in_features:
            raise ModelLoadError(f"shard {shard} expects {self.in_features} columns, got {_shape_of(loaded)}")
        loaded = isq_encode(loaded, self.isq)
        if isinstance(loaded, (GGUFTensor, QuantizedWeight)):
            # Held until every shard is in: only then is the kernel layout known.
            self._gguf_shards[shard] = loaded
            if len(self._gguf_shards) == len(self.shard_sizes):
                self._build_from_gguf(param)
            return
        param.data[start:start + size].copy_(loaded)

    def _build_from_gguf(self, param: nn.Parameter) -> None:
        shards = [self._gguf_shards[i] for i in range(len(self.shard_sizes))]
        self._gguf_shards = {}
        dtype, device = param.dtype, param.device
        if any(isinstance(s, QuantizedWeight) for s in shards):
            kinds = {(type(s), getattr(s, "qtype", None)) for s in shards}
            if len(kinds) == 1:  # one format: rows are independent, join them into one kernel
                self.use_kernel(type(shards[0]).cat(shards).make_kernel(dtype, device))
            else:
                self.use_kernel(ConcatKernel([_shard_kernel(s, dtype, device) for s in shards]))
            return
        if all(s.is_float for s in shards):
            for s, start, size in zip(shards, self.shard_offsets, self.shard_sizes):
                param.data[start:start + size].copy_(s.to_float(param.dtype))
            return
        if len({s.qtype for s in shards}) == 1:
            joined = GGUFTensor(torch.cat([s.rows() for s in shards]), shards[0].qtype,
                                (self.out_features, self.in_features))
            self.use_kernel(make_kernel(joined, dtype, device))
        else:
            self.use_kernel(ConcatKernel([make_kernel(s, dtype, device) for s in shards]))

    def finish_loading(self) -> None:
        if self._gguf_shards:
            missing = sorted(set(range(len(self.shard_sizes))) - set(self._gguf_shards))
            raise ModelLoadError(f"fused projection is missing shards {missing}")

    def _load_bias(self, param: nn.Parameter, loaded: torch.Tensor | GGUFTensor, shard: int | None = None) -> None:
        start, size = self._shard_range(loaded, shard)
        if isinstance(loaded, GGUFTensor):
            loaded = loaded.to_float(param.dtype)
        param.data[start:start + size].copy_(loaded)

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(y.split(self.shard_sizes, dim=-1))
