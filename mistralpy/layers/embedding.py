"""Token embedding and LM head (optionally tied to the embedding).

Both accept a quantized ``GGUFTensor``: the embedding keeps the raw blocks and dequantizes only
the rows it looks up; the head multiplies with a quantized kernel (a tied head builds its kernel
from the embedding's blocks once loading is done).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q
from torch import nn

from mistralpy.errors import ModelLoadError
from mistralpy.layers.linear import Kernel, isq_encode, kernel_or_float, make_kernel
from mistralpy.layers.matmul import linear
from mistralpy.quant.gguf.dequant import dequantize
from mistralpy.quant.gguf.tensor import GGUFTensor


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)
        self.weight.weight_loader = self._load_weight
        self.qweight: GGUFTensor | None = None  # raw blocks, when the embedding stays quantized
        self.dtype = self.weight.dtype

    def _load_weight(self, param: nn.Parameter, loaded: torch.Tensor | GGUFTensor, shard: int | None = None) -> None:
        if tuple(loaded.shape) != tuple(param.shape):
            raise ModelLoadError(f"checkpoint shape {tuple(loaded.shape)} does not match the model's "
                                 f"{tuple(param.shape)}")
        if isinstance(loaded, GGUFTensor):
            if loaded.is_quantized:
                self.dtype = param.dtype
                # Own copy of the blocks (the loader's may be a view of a memory-mapped file).
                self.qweight = GGUFTensor(loaded.rows().to(param.device, copy=True), loaded.qtype, loaded.shape)
                del self.weight
                self.weight = None
                return
            loaded = loaded.to_float(param.dtype)
        param.data.copy_(loaded)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.qweight is not None:
            rows = self.qweight.raw.index_select(0, ids)
            return dequantize(rows, self.qweight.qtype, (ids.shape[0], self.qweight.shape[1])).to(self.dtype)
        return F.embedding(ids, self.weight)


class LMHead(nn.Module):
    """logits = h W^T. When tied, shares the embedding's weight (nothing to load; prepacking on CPU
    makes the head its own packed copy, as the embedding lookup needs the plain one)."""

    prepackable = True

    def __init__(self, vocab_size: int, hidden_size: int, tied_to: VocabEmbedding | None = None) -> None:
        super().__init__()
        self.tied = tied_to is not None
        self._embedding = [tied_to]  # a list: not registered as a submodule (no double counting)
        self.qkernel: Kernel | None = None
        self.isq: Q | None = None  # an untied head's ISQ type (set before loading)
        if tied_to is not None:
            self.weight = tied_to.weight
        else:
            self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)
            self.weight.weight_loader = self._load_weight

    def _load_weight(self, param: nn.Parameter, loaded: torch.Tensor | GGUFTensor, shard: int | None = None) -> None:
        if tuple(loaded.shape) != tuple(param.shape):
            raise ModelLoadError(f"checkpoint shape {tuple(loaded.shape)} does not match the model's "
                                 f"{tuple(param.shape)}")
        value = kernel_or_float(isq_encode(loaded, self.isq), param.dtype, param.device)
        if isinstance(value, torch.Tensor):
            param.data.copy_(value)
        else:
            self._use_kernel(value)

    def _use_kernel(self, kernel: Kernel) -> None:
        if "weight" in self._parameters:
            del self.weight
        self.weight = None
        self.qkernel = kernel

    def finish_loading(self) -> None:
        """A head tied to a quantized embedding multiplies with that embedding's blocks."""
        emb = self._embedding[0]
        if self.tied and emb is not None and emb.qweight is not None and self.qkernel is None:
            self._use_kernel(make_kernel(emb.qweight, emb.dtype, emb.qweight.raw.device))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.qkernel is not None:
            return self.qkernel(hidden)
        return linear(hidden, self.weight)
