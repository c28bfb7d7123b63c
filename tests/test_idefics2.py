"""Idefics2 on the paged engine against transformers (float32), image splitting off and on: the
expanded prompt equals transformers' processor's, last-position logits and greedy tokens with one
and two images; alone, batched with text-only and other-image requests, with chunked prefill
cutting through the image runs, after a prefix-cache hit; a different image changes the logits.

The test images make the perceiver's and tower's masks matter: split quarters are padded to the
largest frame, and frame sides that are not multiples of the 8 px patch leave partial edge
patches, which Idefics2 (unlike Idefics3) counts as padding."""
from __future__ import annotations

import pytest
import torch
from fixtures_idefics2 import N_LATENTS, build_idefics2, hf_idefics2_processor, with_splitting
from fixtures_vlm import random_image as _image
from PIL import Image

from mistralpy import Engine, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
TOP = SamplingParams(temperature=0, max_tokens=1, top_logprobs=20)
IMAGES = {"a": (100, 80, 1), "b": (200, 50, 2)}   # w, h, seed


@pytest.fixture(scope="module")
def built(tmp_path_factory, tokenizer_dir):
    """{split: (checkpoint folder, transformers processor)}, and the transformers model (the same
    weights serve both folders)."""
    import transformers

    plain = build_idefics2(tmp_path_factory.mktemp("idefics2"), tokenizer_dir)
    split = with_splitting(plain, tmp_path_factory.mktemp("idefics2_split"))
    hf = transformers.Idefics2ForConditionalGeneration.from_pretrained(plain, dtype=torch.float32).eval()
    return {False: (plain, hf_idefics2_processor(plain)), True: (split, hf_idefics2_processor(split))}, hf


@pytest.fixture(scope="module", params=[False, True], ids=["whole", "split"])
def engine(request, built):
    folders, hf = built
    path, proc = folders[request.param]
    with Engine(str(path), dtype="f32", num_kv_blocks=64, max_model_len=512) as eng:
        yield request.param, eng, hf, proc


def _hf_inputs(proc, prompt: str, images: list[Image.Image]) -> dict:
    return dict(proc(text=[prompt], images=[images] if images else None, return_tensors="pt"))


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


@pytest.mark.parametrize("names", [["a"], ["a", "b"]])
def test_logits_and_greedy_match_transformers(engine, names):
    split, eng, hf, proc = engine
    imgs = [_image(*IMAGES[n]) for n in names]
    prompt = "User: look at <image> " + ("and<image>" if len(imgs) > 1 else "") + "please.<end_of_utterance>\nAssistant:"
    inputs = _hf_inputs(proc, prompt, imgs)
    req = eng._prepare({"prompt": prompt, "images": imgs}, GREEDY)[1][0]
    assert req.prompt_token_ids == inputs["input_ids"][0].tolist()
    frames = 5 if split else 1
    assert [it.num_embeds for it in req.mm_items] == [frames * N_LATENTS] * len(names)
    image_id = eng.tokenizer.token_to_id("<image>")
    positions = [p for it in req.mm_items for p in it.placeholder.embed_positions()]
    assert positions == [i for i, t in enumerate(req.prompt_token_ids) if t == image_id]
    with torch.no_grad():
        ref_logits = hf(**inputs).logits[0, -1]
    _check_top_logprobs(eng.generate({"prompt": prompt, "images": imgs}, TOP)[0], ref_logits)
    ours = eng.generate({"prompt": prompt, "images": imgs}, GREEDY)[0].outputs[0].token_ids
    assert ours == _hf_greedy(hf, inputs, GREEDY.max_tokens)


