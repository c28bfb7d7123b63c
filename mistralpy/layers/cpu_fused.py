"""Fused CPU kernels for a decoder layer's small elementwise ops (``kernels/cpu/fused.cpp``).

On CPU decode every eager torch op costs a few microseconds of dispatch, and RMSNorm, the gated
activation and RoPE take 3-8 ops each; these run each as one call. The layers use them through
``usable(x)``: CPU tensors, the extension loaded (``MISTRALPY_CPU_EXT=0`` turns it off), no autograd,
and not while torch.compile traces (inductor fuses the torch form itself); otherwise their torch
code runs unchanged.
"""
from __future__ import annotations

import torch

from mistralpy.kernels import cpu as cpu_ext

__all__ = ["ACT_CODES", "act_and_mul", "available", "rms_norm", "rope", "usable"]

# activation name -> the kernel's code (activation.py maps its functions onto these)
ACT_CODES = {"silu": 0, "gelu_tanh": 1, "gelu": 2, "relu": 3}
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_state: dict[str, bool] = {}
_ops: dict[str, object] = {}


def available() -> bool:
    """True when the extension (and so these ops) is loaded; builds it on the first call."""
    ok = _state.get("ok")
    if ok is None:
        ok = _state["ok"] = cpu_ext.load()
        if ok:
            ns = cpu_ext.ops()
            # the overload packets' .default skips one Python lookup per call
            _ops.update(rms_norm=ns.rms_norm.default, act_and_mul=ns.act_and_mul.default, rope=ns.rope.default)
    return ok


def usable(x: torch.Tensor) -> bool:
    """Whether a layer should take the fused path for input x."""
    return (x.device.type == "cpu" and x.dtype in _FLOATS and not x.requires_grad
            and not torch.compiler.is_compiling() and available())


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
    return _ops["rms_norm"](x, weight, eps, offset)


def act_and_mul(gate_up: torch.Tensor, code: int, hf_rounding: bool = True) -> torch.Tensor:
    """act(gate) * up in float32; hf_rounding rounds act(gate) to the input dtype first, as HF and
    the torch path do (in float32 both forms are the same)."""
    return _ops["act_and_mul"](gate_up, code, hf_rounding)


def rope(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
         sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _ops["rope"](positions, q, k, cos, sin)


def _register_fakes(namespace: str) -> None:
    @torch.library.register_fake(f"{namespace}::rms_norm")
    def _(x, weight, eps, offset):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake(f"{namespace}::act_and_mul")
    def _(gate_up, act, hf_rounding):
        return gate_up.new_empty(*gate_up.shape[:-1], gate_up.shape[-1] // 2)

    @torch.library.register_fake(f"{namespace}::rope")
    def _(positions, q, k, cos, sin):
        return (torch.empty_like(q, memory_format=torch.contiguous_format),
                torch.empty_like(k, memory_format=torch.contiguous_format))


cpu_ext.register_fakes(_register_fakes)
