"""Gated activations on fused [gate | up] projections."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mistralpy.layers import cpu_fused


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACT_FNS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_new": gelu_tanh,
    "relu": F.relu,
}
# the functions the fused CPU kernel implements, by its code
_FUSED = {F.silu: cpu_fused.ACT_CODES["silu"], gelu_tanh: cpu_fused.ACT_CODES["gelu_tanh"],
          F.gelu: cpu_fused.ACT_CODES["gelu"], F.relu: cpu_fused.ACT_CODES["relu"]}


def get_act_fn(name: str):
    try:
        return ACT_FNS[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r}") from None


def act_and_mul(gate_up: torch.Tensor, act) -> torch.Tensor:
    """gate_up [..., 2I] -> act(gate) * up  [..., I].

    On CPU one fused op: float32 math with act(gate) rounded to the input dtype before the product,
    like HF (rounding once would be more accurate, but bf16 results would then leave HF's by an ulp
    here and there: enough to flip a near-tie MoE router, see tests/test_cpu_fused.py)."""
    code = _FUSED.get(act)
    if code is not None and cpu_fused.usable(gate_up):
        return cpu_fused.act_and_mul(gate_up, code)
    gate, up = gate_up.chunk(2, dim=-1)
    return act(gate) * up
