"""LLaVA-NeXT on the paged engine against transformers (float32): anyres pixel values and
image_sizes, placeholder expansion (base + unpadded grid + newlines), logits and greedy tokens
with one and two images; alone vs batched with chunked prefill cutting through the image rows;
a prefix-cache hit; the checkpoint name layouts.

The family is registered here by patching both registries, so these tests do not depend on the
lead's registration lines."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fixtures_vlm import LLAVA_NEXT_PINPOINTS, build_llava_next
from PIL import Image

import mistralpy.models.registry as model_registry
import mistralpy.multimodal.processors.base as processor_base
from mistralpy import Engine, SamplingParams
from mistralpy.multimodal.processors.llava_next import LlavaNextProcessor

ARCH = "LlavaNextForConditionalGeneration"
GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)


@pytest.fixture(scope="module", autouse=True)
def registered():
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(model_registry._REGISTRY, ARCH, ("llava_next", ARCH))
        mp.setitem(processor_base._REGISTRY, ARCH, LlavaNextProcessor)
        yield


def _image(w: int, h: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    if mode == "RGBA":   # a real alpha ramp, composited onto white by both sides
        a = np.array(img.convert("RGBA"))
        a[..., 3] = (np.arange(w)[None, :] * 7) % 256
        return Image.fromarray(a, "RGBA")
    if mode == "P":
        return img.convert("P", palette=Image.Palette.ADAPTIVE, colors=37)
    return img.convert(mode)


@pytest.fixture(scope="module")
def llava_next(tmp_path_factory, tokenizer_dir):
    return build_llava_next(tmp_path_factory.mktemp("llava_next"), tokenizer_dir)


@pytest.fixture(scope="module")
def hf(llava_next):
    import transformers

    return transformers.LlavaNextForConditionalGeneration.from_pretrained(llava_next, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_image_processor(llava_next):
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    return LlavaNextImageProcessorPil.from_pretrained(llava_next)


@pytest.fixture(scope="module")
def hf_processor(llava_next, hf_image_processor):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(llava_next)
    # CLIP keeps a CLS row (num_additional_image_tokens=1) that the "default" strategy drops
    return transformers.LlavaNextProcessor(image_processor=hf_image_processor, tokenizer=tok, patch_size=14,
                                           vision_feature_select_strategy="default", num_additional_image_tokens=1)


def _hf_greedy(hf, ids: list[int], pixels: dict | None, n: int) -> list[int]:
    out = hf.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                      eos_token_id=None, pad_token_id=0, **(pixels or {}))
    return out[0, len(ids):].tolist()


SIZES = [((1, 1), "RGB"), ((37, 500), "RGB"), ((500, 37), "RGB"), ((4000, 30), "RGB"), ((300, 200), "RGB"),
         ((90, 61), "RGBA"), ((77, 130), "P"), ((130, 45), "L")]
# (crop side, pinpoints): the fixture's, and larger crops with a 3-wide grid and non-square pinpoints
SETTINGS = [(28, LLAVA_NEXT_PINPOINTS), (56, [[56, 112], [112, 56], [112, 112], [56, 168], [168, 56]])]


@pytest.mark.parametrize("crop,pinpoints", SETTINGS)
@pytest.mark.parametrize("size,mode", SIZES)
def test_pixels_and_sizes_equal_the_pil_processor(size, mode, crop, pinpoints):
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    ref_proc = LlavaNextImageProcessorPil(size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop},
                                          image_grid_pinpoints=pinpoints)
    pp = json.loads(ref_proc.to_json_string())   # what preprocessor_config.json holds
    hf_config = {"vision_config": {"image_size": crop, "patch_size": 14}, "image_token_index": 7,
                 "image_grid_pinpoints": pinpoints}
    ours = LlavaNextProcessor(pp, hf_config, tokenizer=None)
    img = _image(*size, seed=size[0] + size[1], mode=mode)
    ref = ref_proc(img, return_tensors="pt")
    item = ours.process_image(img, "x")
    px, ref_px = item.inputs["pixel_values"], ref["pixel_values"][0]
    assert px.shape == ref_px.shape and px.dtype == torch.float32
    assert (px - ref_px).abs().max().item() <= 1e-6
    assert item.inputs["image_sizes"].tolist() == ref["image_sizes"][0].tolist() == [size[1], size[0]]


def test_expansion_equals_the_hf_processor(llava_next, hf_processor):
    """0, 1 and 2 images (tall, wide, tiny, square): our expanded ids are LlavaNextProcessor's."""
    cases = [("no image here, just text", []),
             ("Look <image> at this.", [_image(37, 500, seed=1)]),
             ("Look <image> at this.", [_image(500, 37, seed=2)]),
             ("A <image> and B <image> differ?", [_image(300, 200, seed=3), _image(1, 1, seed=4)]),
             ("<image><image> twice", [_image(64, 64, seed=5), _image(130, 45, seed=6)])]
    with Engine(str(llava_next), dtype="f32", num_kv_blocks=64, max_model_len=512) as eng:
        image_id = eng.tokenizer.token_to_id("<image>")
        for text, imgs in cases:
            ids = eng.tokenize(text, add_special_tokens=False)
            req = eng._prepare({"prompt": ids, "images": imgs}, GREEDY)[1][0]
            ref = hf_processor(text=text, images=imgs or None, add_special_tokens=False)["input_ids"]
            ref = ref[0] if ref and isinstance(ref[0], list) else ref
            assert req.prompt_token_ids == list(ref), text
            for item in req.mm_items:   # each run is contiguous and sized to the item
                r = item.placeholder
                assert req.prompt_token_ids[r.offset:r.offset + r.length] == [image_id] * item.num_embeds


