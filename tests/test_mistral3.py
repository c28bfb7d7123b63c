"""Mistral 3 (Pixtral vision) on the paged engine against transformers (float32): pixel values,
the [IMG] / [IMG_BREAK] / [IMG_END] expansion, logits with one and two images, greedy tokens; alone,
batched with a text-only request, with chunked prefill cutting through the image run, and a
prefix-cache hit on a repeat."""
from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import torch
from fixtures_vlm import build_mistral3
from fixtures_vlm import random_image as _image
from PIL import Image

import mistralpy.models.registry
import mistralpy.multimodal.processors.pixtral  # noqa: F401  (registers the processor)
from mistralpy import Engine, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
PROMPT = "Look: [IMG] what is it? Say more words here."


@pytest.fixture(autouse=True)
def _registered(monkeypatch):
    monkeypatch.setitem(mistralpy.models.registry._REGISTRY, "Mistral3ForConditionalGeneration",
                        ("mistral3", "Mistral3ForConditionalGeneration"))


@pytest.fixture(scope="module")
def m3(tmp_path_factory, tokenizer_dir):
    return build_mistral3(tmp_path_factory.mktemp("mistral3"), tokenizer_dir)


@pytest.fixture(scope="module")
def hf(m3):
    import transformers

    return transformers.Mistral3ForConditionalGeneration.from_pretrained(m3, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_processor(m3):
    """transformers' PixtralProcessor (what Mistral 3 checkpoints name). Its module imports the
    torchvision image processor only for a size helper; without torchvision the PIL one stands in."""
    from transformers import AutoTokenizer
    from transformers.models.pixtral import image_processing_pil_pixtral as pil

    with pytest.MonkeyPatch.context() as mp:
        stub = types.ModuleType("transformers.models.pixtral.image_processing_pixtral")
        stub.get_resize_output_image_size = pil.get_resize_output_image_size
        mp.setitem(sys.modules, stub.__name__, stub)
        mp.delitem(sys.modules, "transformers.models.pixtral.processing_pixtral", raising=False)
        from transformers.models.pixtral.processing_pixtral import PixtralProcessor

        cfg = json.loads((m3 / "processor_config.json").read_text())
        return PixtralProcessor(image_processor=pil.PixtralImageProcessorPil.from_pretrained(m3),
                                tokenizer=AutoTokenizer.from_pretrained(str(m3)), patch_size=cfg["patch_size"],
                                spatial_merge_size=cfg["spatial_merge_size"])


def _ours(m3, pp: dict | None = None, pc: dict | None = None):
    from mistralpy.multimodal.processors.pixtral import PixtralProcessor
    from mistralpy.tokenizer.tokenizer import Tokenizer

    return PixtralProcessor(pp if pp is not None else json.loads((m3 / "preprocessor_config.json").read_text()),
                            json.loads((m3 / "config.json").read_text()), Tokenizer.from_dir(m3),
                            pc if pc is not None else json.loads((m3 / "processor_config.json").read_text()))


def _hf_greedy(hf, ids: list[int], batch: dict | None, n: int) -> list[int]:
    kwargs = {"pixel_values": batch["pixel_values"], "image_sizes": batch["image_sizes"]} if batch else {}
    out = hf.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                      eos_token_id=None, pad_token_id=0, **kwargs)
    return out[0, len(ids):].tolist()


SIZES = [((1, 1), "RGB"), ((37, 500), "RGB"), ((500, 37), "RGB"), ((300, 200), "RGB"), ((90, 70), "RGBA"),
         ((64, 48), "P"), ((120, 33), "L"), ((20, 30), "RGB")]


