"""Gemma 3 as a vision-language model on the paged engine against transformers (float32).

Default (bidirectional soft-token runs, through a local layer whose window is shorter than a run)
against transformers with ``token_type_ids``, as its processor returns them: the expanded prompt
equals transformers' processor's, last-position logits and greedy tokens with one and two images;
alone, batched with text-only and other-image requests, with a step budget smaller than an image
(the scheduler keeps each image in one step), after a prefix-cache hit that ends inside an image.
``MISTRALPY_GEMMA3_IMAGE_ATTENTION=causal`` against transformers without ``token_type_ids``, with
chunks cutting through the images. A config without ``vision_config`` loads the text part only.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from fixtures_vlm import build_gemma3_vlm
from fixtures_vlm import random_image as _image
from PIL import Image

from mistralpy import Engine, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
TOP = SamplingParams(temperature=0, max_tokens=1, top_logprobs=20)
TOKENS = 16   # soft tokens per image: (64 / 8)^2 patches pooled 2x2


IMAGES = {"a": lambda: _image(100, 80, seed=1), "b": lambda: _image(30, 45, seed=2), "c": lambda: _image(64, 64, seed=3)}
PROMPTS = {1: "User: look at <start_of_image> please, then describe it.\nModel:",
           2: "Compare <start_of_image> with <start_of_image>: which is brighter?"}


@pytest.fixture(scope="module")
def gemma(tmp_path_factory, tokenizer_dir):
    """(checkpoint folder, transformers model, transformers processor)."""
    import transformers

    path = build_gemma3_vlm(tmp_path_factory.mktemp("gemma3_vlm"), tokenizer_dir)
    hf = transformers.Gemma3ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return path, hf, transformers.AutoProcessor.from_pretrained(path)


def _hf_inputs(proc, prompt: str, images: list[Image.Image], bidirectional: bool) -> dict:
    inputs = dict(proc(text=[prompt], images=[images], return_tensors="pt"))
    if not bidirectional:   # without token_type_ids transformers' mask is causal
        inputs.pop("token_type_ids")
    return inputs


def _hf_greedy(hf, inputs: dict, n: int) -> list[int]:
    out = hf.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def _check_top_logprobs(result, ref_logits: torch.Tensor) -> None:
    ref = torch.log_softmax(ref_logits.double(), -1)
    top = result.outputs[0].logprobs[0]
    assert len(top.top_logprobs) == 20
    for t in top.top_logprobs:
        assert abs(t.logprob - ref[t.token_id].item()) < 1e-4
    assert result.outputs[0].token_ids[0] == int(ref_logits.argmax())


def _match(eng, hf, proc, n_images: int, bidirectional: bool) -> None:
    prompt = PROMPTS[n_images]
    imgs = [IMAGES[k]() for k in "ab"[:n_images]]
    inputs = _hf_inputs(proc, prompt, imgs, bidirectional)
    req = eng._prepare({"prompt": prompt, "images": imgs}, GREEDY)[1][0]
    assert req.prompt_token_ids == inputs["input_ids"][0].tolist()
    soft = eng.tokenizer.token_to_id("<image_soft_token>")
    positions = [p for it in req.mm_items for p in it.placeholder.embed_positions()]
    assert positions == [i for i, t in enumerate(req.prompt_token_ids) if t == soft]
    assert [it.num_embeds for it in req.mm_items] == [TOKENS] * n_images
    with torch.no_grad():
        ref_logits = hf(**inputs).logits[0, -1]
    _check_top_logprobs(eng.generate({"prompt": prompt, "images": imgs}, TOP)[0], ref_logits)
    ours = eng.generate({"prompt": prompt, "images": imgs}, GREEDY)[0].outputs[0].token_ids
    assert ours == _hf_greedy(hf, inputs, GREEDY.max_tokens)


@pytest.mark.parametrize("n_images", [1, 2])
def test_logits_and_greedy_match_transformers(gemma, n_images):
    path, hf, proc = gemma
    with Engine(str(path), dtype="f32", num_kv_blocks=64, max_model_len=512) as eng:
        assert eng.core.runner.model.vision_tower is not None
        _match(eng, hf, proc, n_images, bidirectional=True)


@pytest.mark.parametrize("mode", ["bidirectional", "causal"])
def test_batched_chunked_and_prefix_cached(gemma, mode, monkeypatch):
    """A 7-token step budget: bidirectional runs keep each 16-token image in one step (overshooting
    the budget), causal ones are cut; either way a mixed batch gives each request its solo tokens
    (the first equal to transformers' in that mode); a repeat is a prefix-cache hit with the same
    tokens."""
    from mistralpy.models.gemma3_vision import IMAGE_ATTENTION_ENV

    monkeypatch.setenv(IMAGE_ATTENTION_ENV, mode)
    bidirectional = mode == "bidirectional"
    path, hf, proc = gemma
    a, b, c = (IMAGES[k]() for k in "abc")
    prompts = [{"prompt": PROMPTS[1], "images": [a]}, "plain text prompt with no image at all",
               {"prompt": PROMPTS[2], "images": [b, c]}]
    with Engine(str(path), dtype="f32", num_kv_blocks=128, max_model_len=512, max_num_batched_tokens=7) as eng:
        solo = [eng.generate(p, GREEDY)[0].outputs[0].token_ids for p in prompts]
        assert solo[0] == _hf_greedy(hf, _hf_inputs(proc, PROMPTS[1], [a], bidirectional), GREEDY.max_tokens)
        assert solo[2] == _hf_greedy(hf, _hf_inputs(proc, PROMPTS[2], [b, c], bidirectional), GREEDY.max_tokens)
        lp = [eng.generate(p, SamplingParams(temperature=0, max_tokens=1, logprobs=True))[0].outputs[0].logprobs[0]
              for p in (prompts[0], {"prompt": PROMPTS[1], "images": [c]})]
        assert lp[0].logprob != lp[1].logprob   # the image matters
        batched = [r.outputs[0].token_ids for r in eng.generate(prompts, GREEDY)]
        assert batched == solo
        again = eng.generate(prompts[2], GREEDY)[0]
        assert again.outputs[0].token_ids == solo[2] and again.num_cached_tokens > 0


def test_bidirectional_differs_from_causal_and_survives_prefix_hits(gemma, monkeypatch):
    """The two masks give different logits (so the mode is tested); causal (opt-out) equals
    transformers without token_type_ids; bidirectional equals it with them after a prefix-cache hit
    that ends inside an image's run (the 16-token blocks split the second image)."""
    from mistralpy.models.gemma3_vision import IMAGE_ATTENTION_ENV

    path, hf, proc = gemma
    imgs = [IMAGES["a"](), IMAGES["b"]()]
    with torch.no_grad():   # the masks differ enough to matter
        causal = hf(**_hf_inputs(proc, PROMPTS[2], imgs, False)).logits[0, -1]
        bidir = hf(**_hf_inputs(proc, PROMPTS[2], imgs, True)).logits[0, -1]
    assert (causal - bidir).abs().max().item() > 1e-3
    monkeypatch.setenv(IMAGE_ATTENTION_ENV, "causal")
    with Engine(str(path), dtype="f32", num_kv_blocks=64, max_model_len=512) as eng:
        for n in (1, 2):
            _match(eng, hf, proc, n, bidirectional=False)
    monkeypatch.delenv(IMAGE_ATTENTION_ENV)
    with Engine(str(path), dtype="f32", num_kv_blocks=64, max_model_len=512) as eng:
        # ends just after the second image: the repeat's cached blocks end inside its soft run
        tail = "Compare <start_of_image> with <start_of_image>"
        prompt = {"prompt": tail, "images": imgs}
        want = _hf_greedy(hf, _hf_inputs(proc, tail, imgs, True), GREEDY.max_tokens)
        assert eng.generate(prompt, GREEDY)[0].outputs[0].token_ids == want
        again = eng.generate(prompt, GREEDY)[0]
        second = eng._prepare(prompt, GREEDY)[1][0].mm_items[1].placeholder
        assert second.offset < again.num_cached_tokens < second.offset + second.length - 1
        assert again.outputs[0].token_ids == want


def test_config_without_vision_loads_the_text_part(gemma, tmp_path):
    """No vision_config (and no tower weights): the text model alone, no image processor; its
    text-only tokens equal the full checkpoint's."""
    from safetensors.torch import load_file, save_file

    from mistralpy.models.gemma3 import Gemma3ForConditionalGeneration as TextOnly

    path, _, _ = gemma
    text_only = tmp_path / "text_only"
    shutil.copytree(path, text_only)
    cfg = json.loads((text_only / "config.json").read_text())
    del cfg["vision_config"]
    (text_only / "config.json").write_text(json.dumps(cfg))
    state = load_file(str(text_only / "model.safetensors"))
    save_file({k: v for k, v in state.items() if "vision_tower" not in k and "multi_modal_projector" not in k},
              str(text_only / "model.safetensors"), metadata={"format": "pt"})
    prompt = "plain text prompt with no image at all"
    with Engine(str(text_only), dtype="f32", num_kv_blocks=64, max_model_len=512) as eng:
        assert type(eng.core.runner.model) is TextOnly and eng.media is None
        ours = eng.generate(prompt, GREEDY)[0].outputs[0].token_ids
    with Engine(str(path), dtype="f32", num_kv_blocks=64, max_model_len=512) as eng:
        assert eng.generate(prompt, GREEDY)[0].outputs[0].token_ids == ours


def test_isq_keeps_the_tower_float_and_decodes_natively(gemma, monkeypatch):
    """ISQ Q8_0 (bf16) quantizes the text model only; its decode steps then run in the native CPU loop
    (reached through ``model.model``), with the eager path's tokens. The bidirectional mode's
    attention wrapper keeps decode eager."""
    from mistralpy.kernels import cpu as cpu_ext
    from mistralpy.layers.linear import Linear
    from mistralpy.models.gemma3_vision import IMAGE_ATTENTION_ENV

    path, _, _ = gemma
    prompt = {"prompt": PROMPTS[1], "images": [IMAGES["a"]()]}
    tokens = []
    for native, mode in (("1", "causal"), ("0", "causal"), ("1", "bidirectional")):
        monkeypatch.setenv("MISTRALPY_NATIVE_DECODE", native)
        monkeypatch.setenv(IMAGE_ATTENTION_ENV, mode)
        with Engine(str(path), dtype="bf16", isq="q8_0", num_kv_blocks=64, max_model_len=512) as eng:
            model = eng.core.runner.model
            tower = [m for part in (model.vision_tower, model.multi_modal_projector) for m in part.modules()
                     if isinstance(m, Linear)]
            text = [m for m in model.language_model.modules() if isinstance(m, Linear)]
            assert tower and all(m.isq is None and m.qkernel is None for m in tower)
            assert text and all(m.qkernel is not None for m in text)
            if native == "1" and cpu_ext.load():
                assert (eng.core.runner.native is not None) == (mode == "causal")
            tokens.append(eng.generate(prompt, GREEDY)[0].outputs[0].token_ids)
    assert tokens[0] == tokens[1] and len(tokens[0]) == GREEDY.max_tokens


def _old_layout(name: str) -> str:
    """transformers 5's saved name -> the layout of the published (transformers 4) checkpoints."""
    if name.startswith("vision_tower."):
        return "vision_tower.vision_model." + name[len("vision_tower."):]
    return name


def _new_layout(name: str) -> str:
    """-> the model.language_model / model.vision_tower / model.multi_modal_projector layout."""
    if name.startswith("language_model.model."):
        return "model.language_model." + name[len("language_model.model."):]
    if name.startswith("language_model.lm_head."):
        return name[len("language_model."):]
    return "model." + name


@pytest.mark.parametrize("rename", [_old_layout, _new_layout])
def test_both_checkpoint_layouts_load(gemma, tmp_path, rename):
    from safetensors.torch import load_file, save_file

    path, _, _ = gemma
    moved = tmp_path / rename.__name__
    shutil.copytree(path, moved)
    state = load_file(str(moved / "model.safetensors"))
    assert any(k.startswith("vision_tower.embeddings.") for k in state)   # what transformers 5 saved
    save_file({rename(k): v for k, v in state.items()}, str(moved / "model.safetensors"), metadata={"format": "pt"})
    prompt = {"prompt": PROMPTS[1], "images": [IMAGES["a"]()]}
    outs = []
    for p in (path, moved):
        with Engine(str(p), dtype="f32", num_kv_blocks=64, max_model_len=512) as eng:
            outs.append(eng.generate(prompt, GREEDY)[0].outputs[0].token_ids)
    assert outs[0] == outs[1]
