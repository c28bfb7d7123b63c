"""Llama 4 preprocessing against transformers' Llama4ImageProcessor / Llama4Processor: the best-fit
canvas, pixel values (bfloat16 arithmetic, tiles + the global tile) and the token expansion, for
odd sizes and modes, several max_patches and resize_to_max_canvas. Without torchvision,
transformers' processor runs on tests/fixtures_llama4.torchvision_shim."""
from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
import torch
from fixtures_llama4 import IMAGE_PP, build_llama4_vlm, hf_llama4_processor, torchvision_shim
from fixtures_vlm import random_image
from PIL import Image

from mistralpy.multimodal.processors.llama4 import Llama4Processor, best_fit, supported_resolutions
from mistralpy.tokenizer.tokenizer import Tokenizer

SIZES = [((1, 1), "RGB"), ((37, 500), "RGB"), ((500, 37), "RGB"), ((300, 200), "RGB"), ((90, 70), "RGBA"),
         ((64, 48), "P"), ((120, 33), "L"), ((64, 64), "RGB"), ((130, 64), "RGB"), ((63, 129), "RGB"),
         ((20, 30), "RGB")]


@pytest.fixture(scope="module")
def l4(tmp_path_factory, tokenizer_dir):
    return build_llama4_vlm(tmp_path_factory.mktemp("llama4_proc"), tokenizer_dir)


def _with_pp(path, tmp_path, **overrides):
    """A copy of the model folder whose preprocessor_config.json has ``overrides``."""
    import shutil

    out = tmp_path / "pp"
    shutil.copytree(path, out, dirs_exist_ok=True)
    (out / "preprocessor_config.json").write_text(json.dumps({**IMAGE_PP, **overrides}))
    return out


def _ours(path) -> Llama4Processor:
    return Llama4Processor(json.loads((path / "preprocessor_config.json").read_text()),
                           json.loads((path / "config.json").read_text()), Tokenizer.from_dir(path),
                           json.loads((path / "processor_config.json").read_text()))


def _image(size, mode, seed):
    img = random_image(*size, seed=seed, mode=mode)
    if mode == "RGBA":   # varying transparency, composited onto white as transformers does
        a = np.array(img)
        a[..., 3] = np.arange(a.shape[1])[None, :] % 256
        img = Image.fromarray(a, "RGBA")
    return img


@pytest.mark.parametrize("overrides", [{}, {"max_patches": 6}, {"max_patches": 2, "resize_to_max_canvas": True}],
                         ids=["default", "max6", "max2_canvas"])
def test_pixels_and_ids_equal_transformers(l4, tmp_path, overrides):
    path = _with_pp(l4, tmp_path, **overrides) if overrides else l4
    proc = _ours(path)
    text = "Look <|image|> here."
    with hf_llama4_processor(path) as hf:
        for k, (size, mode) in enumerate(SIZES):
            img = _image(size, mode, seed=k)
            ref = hf(text=text, images=[img], return_tensors="pt")
            item = proc.process_image(img, "x")
            ours, want = item.inputs["pixel_values"], ref["pixel_values"].float()
            assert ours.shape == want.shape, size
            assert (ours - want).abs().max().item() <= 1e-6, size
            ids = proc.expand(proc.tokenizer.encode(text, add_special_tokens=False), [item])
            assert ids == ref["input_ids"][0].tolist(), size
            ph = item.placeholder
            assert ids[ph.offset] == proc.start_id and ids[ph.offset + ph.length - 1] == proc.end_id
            assert [ids[p] for p in ph.embed_positions()] == [proc.patch_id] * item.num_embeds
            assert item.num_embeds == ours.shape[0] * proc.rows_per_tile


@pytest.mark.parametrize("n_images", [0, 2])
def test_expansion_with_several_images(l4, n_images):
    imgs = [_image((90, 50), "RGB", 1), _image((30, 64), "RGB", 2)][:n_images]
    text = "Intro " + " and ".join(["<|image|>"] * n_images) + " end." if n_images else "no images at all."
    proc = _ours(l4)
    with hf_llama4_processor(l4) as hf:
        ref = hf(text=text, images=imgs or None, return_tensors="pt")["input_ids"][0].tolist()
    items = [proc.process_image(im, str(k)) for k, im in enumerate(imgs)]
    assert proc.expand(proc.tokenizer.encode(text, add_special_tokens=False), items) == ref


def test_best_fit_equals_transformers(l4):
    with hf_llama4_processor(l4):
        ip = importlib.import_module("transformers.models.llama4.image_processing_llama4")
        from transformers.image_utils import SizeDict

        for max_patches, tile in ((16, 336), (4, 64), (7, 28)):
            ip.find_supported_resolutions.cache_clear()
            ref = ip.find_supported_resolutions(max_patches, SizeDict(height=tile, width=tile))
            assert supported_resolutions(max_patches, tile) == ref
            canvases = torch.tensor(ref)
            for h, w in ((1, 1), (tile, tile), (200, 300), (999, 17), (17, 999), (tile * 3, tile * 2 + 1)):
                for to_max in (False, True):
                    want = ip.get_best_fit((h, w), canvases, resize_to_max_canvas=to_max).tolist()
                    assert list(best_fit(h, w, ref, to_max)) == want, (h, w, to_max)


def test_shim_matches_torchvision():
    """The stand-in's resize / pad / normalize against torchvision itself, where installed."""
    tvF = pytest.importorskip("torchvision.transforms.v2.functional")
    shim = torchvision_shim()["torchvision.transforms.v2.functional"]
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 3, 37, 50), dtype=np.uint8))
    for size in ((64, 20), (10, 100), (37, 50), (80, 80)):
        assert torch.equal(shim.resize(x, size), tvF.resize(x, list(size), antialias=True))
    assert torch.equal(shim.pad(x, [0, 0, 3, 5]), tvF.pad(x, [0, 0, 3, 5], fill=0))
    y = x.to(torch.bfloat16) * (1 / 255)
    assert torch.equal(shim.normalize(y, [0.5] * 3, [0.5] * 3), tvF.normalize(y, [0.5] * 3, [0.5] * 3))