@pytest.mark.parametrize("patch,longest", [(8, 64), (14, 112)])
@pytest.mark.parametrize("size,mode", SIZES)
def test_pixels_equal_the_pil_processor(m3, size, mode, patch, longest):
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    img = _image(*size, seed=size[0], mode=mode)
    if mode == "RGBA":
        a = np.array(img)
        a[..., 3] = np.arange(a.shape[1])[None, :] % 256
        img = Image.fromarray(a, "RGBA")
    ref = PixtralImageProcessorPil(size={"longest_edge": longest})(
        img, patch_size={"height": patch * 2, "width": patch * 2}, return_tensors="pt")["pixel_values"]
    proc = _ours(m3, {"size": {"longest_edge": longest}, "patch_size": {"height": 99, "width": 99}},
                 {"patch_size": patch, "spatial_merge_size": 2})   # the processor's patch wins, as in HF
    item = proc.process_image(img, "x")
    ours = item.inputs["pixel_values"]
    assert ours.shape == ref.shape and (ours - ref).abs().max().item() <= 1e-6
    assert item.num_embeds == (ref.shape[-2] // (2 * patch)) * (ref.shape[-1] // (2 * patch))


@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_expansion_equals_the_hf_processor(m3, hf_processor, n_images):
    imgs = [_image(90, 50, seed=1), _image(30, 64, seed=2)][:n_images]
    text = "Intro " + " and ".join(["[IMG]"] * n_images) + " end." if n_images else "no images at all."
    ref = hf_processor(text=text, images=imgs or None, return_tensors="pt")["input_ids"][0].tolist()
    proc = _ours(m3)
    items = [proc.process_image(im, str(k)) for k, im in enumerate(imgs)]
    ids = proc.tokenizer.encode(text, add_special_tokens=False)
    assert proc.expand(ids, items) == ref
    for item in items:   # only [IMG] positions take rows; each range runs from the first [IMG] to [IMG_END]
        ph = item.placeholder
        assert ref[ph.offset] == proc.image_id and ref[ph.offset + ph.length - 1] == proc.end_id
        assert [ref[p] for p in ph.embed_positions()] == [proc.image_id] * item.num_embeds


def _check_logits(eng, hf, hf_processor, text: str, imgs: list[Image.Image]) -> torch.Tensor:
    batch = hf_processor(text=text, images=imgs, return_tensors="pt")
    ids = batch["input_ids"][0].tolist()
    prompt = eng.tokenize(text, add_special_tokens=False)
    assert eng._prepare({"prompt": prompt, "images": imgs}, GREEDY)[1][0].prompt_token_ids == ids
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([ids]), pixel_values=batch["pixel_values"],
                 image_sizes=batch["image_sizes"]).logits[0, -1]
    out = eng.generate({"prompt": prompt, "images": imgs},
                       SamplingParams(temperature=0, max_tokens=1, logprobs=True, top_logprobs=5))
    ref_lp = torch.log_softmax(ref.double(), -1)
    top = out[0].outputs[0].logprobs[0].top_logprobs
    assert len(top) == 5
    for t in top:
        assert abs(t.logprob - ref_lp[t.token_id].item()) < 1e-4
    assert out[0].outputs[0].token_ids[0] == int(ref.argmax())
    ours = eng.generate({"prompt": prompt, "images": imgs}, GREEDY)[0].outputs[0].token_ids
    assert ours == _hf_greedy(hf, ids, batch, GREEDY.max_tokens)
    return ref_lp


def test_logits_and_greedy_match_transformers(m3, hf, hf_processor):
    with Engine(str(m3), dtype="f32", num_kv_blocks=64, max_model_len=512) as eng:
        one = _check_logits(eng, hf, hf_processor, "Describe [IMG] briefly.", [_image(90, 50, seed=3)])
        other = _check_logits(eng, hf, hf_processor, "Describe [IMG] briefly.", [_image(90, 50, seed=4)])
        # the tiny model reacts to the image: another image moves the last-position distribution
        assert (one - other).abs().max().item() > 0.05
        _check_logits(eng, hf, hf_processor, "First [IMG] then [IMG] compare.",
                      [_image(70, 40, seed=5), _image(33, 64, seed=6)])


def test_batched_chunked_and_prefix_cached(m3, hf, hf_processor):
    """A batch of an image request, a text-only one and another image (different size), with a
    7-token prefill budget cutting through the image runs, gives each its solo tokens; a repeat
    hits the prefix cache."""
    imgs = [_image(80, 60, seed=7), _image(40, 64, seed=8)]
    with Engine(str(m3), dtype="f32", num_kv_blocks=128, max_model_len=512, max_num_batched_tokens=7) as eng:
        ids = eng.tokenize(PROMPT, add_special_tokens=False)
        prompts = [{"prompt": ids, "images": [imgs[0]]}, "plain text prompt with no image",
                   {"prompt": ids, "images": [imgs[1]]}]
        solo = [eng.generate(p, GREEDY)[0].outputs[0].token_ids for p in prompts]
        batch = hf_processor(text=PROMPT, images=[imgs[0]], return_tensors="pt")
        assert solo[0] == _hf_greedy(hf, batch["input_ids"][0].tolist(), batch, GREEDY.max_tokens)
        batched = [r.outputs[0].token_ids for r in eng.generate(prompts, GREEDY)]
        assert batched == solo
        again = eng.generate(prompts[0], GREEDY)[0]
        assert again.outputs[0].token_ids == solo[0] and again.num_cached_tokens > 0


def test_transformers5_module_names_load(m3, tmp_path):
    """The same weights under transformers 5's module names (model.vision_tower.*,
    model.multi_modal_projector.*, model.language_model.*, lm_head.*) give the same tokens."""
    import shutil

    from safetensors.torch import load_file, save_file

    tensors = load_file(str(m3 / "model.safetensors"))
    assert any(n.startswith("vision_tower.transformer.") for n in tensors)   # what 5.24 writes

    def v5_modules(name: str) -> str:
        for old, new in (("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector."),
                         ("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head.")):
            if name.startswith(old):
                return new + name[len(old):]
        return name

    path = tmp_path / "v5"
    shutil.copytree(m3, path)
    save_file({v5_modules(n): t for n, t in tensors.items()}, str(path / "model.safetensors"), metadata={"format": "pt"})
    img = _image(64, 48, seed=9)
    outs = []
    for p in (m3, path):
        with Engine(str(p), dtype="f32", num_kv_blocks=64, max_model_len=512) as eng:
            ids = eng.tokenize("Describe [IMG] now.", add_special_tokens=False)
            outs.append(eng.generate({"prompt": ids, "images": [img]}, GREEDY)[0].outputs[0].token_ids)
    assert outs[0] == outs[1]