def _hf_inputs(hf_image_processor, imgs: list[Image.Image]) -> dict:
    out = hf_image_processor(imgs, return_tensors="pt")
    return {"pixel_values": out["pixel_values"], "image_sizes": out["image_sizes"]}


def test_logits_and_greedy_match_transformers(llava_next, hf, hf_image_processor):
    """One image, then two of different aspect ratios (twice): last-position log-probs within 1e-4
    and 20 greedy tokens equal to transformers' generate."""
    cases = [("Describe <image> briefly.", [_image(80, 45, seed=7)]),
             ("First <image> then <image> compare.", [_image(40, 120, seed=8), _image(150, 150, seed=9)]),
             # extreme aspects: the unpadded grid keeps no column (only the row newlines) / no row
             ("Tall <image> wide <image> end.", [_image(37, 500, seed=13), _image(500, 37, seed=14)])]
    with Engine(str(llava_next), dtype="f32", num_kv_blocks=96, max_model_len=512) as eng:
        for text, imgs in cases:
            ids = eng.tokenize(text, add_special_tokens=False)
            prompt = {"prompt": ids, "images": imgs}
            expanded = eng._prepare(prompt, GREEDY)[1][0].prompt_token_ids
            pixels = _hf_inputs(hf_image_processor, imgs)
            with torch.no_grad():
                ref_logits = hf(input_ids=torch.tensor([expanded]), **pixels).logits[0, -1]
            ref_lp = torch.log_softmax(ref_logits.double(), -1)
            out = eng.generate(prompt, SamplingParams(temperature=0, max_tokens=1, logprobs=5))[0].outputs[0]
            for t in out.logprobs[0].top_logprobs:
                assert abs(t.logprob - ref_lp[t.token_id].item()) < 1e-4
            assert out.token_ids[0] == int(ref_logits.argmax())
            ours = eng.generate(prompt, GREEDY)[0].outputs[0].token_ids
            assert ours == _hf_greedy(hf, expanded, pixels, GREEDY.max_tokens)


def test_batched_chunked_and_prefix_cached(llava_next, hf, hf_image_processor):
    """A mixed batch (two images, one text-only) with an 11-token prefill budget cutting through
    the image runs gives each request its solo tokens; the first matches transformers; the same
    image + text again is a prefix-cache hit; the images change the answer."""
    imgs = [_image(70, 130, seed=10), _image(200, 90, seed=11)]
    with Engine(str(llava_next), dtype="f32", num_kv_blocks=160, max_model_len=512, max_num_batched_tokens=11) as eng:
        ids = eng.tokenize("Look: <image> what is it? Say more words here.", add_special_tokens=False)
        prompts = [{"prompt": ids, "images": [imgs[0]]}, "plain text prompt with no image",
                   {"prompt": ids, "images": [imgs[1]]}]
        reqs = [eng._prepare(p, GREEDY)[1][0] for p in prompts]
        assert all(it.num_embeds > 11 for r in reqs for it in r.mm_items)   # chunks cut through each image
        solo = [eng.generate(p, GREEDY)[0].outputs[0].token_ids for p in prompts]
        assert solo[0] == _hf_greedy(hf, reqs[0].prompt_token_ids, _hf_inputs(hf_image_processor, [imgs[0]]),
                                     GREEDY.max_tokens)
        lp = [eng.generate(p, SamplingParams(temperature=0, max_tokens=1, logprobs=1))[0].outputs[0].logprobs[0]
              for p in (prompts[0], prompts[2])]
        assert lp[0].logprob != lp[1].logprob
        batched = [r.outputs[0].token_ids for r in eng.generate(prompts, GREEDY)]
        assert batched == solo
        again = eng.generate(prompts[0], GREEDY)[0]
        n_image = reqs[0].mm_items[0].num_embeds
        assert again.outputs[0].token_ids == solo[0] and again.num_cached_tokens >= n_image


def test_checkpoint_layouts_load(llava_next, tmp_path):
    """The same weights under the llava-hf names (vision_tower.vision_model.*) and transformers 5's
    module names (model.vision_tower.*, model.image_newline, model.language_model.*, lm_head) give
    the same tokens as the layout transformers 5.24 writes."""
    import shutil

    from safetensors.torch import load_file, save_file

    tensors = load_file(str(llava_next / "model.safetensors"))
    assert "image_newline" in tensors and any(n.startswith("vision_tower.embeddings.") for n in tensors)

    def llava_hf(name: str) -> str:
        return "vision_tower.vision_model." + name[len("vision_tower."):] if name.startswith("vision_tower.") else name

    def v5_modules(name: str) -> str:
        for old, new in (("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector."),
                         ("image_newline", "model.image_newline"), ("language_model.model.", "model.language_model."),
                         ("language_model.lm_head.", "lm_head.")):
            if name.startswith(old):
                return new + name[len(old):]
        return name

    img = _image(64, 100, seed=12)
    outs = []
    for k, rename in enumerate((None, llava_hf, v5_modules)):
        path = llava_next
        if rename is not None:
            path = tmp_path / f"layout{k}"
            shutil.copytree(llava_next, path)
            save_file({rename(n): t for n, t in tensors.items()}, str(path / "model.safetensors"), metadata={"format": "pt"})
        with Engine(str(path), dtype="f32", num_kv_blocks=64, max_model_len=512) as eng:
            ids = eng.tokenize("Describe <image> now.", add_special_tokens=False)
            outs.append(eng.generate({"prompt": ids, "images": [img]}, SamplingParams(temperature=0, max_tokens=8,
                                                                                     ignore_eos=True))[0].outputs[0].token_ids)
    assert outs[0] == outs[1] == outs[2]
