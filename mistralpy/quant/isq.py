"""In-situ quantization (ISQ): float checkpoints quantized tensor by tensor while they load.

Names follow mistral.rs (`Q4K`, `Q8_0`, ...; llama.cpp spellings like `Q4_K` are accepted too)
and so does the shorthand: a bit count picks a type per device. On CPU the shorthand picks the
types with the fastest kernels here (`quant/gguf_kernels.py`):

    2 -> Q2K   3 -> Q3K   4 -> Q4K   5 -> Q5K   6 -> Q6K   8 -> Q8_0

Every ISQ type is a GGUF block format, so an ISQ model runs on the same kernels as a GGUF file
and can be written out as a standard GGUF file. Only the linear layers of the decoder are
quantized; the token embedding keeps the model dtype and an untied LM head takes Q8_0 (or the
ISQ type itself when that is 8-bit), as mistral.rs keeps them at higher precision. K-quants need
rows that are multiples of 256 values; narrower weights fall back the way llama.cpp does
(Q2K/Q3K -> IQ4_NL, Q4K -> Q5_0, Q5K -> Q5_1, Q6K -> Q8_0), and a row that is not a multiple of
32 stays in float.
"""
from __future__ import annotations

import re

import torch
from gguf import GGMLQuantizationType as Q

from mistralpy.errors import InvalidRequestError
from mistralpy.quant.gguf_dequant import BLOCK_SIZES
from mistralpy.quant.gguf_tensor import GGUFTensor

ISQ_TYPES: dict[str, Q] = {
    "Q4_0": Q.Q4_0, "Q4_1": Q.Q4_1, "Q5_0": Q.Q5_0, "Q5_1": Q.Q5_1, "Q8_0": Q.Q8_0,
    "Q2K": Q.Q2_K, "Q3K": Q.Q3_K, "Q4K": Q.Q4_K, "Q5K": Q.Q5_K, "Q6K": Q.Q6_K,
    "IQ4_NL": Q.IQ4_NL, "IQ4_XS": Q.IQ4_XS,
}
SHORTHAND_CPU: dict[str, str] = {"2": "Q2K", "3": "Q3K", "4": "Q4K", "5": "Q5K", "6": "Q6K", "8": "Q8_0"}
# mistral.rs types that are not GGUF block formats; they need their own kernels.
NOT_YET = {"Q8K", "HQQ4", "HQQ8", "FP8", "F8E4M3", "AFQ2", "AFQ3", "AFQ4", "AFQ6", "AFQ8"}
_FALLBACK: dict[Q, Q] = {Q.Q2_K: Q.IQ4_NL, Q.Q3_K: Q.IQ4_NL, Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0,
                         Q.IQ4_XS: Q.IQ4_NL}


def parse_isq(name: str | int | None, device: torch.device | None = None) -> Q | None:
    """An ISQ name or bit shorthand -> the GGUF type (None: no ISQ). Unknown names raise."""
    if name is None:
        return None
    key = str(name).strip().upper()
    key = SHORTHAND_CPU.get(key, key)  # one mapping for every device until GPU kernels differ
    key = re.sub(r"^Q(\d)_K$", r"Q\1K", key)  # llama.cpp spelling
    if key in ISQ_TYPES:
        return ISQ_TYPES[key]
    if key in NOT_YET:
        raise InvalidRequestError(f"ISQ type {name!r} is not supported yet; use one of "
                                  f"{', '.join(ISQ_TYPES)} or a bit count (2, 3, 4, 5, 6, 8)", "isq")
    raise InvalidRequestError(f"unknown ISQ type {name!r}; use one of {', '.join(ISQ_TYPES)} "
                              "or a bit count (2, 3, 4, 5, 6, 8)", "isq")


def type_for_width(qtype: Q, in_features: int) -> Q | None:
    """`qtype`, or its fallback when rows of `in_features` values do not fit its blocks (None: float)."""
    while in_features % BLOCK_SIZES[qtype][0]:
        if qtype not in _FALLBACK:
            return None
        qtype = _FALLBACK[qtype]
    return qtype


def head_type(qtype: Q) -> Q:
    """The LM head's type under ISQ `qtype`: at least 8 bits."""
    return Q.Q8_0


def quantize_tensor(weight: torch.Tensor, qtype: Q) -> GGUFTensor | torch.Tensor:
    """Encode a float [out, in] weight as `qtype` (or its width fallback); unchanged if none fits."""
    from mistralpy.quant.gguf_quantize import quantize

    chosen = type_for_width(qtype, weight.shape[-1])
    if chosen is None:
        return weight
    raw = quantize(weight, chosen)
    return GGUFTensor(raw, chosen, tuple(weight.shape))
