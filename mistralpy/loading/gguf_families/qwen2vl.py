"""GGUF hooks of llama.cpp's `qwen2vl` text architecture (the language model of Qwen2-VL / Qwen2.5-VL).

The tensors are Qwen2's; what differs is the rope: M-RoPE with `rope.dimension_sections` (t, h, w
and a fourth, unused section, counted in rotary pairs). Without an mmproj the file runs as a plain
Qwen2 (a text-only prompt has equal t / h / w positions, which M-RoPE rotates like RoPE); with one,
models/qwen2_vl.py reads the sections as transformers' `mrope_section`.
"""
from __future__ import annotations

from typing import Any

from mistralpy.errors import ModelLoadError


def update_config(cfg: dict[str, Any], get: Any, meta: dict[str, Any], tensor_names: set[str]) -> None:
    sections = [int(s) for s in get("rope.dimension_sections") or []]
    if not sections:
        raise ModelLoadError("qwen2vl GGUF lacks qwen2vl.rope.dimension_sections")
    if any(sections[3:]):
        raise ModelLoadError(f"qwen2vl rope sections {sections}: a fourth M-RoPE section is not supported")
    if sum(sections[:3]) * 2 != cfg["head_dim"]:
        raise ModelLoadError(f"qwen2vl rope sections {sections} do not cover head_dim {cfg['head_dim']}")
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg["rope_theta"],
                              "mrope_section": sections[:3]}
