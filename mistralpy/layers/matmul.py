"""The dense matmul every linear layer and the LM head go through, and CPU weight prepacking.

On CPU, bf16 weights are re-laid once after loading for the C++ extension's AVX512-BF16 kernel
(``dense_cpu``: ~1.6x oneDNN on decode rows, equal on prefill) when it is built; otherwise
weights are *prepacked* once after loading into oneDNN's blocked layout
(``prepack_linear_weights``) and applied with oneDNN's linear primitive. A plain-layout weight is
reordered by oneDNN on every call, which for the one-row products of decoding costs more than
the product itself: measured on a Zen 4 (avx512_bf16, 2 threads), a 3072x576 bf16 projection
takes 51 us prepacked against 137 us with F.linear, the 49152x576 LM head 2.2 ms against 4.5 ms,
and a float32 one 72 us against 148 us; prefill-sized products gain 5-30%. bf16 results are
bit-identical to F.linear; float32 ones differ in summation order (~1e-6 relative).

Without oneDNN (or on other devices) weights keep HF's [out, in] layout; on CPU float32 they are
then applied as ``(W @ x^T)^T``, which MKL runs markedly faster than F.linear at decode row
counts on the Zen 3 machine this was measured on (16 GB/s against 7 at 2 rows); a single row is
duplicated to two because MKL's one-row path is the slow one.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from mistralpy.layers import dense_cpu

log = logging.getLogger(__name__)

_PREPACK_DTYPES = (torch.float32, torch.bfloat16)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ weight[out, in]^T (+ bias) -> [..., out]. ``weight`` may be prepacked."""
    if dense_cpu.is_packed(weight):
        return dense_cpu.linear(x, weight, bias)
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    if x.device.type != "cpu" or x.dim() != 2 or weight.dtype != torch.float32:
        return F.linear(x, weight, bias)
    if x.shape[0] == 1:
        y = (weight @ x.repeat(2, 1).t())[:, :1].t()
    else:
        y = (weight @ x.t()).t()
    return y + bias if bias is not None else y


def _mkldnn_takes(dtype: torch.dtype) -> bool:
    """oneDNN's bf16 reorder needs avx512bw/vl/dq or avx_ne_convert (it raises on AVX2-only CPUs)."""
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return True


def can_prepack(weight: torch.Tensor) -> bool:
    if weight.device.type != "cpu" or weight.dim() != 2 or weight.is_mkldnn:
        return False
    return dense_cpu.can_pack(weight) or (weight.dtype in _PREPACK_DTYPES and torch.backends.mkldnn.is_available()
                                          and _mkldnn_takes(weight.dtype))


def prepack(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] strided weight -> the same weight in the fastest layout for CPU products: the C++
    extension's pair tiles for bf16 (``dense_cpu``), else oneDNN's blocked layout (tuned for 1-row inputs)."""
    if dense_cpu.can_pack(weight):
        return dense_cpu.pack(weight)
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)


def is_prepacked(weight: torch.Tensor) -> bool:
    return weight.is_mkldnn or dense_cpu.is_packed(weight)


def unpacked(weight: torch.Tensor) -> torch.Tensor:
    """The [out, in] values of a weight in any layout."""
    if dense_cpu.is_packed(weight):
        return dense_cpu.unpack(weight)
    if weight.is_mkldnn:  # no direct way back from oneDNN's blocked layout: multiply by the identity
        return linear(torch.eye(weight.shape[1], dtype=weight.dtype), weight).t()
    return weight


def prepack_linear_weights(model: nn.Module) -> int:
    """Replace the ``weight`` of every module marked ``prepackable`` by its prepacked form, in place.

    A weight shared with another module (a tied LM head) gets its own packed copy; the original
    stays for the embedding lookup. Returns the number of weights packed.
    """
    count = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not getattr(module, "prepackable", False) or not isinstance(weight, torch.Tensor) or not can_prepack(weight):
            continue
        try:
            packed = prepack(weight)
        except RuntimeError as exc:  # an odd shape or a oneDNN build without the reorder: stay plain
            log.debug("prepack of %s failed: %s", type(module).__name__, exc)
            continue
        del module.weight
        module.register_buffer("weight", packed, persistent=False)
        count += 1
    return count
