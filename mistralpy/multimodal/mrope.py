"""3-D multimodal rotary positions (M-RoPE) of the Qwen-VL family, as transformers' ``get_rope_index``.

Every prompt position gets a (t, h, w) triple. Text tokens share t = h = w and count up by one.
The tokens of one vision block (an image, a Qwen2/2.5-VL video, or one frame of a Qwen3-VL video)
get grid positions over the merged patches: t = start + time index (Qwen2.5-VL video: the index
times ``tokens_per_second * second_per_grid_t``, truncated), h = start + row, w = start + column.
The text after a block starts at start + max(rows, columns) (transformers 5.24; see
``advance_past_video_time``). ``delta`` = max position + 1 - prompt length: a decode step at
sequence index i has position i + delta on all three axes.

Pure torch: the float32 arithmetic of the Qwen2.5-VL time scaling is reproduced step for step.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mistralpy.multimodal.inputs import MMItem

VERSIONS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


@dataclass(frozen=True, slots=True)
class _Block:
    """One run of vision tokens at sequence positions [start, start + t*h*w) (h, w merged)."""

    start: int
    t: int
    h: int
    w: int
    time_interval: float | torch.Tensor = 1


def _grid(item: MMItem) -> tuple[int, int, int]:
    key = "video_grid_thw" if item.modality == "video" else "image_grid_thw"
    g = item.inputs[key]
    t, h, w = (int(v) for v in torch.as_tensor(g).reshape(-1)[:3].tolist())
    return t, h, w


def _blocks(items: Sequence[MMItem], spatial_merge_size: int, tokens_per_second: float | None,
            version: str) -> list[_Block]:
    m = spatial_merge_size
    blocks: list[_Block] = []
    for item in items:
        if item.placeholder is None:
            raise ValueError("mrope_positions needs expanded items (item.placeholder is None)")
        t, h, w = _grid(item)
        h, w = h // m, w // m
        pos = item.placeholder.embed_positions()
        if len(pos) != t * h * w:
            raise ValueError(f"{item.modality} placeholder has {len(pos)} embedding positions, grid wants {t * h * w}")
        if item.modality == "video" and version == "qwen3_vl":
            # Qwen3-VL writes each frame as its own <|vision_start|>...<|vision_end|> run after a timestamp,
            # so transformers splits the grid into t blocks of one frame each.
            n = h * w
            blocks.extend(_Block(pos[i * n], 1, h, w) for i in range(t))
            continue
        interval: float | torch.Tensor = 1
        if item.modality == "video" and version == "qwen2_5_vl":
            # transformers multiplies tokens_per_second by the float32 tensor the processor returns.
            spg = item.inputs.get("second_per_grid_ts")
            spg_t = (torch.as_tensor(spg, dtype=torch.float32).reshape(-1)[0] if spg is not None
                     else torch.tensor(1))
            interval = (tokens_per_second if tokens_per_second is not None else 4) * spg_t
        blocks.append(_Block(pos[0], t, h, w, interval))
    blocks.sort(key=lambda b: b.start)
    return blocks


def mrope_positions(input_ids: Sequence[int], items: Sequence[MMItem], spatial_merge_size: int = 2,
                    tokens_per_second: float | None = None, version: str = "qwen2_vl",
                    advance_past_video_time: bool = False) -> tuple[torch.Tensor, int]:
    """(positions LongTensor [3, len(input_ids)], delta) for one prompt whose items are expanded.

    ``items``: the request's MMItems with ``placeholder`` set (images and videos in any order).
    ``version``: "qwen2_vl" | "qwen2_5_vl" | "qwen3_vl" (Qwen3-VL-MoE is "qwen3_vl").
    ``tokens_per_second``: Qwen2.5-VL's ``vision_config.tokens_per_second``.
    ``advance_past_video_time``: start the text after a block at the block's largest position + 1
    (Qwen's reference code, vLLM and transformers <= 5.2) instead of start + max(h, w). The two agree
    for images and Qwen3-VL frames; they differ for Qwen2/2.5-VL videos whose time positions run
    past their spatial ones.
    """
    if version not in VERSIONS:
        raise ValueError(f"unknown M-RoPE version {version!r} (one of {VERSIONS})")
    n = len(input_ids)
    out = torch.zeros(3, n, dtype=torch.long)
    cur = 0   # next position value
    idx = 0   # next sequence index
    for b in _blocks(items, spatial_merge_size, tokens_per_second, version):
        if b.start < idx:
            raise ValueError("overlapping placeholders")
        if b.start > idx:   # text before the block
            out[:, idx:b.start] = torch.arange(b.start - idx).view(1, -1) + cur
            cur += b.start - idx
        t_idx = (torch.arange(b.t) * b.time_interval).long()
        tt, hh, ww = torch.meshgrid(t_idx, torch.arange(b.h) + cur, torch.arange(b.w) + cur, indexing="ij")
        block = torch.stack([tt, hh, ww]).reshape(3, -1)
        block[0] += cur   # after the time scaling, as transformers does
        end = b.start + block.shape[1]
        if end > n:
            raise ValueError("a placeholder runs past the end of the prompt")
        out[:, b.start:end] = block
        cur = int(block.max()) + 1 if advance_past_video_time else cur + max(b.h, b.w)
        idx = end
    if idx < n:   # trailing text
        out[:, idx:] = torch.arange(n - idx).view(1, -1) + cur
    delta = int(out.max()) + 1 - n if n else 0
    return out, delta


def decode_positions(delta: int, start: int, n: int = 1) -> torch.Tensor:
    """Positions [3, n] of sequence indices start .. start+n-1 after the prompt (all axes equal)."""
    return (torch.arange(start, start + n, dtype=torch.long) + delta).view(1, -1).expand(3, -1).clone()