def test_batched_chunked_and_prefix_cached(built):
    """Splitting on (40 image rows per image): a mixed batch (one image, text only, two images) with
    a 7-token step budget cutting through every image run gives each request its solo tokens (the
    first equal to transformers'); another image changes the logits; the same request again is a
    prefix-cache and encoder-cache hit with the same tokens."""
    folders, hf = built
    path, proc = folders[True]
    a, b, c = _image(90, 70, seed=3), _image(60, 120, seed=4), _image(45, 37, seed=5)
    prompts = [{"prompt": "Look: <image> what is it? Say more.", "images": [a]},
               "plain text prompt with no image at all",
               {"prompt": "First <image> then <image>, compare them.", "images": [b, c]}]
    with Engine(str(path), dtype="f32", num_kv_blocks=256, max_model_len=512, max_num_batched_tokens=7) as eng:
        solo = [eng.generate(p, GREEDY)[0].outputs[0].token_ids for p in prompts]
        assert solo[0] == _hf_greedy(hf, _hf_inputs(proc, prompts[0]["prompt"], [a]), GREEDY.max_tokens)
        other = {"prompt": prompts[0]["prompt"], "images": [b]}
        lp = [eng.generate(p, SamplingParams(temperature=0, max_tokens=1, logprobs=True))[0].outputs[0].logprobs[0]
              for p in (prompts[0], other)]
        assert abs(lp[0].logprob - lp[1].logprob) > 1e-3   # the image matters
        cache = eng.core.runner.encoder_cache
        hits = cache.hits
        batched = [r.outputs[0].token_ids for r in eng.generate(prompts, GREEDY)]
        assert batched == solo
        assert cache.hits > hits
        again = eng.generate(prompts[2], GREEDY)[0]
        assert again.outputs[0].token_ids == solo[2] and again.num_cached_tokens > 0


def test_config_defaults():
    """Published configs leave most keys at transformers' defaults (idefics2-8b's text config names
    little beyond model_type / eps / vocab); a perceiver hidden size left at its default but unlike
    the text's takes the text's size and eps, as Idefics2Config does."""
    from mistralpy.models.idefics2 import Idefics2ForConditionalGeneration as M

    cfg = M.complete_config({"perceiver_config": {"resampler_depth": 3, "model_type": "idefics2"},
                             "text_config": {"model_type": "mistral", "rms_norm_eps": 1e-5, "vocab_size": 32003},
                             "vision_config": {"hidden_size": 1152, "patch_size": 14, "model_type": "idefics2"}})
    t, p, v = cfg["text_config"], cfg["perceiver_config"], cfg["vision_config"]
    assert (t["hidden_size"], t["num_key_value_heads"], t["sliding_window"], t["vocab_size"]) == (4096, 8, 4096, 32003)
    assert (p["hidden_size"], p["rms_norm_eps"], p["resampler_n_latents"], p["num_key_value_heads"]) == (4096, 1e-6, 64, 4)
    assert (v["num_attention_heads"], v["layer_norm_eps"], v["hidden_act"]) == (12, 1e-6, "gelu_pytorch_tanh")
    assert "model_type" not in v and cfg["tie_word_embeddings"] is False
    small = M.complete_config({"text_config": {"hidden_size": 64, "rms_norm_eps": 1e-5}})
    assert (small["perceiver_config"]["hidden_size"], small["perceiver_config"]["rms_norm_eps"]) == (64, 1e-5)
    assert M.complete_config(cfg) == cfg


def test_isq_keeps_the_tower_float(built):
    """ISQ Q8_0 (bf16) quantizes the text model only: the tower, projection and perceiver stay float."""
    from mistralpy.layers.linear import Linear

    path = built[0][False][0]
    with Engine(str(path), dtype="bf16", isq="q8_0", num_kv_blocks=64, max_model_len=512) as eng:
        model = eng.core.runner.model
        tower = [m for part in (model.vision_model, model.connector) for m in part.modules() if isinstance(m, Linear)]
        text = [m for m in model.language_model.modules() if isinstance(m, Linear)]
        assert tower and all(m.isq is None and m.qkernel is None for m in tower)
        assert text and all(m.qkernel is not None for m in text)
        out = eng.generate({"prompt": "Look: <image> what?", "images": [_image(90, 70, seed=3)]},
                           SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0]
        assert len(out.outputs[0].token_ids) == 4
