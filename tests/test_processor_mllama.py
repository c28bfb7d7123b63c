"""Mllama preprocessing against transformers' MllamaImageProcessorPil (pixel values within 1e-6,
aspect-ratio ids and masks equal) for odd sizes and modes, and the cross-attention visibility rule
against MllamaProcessor's."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from fixtures_vlm import random_image

from mistralpy.multimodal.processors.mllama import MllamaProcessor, cross_spans

IMAGE_TOKEN = 7


def _pair(tile: int, max_tiles: int) -> tuple[MllamaProcessor, object]:
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    hf = MllamaImageProcessorPil(size={"height": tile, "width": tile}, max_image_tiles=max_tiles)
    pp = hf.to_dict()
    ours = MllamaProcessor(pp, {"image_token_index": IMAGE_TOKEN, "vision_config": {"patch_size": 14}}, None)
    return ours, hf


@pytest.mark.parametrize("tile,max_tiles", [(56, 4), (28, 6)])
@pytest.mark.parametrize("w,h,mode", [(1, 1, "RGB"), (37, 500, "RGB"), (4000, 30, "RGB"), (90, 70, "RGBA"),
                                      (56, 56, "L"), (120, 57, "P"), (300, 200, "RGB")])
def test_pixels_and_aspect_ratio_match_transformers(tile, max_tiles, w, h, mode):
    ours, hf = _pair(tile, max_tiles)
    image = random_image(w, h, seed=w * 7 + h, mode=mode)
    ref = hf([[image]], return_tensors="pt")
    item = ours.process_image(image, "x")
    n = item.inputs["num_tiles"]
    assert ref["num_tiles"] == [[n]]
    px = ref["pixel_values"][0, 0]
    assert item.inputs["pixel_values"].shape == px[:n].shape
    assert torch.allclose(item.inputs["pixel_values"], px[:n], atol=1e-6, rtol=0)
    assert not px[n:].any()   # transformers pads with zero tiles; the tower does the same
    assert item.inputs["aspect_ratio_id"] == int(ref["aspect_ratio_ids"][0, 0])
    mask = np.zeros(max_tiles, dtype=np.int64)
    mask[:n] = 1
    assert ref["aspect_ratio_mask"][0, 0].tolist() == mask.tolist()
    assert item.num_embeds == n * ((tile // 14) ** 2 + 1)


def test_hash_depends_on_settings_and_image():
    a, _ = _pair(56, 4)
    b, _ = _pair(28, 4)
    img = random_image(60, 40, seed=1)
    assert a.process_image(img, "h").hash == a.process_image(img, "h").hash
    assert a.process_image(img, "h").hash != b.process_image(img, "h").hash
    assert a.process_image(img, "h").hash != a.process_image(img, "other").hash


@pytest.mark.parametrize("ids", [
    [1, 7, 2, 3], [7, 1, 2], [1, 2, 3, 7], [1, 7, 2, 7, 3, 4], [7, 7, 1, 2], [1, 7, 7, 2, 7, 3],
    [7, 1, 7, 7], [1, 7, 2, 7, 7, 3, 7, 4],
])
def test_cross_spans_follow_transformers(ids):
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense,
        get_cross_attention_token_mask,
    )

    n_images = ids.count(IMAGE_TOKEN)
    ref = convert_sparse_cross_attention_mask_to_dense([get_cross_attention_token_mask(ids, IMAGE_TOKEN)],
                                                       [[1] * n_images], 1, len(ids))[0, :, :, 0]
    spans = cross_spans(ids, IMAGE_TOKEN)
    ours = np.zeros_like(ref)
    for i, (start, end) in enumerate(spans):
        ours[start:len(ids) if end is None else end, i] = 1
    assert ours.tolist() == ref.tolist()
    # generated tokens repeat the last prompt row (transformers' generate): exactly the open spans
    assert [end is None for _, end in spans] == [bool(v) for v in ref[-1]]


def test_expand_keeps_tokens_and_checks_counts():
    from mistralpy.multimodal.inputs import MediaError

    proc, _ = _pair(28, 4)
    items = [proc.process_image(random_image(30, 30, seed=s), str(s)) for s in range(2)]
    ids = [1, 7, 2, 7, 3]
    assert proc.expand(ids, items) == ids
    assert [(it.placeholder.offset, it.placeholder.length) for it in items] == [(1, 1), (3, 1)]
    assert [it.extra["cross_span"] for it in items] == [(1, 3), (3, None)]
    with pytest.raises(MediaError):
        proc.expand([1, 7, 2], items)
