"""A weight still in its GGUF storage form, as handed from a loader to the layers.

GGUF files (and ISQ, which encodes float weights into the same block formats) give each weight
as raw block bytes plus a ggml type. Layers decide what to do with it: linear layers keep the
bytes and multiply with a quantized kernel, an embedding dequantizes only the rows it looks up,
norms and other small tensors take the float values.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from gguf import GGMLQuantizationType as Q

from mistralpy.quant.gguf.dequant import dequantize

FLOAT_TYPES = frozenset({Q.F32, Q.F16, Q.BF16})


@dataclass(slots=True)
class GGUFTensor:
    """raw: uint8 [rows, row_bytes] (or any contiguous byte view) holding `shape` in `qtype`."""

    raw: torch.Tensor
    qtype: Q
    shape: tuple[int, ...]  # PyTorch order: [out, in] for a weight matrix

    @property
    def is_float(self) -> bool:
        return self.qtype in FLOAT_TYPES

    @property
    def is_quantized(self) -> bool:
        return not self.is_float

    def rows(self) -> torch.Tensor:
        """The raw bytes as [shape[0], row_bytes] (one row per output feature)."""
        return self.raw.reshape(self.shape[0], -1)

    def to_float(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dequantized (or plainly converted) values of `shape` in `dtype`."""
        return dequantize(self.raw, self.qtype, self.shape).to(dtype)

    def row_slice(self, start: int, stop: int) -> GGUFTensor:
        """Output rows [start, stop) of a 2-D tensor (rows are independent in every block format)."""
        return GGUFTensor(self.rows()[start:stop], self.qtype, (stop - start, *self.shape[1:]))
