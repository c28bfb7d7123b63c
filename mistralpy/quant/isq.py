"""In-situ quantization (ISQ): float checkpoints quantized tensor by tensor while they load.

Names follow mistral.rs (`Q4K`, `Q8_0`, `HQQ4`, `FP8`, ...; llama.cpp spellings like `Q4_K` are
accepted too) and so does the shorthand: a bit count picks a type per device. On CPU the shorthand
picks the types with the fastest kernels here (`quant/gguf/kernels.py`):

    2 -> Q2K   3 -> Q3K   4 -> Q4K   5 -> Q5K   6 -> Q6K   8 -> Q8_0

Types (`parse_isq` returns a gguf `GGMLQuantizationType` for the GGUF block formats and an `IsqType`
for the others):

- GGUF block formats: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2K, Q3K, Q4K, Q5K, Q6K, IQ4_NL, IQ4_XS and
  Q8K (ggml's Q8_K: 256 int8 with one f32 scale). They run on the GGUF kernels and (all but Q8K,
  which llama.cpp cannot multiply with) can be written out as a standard GGUF file.
- HQQ4 / HQQ8 (`quant/hqq.py`): 4/8-bit asymmetric groups of 64 with a zero point optimized by
  HQQ's half-quadratic solver; the int4 kernel on CPU. Not GGUF types (`mistralpy quantize` refuses them).
- FP8 (alias F8E4M3, `quant/fp8.py`): E4M3 bytes with a float32 scale per output row.

Only the linear layers of the decoder are quantized; the token embedding keeps the model dtype
and an untied LM head takes Q8_0, as mistral.rs keeps them at higher precision. Widths that do not
fit a type's blocks fall back the way llama.cpp does (Q2K/Q3K -> IQ4_NL, Q4K -> Q5_0,
Q5K -> Q5_1, Q6K/Q8K -> Q8_0); HQQ4/HQQ8 need rows that are multiples of 64 and fall back to Q8_0
(the conservative choice: never less precise); a row that is not a multiple of 32 stays in float.
FP8 takes any width.
"""
from __future__ import annotations

import re
from enum import Enum
from typing import Any, Protocol, runtime_checkable

import torch
from gguf import GGMLQuantizationType as Q

from mistralpy.errors import InvalidRequestError
from mistralpy.quant.gguf.dequant import BLOCK_SIZES
from mistralpy.quant.gguf.tensor import GGUFTensor

ISQ_TYPES: dict[str, Q] = {
    "Q4_0": Q.Q4_0, "Q4_1": Q.Q4_1, "Q5_0": Q.Q5_0, "Q5_1": Q.Q5_1, "Q8_0": Q.Q8_0,
    "Q2K": Q.Q2_K, "Q3K": Q.Q3_K, "Q4K": Q.Q4_K, "Q5K": Q.Q5_K, "Q6K": Q.Q6_K,
    "IQ4_NL": Q.IQ4_NL, "IQ4_XS": Q.IQ4_XS, "Q8K": Q.Q8_K,
}


class IsqType(Enum):
    """ISQ types that are not GGUF block formats (their own storage and kernels)."""
    HQQ4 = "HQQ4"
    HQQ8 = "HQQ8"
    FP8 = "FP8"


OTHER_TYPES: dict[str, IsqType] = {"HQQ4": IsqType.HQQ4, "HQQ8": IsqType.HQQ8, "FP8": IsqType.FP8,
                                   "F8E4M3": IsqType.FP8}
HQQ_GROUP = 64


@runtime_checkable
class QuantizedWeight(Protocol):
    """A weight in a non-GGUF ISQ format (hqq.HQQWeight, fp8.FP8Weight), as handed to the layers."""
    shape: tuple[int, int]

    def make_kernel(self, dtype: torch.dtype, device: torch.device) -> Any: ...


SHORTHAND_CPU: dict[str, str] = {"2": "Q2K", "3": "Q3K", "4": "Q4K", "5": "Q5K", "6": "Q6K", "8": "Q8_0"}
# mistral.rs's AFQ types (Metal-only there) have no kernel here.
NOT_YET = {"AFQ2", "AFQ3", "AFQ4", "AFQ6", "AFQ8"}
_FALLBACK: dict[Q, Q] = {Q.Q2_K: Q.IQ4_NL, Q.Q3_K: Q.IQ4_NL, Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0,
                         Q.IQ4_XS: Q.IQ4_NL, Q.Q8_K: Q.Q8_0}
_NAMES = ", ".join([*ISQ_TYPES, *OTHER_TYPES])


def parse_isq(name: str | int | None, device: torch.device | None = None) -> Q | IsqType | None:
    """An ISQ name or bit shorthand -> the GGUF type or IsqType (None: no ISQ). Unknown names raise."""
    if name is None:
        return None
    key = str(name).strip().upper()
    key = SHORTHAND_CPU.get(key, key)  # one mapping for every device until GPU kernels differ
    key = re.sub(r"^Q(\d)_K$", r"Q\1K", key)  # llama.cpp spelling
    if key in ISQ_TYPES:
        return ISQ_TYPES[key]
    if key in OTHER_TYPES:
        return OTHER_TYPES[key]
    if key in NOT_YET:
        raise InvalidRequestError(f"ISQ type {name!r} is not supported yet; use one of "
                                  f"{_NAMES} or a bit count (2, 3, 4, 5, 6, 8)", "isq")
    raise InvalidRequestError(f"unknown ISQ type {name!r}; use one of {_NAMES} "
                              "or a bit count (2, 3, 4, 5, 6, 8)", "isq")


def type_for_width(qtype: Q | IsqType, in_features: int) -> Q | IsqType | None:
    """`qtype`, or its fallback when rows of `in_features` values do not fit its blocks (None: float)."""
    if qtype is IsqType.FP8:
        return qtype
    if qtype in (IsqType.HQQ4, IsqType.HQQ8):
        if in_features % HQQ_GROUP == 0:
            return qtype
        qtype = Q.Q8_0
    while in_features % BLOCK_SIZES[qtype][0]:
        if qtype not in _FALLBACK:
            return None
        qtype = _FALLBACK[qtype]
    return qtype


def head_type(qtype: Q | IsqType) -> Q:
    """The LM head's type under ISQ `qtype`: at least 8 bits."""
    return Q.Q8_0


def quantize_tensor(weight: torch.Tensor, qtype: Q | IsqType) -> GGUFTensor | QuantizedWeight | torch.Tensor:
    """Encode a float [out, in] weight as `qtype` (or its width fallback); unchanged if none fits.

    GGUF types give a GGUFTensor; HQQ4/HQQ8 an hqq.HQQWeight, FP8 an fp8.FP8Weight."""
    from mistralpy.quant.gguf.quantize import quantize

    chosen = type_for_width(qtype, weight.shape[-1])
    if chosen is None:
        return weight
    if chosen is IsqType.FP8:
        from mistralpy.quant.fp8 import quantize_fp8
        return quantize_fp8(weight, qtype=chosen)
    if isinstance(chosen, IsqType):
        from mistralpy.quant.hqq import quantize_hqq
        return quantize_hqq(weight, 4 if chosen is IsqType.HQQ4 else 8, qtype=chosen)
    raw = quantize(weight, chosen)
    return GGUFTensor(raw, chosen, tuple(weight.shape))
