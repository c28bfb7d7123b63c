"""SmolVLM / Idefics3 on the paged engine against transformers (float32): the expanded prompt equals
transformers' processor's, last-position logits and greedy tokens with one image (a 2x2 tile grid +
the global image) and two images (plus a 1x2 grid); alone, batched with text-only and other-image
requests, with chunked prefill cutting through the image runs, after a prefix-cache hit."""
from __future__ import annotations

import pytest
import torch
from fixtures_vlm import build_idefics3, hf_idefics3_processor
from fixtures_vlm import random_image as _image
from PIL import Image

from mistralpy import Engine, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
TOP = SamplingParams(temperature=0, max_tokens=1, top_logprobs=20)
SEQ_LEN = 16   # rows per tile: (64 / 8)^2 patches / 2^2


_BUILT: dict[str, tuple] = {}


def _family(arch: str, tmp_path_factory, tokenizer_dir) -> tuple:
    """(arch, checkpoint folder, transformers model, transformers processor), built once per module."""
    import transformers

    if arch not in _BUILT:
        path = build_idefics3(tmp_path_factory.mktemp(arch), tokenizer_dir, arch=arch)
        cls = transformers.SmolVLMForConditionalGeneration if arch == "smolvlm" else \
            transformers.Idefics3ForConditionalGeneration
        _BUILT[arch] = arch, path, cls.from_pretrained(path, dtype=torch.float32).eval(), \
            hf_idefics3_processor(path, arch)
    return _BUILT[arch]


@pytest.fixture(scope="module", params=["smolvlm", "idefics3"])
def family(request, tmp_path_factory, tokenizer_dir):
    """SmolVLM over Llama, Idefics3 over Qwen2."""
    return _family(request.param, tmp_path_factory, tokenizer_dir)


@pytest.fixture(scope="module")
def smolvlm(tmp_path_factory, tokenizer_dir):
    return _family("smolvlm", tmp_path_factory, tokenizer_dir)


def _hf_inputs(proc, prompt: str, images: list[Image.Image]) -> dict:
    return dict(proc(text=[prompt], images=[images], return_tensors="pt"))


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


@pytest.mark.parametrize("names", [["grid"], ["grid", "wide"]])
def test_logits_and_greedy_match_transformers(family, names):
    arch, path, hf, proc = family
    images = {"grid": _image(100, 80, seed=1), "wide": _image(200, 50, seed=2)}
    imgs = [images[n] for n in names]
    prompt = "User: look at <image> " + ("and <image> " if len(imgs) > 1 else "") + "please.\nAssistant:"
    inputs = _hf_inputs(proc, prompt, imgs)
    with Engine(str(path), dtype="f32", num_kv_blocks=64, max_model_len=512) as eng:
        req = eng._prepare({"prompt": prompt, "images": imgs}, GREEDY)[1][0]
        assert req.prompt_token_ids == inputs["input_ids"][0].tolist()
        tiles = {"grid": 5, "wide": 3}   # 2x2 / 1x2 grids + the global image
        assert [it.num_embeds for it in req.mm_items] == [tiles[n] * SEQ_LEN for n in names]
        image_id = eng.tokenizer.token_to_id("<image>")
        positions = [p for it in req.mm_items for p in it.placeholder.embed_positions()]
        assert positions == [i for i, t in enumerate(req.prompt_token_ids) if t == image_id]
        with torch.no_grad():
            ref_logits = hf(**inputs).logits[0, -1]
        _check_top_logprobs(eng.generate({"prompt": prompt, "images": imgs}, TOP)[0], ref_logits)
        ours = eng.generate({"prompt": prompt, "images": imgs}, GREEDY)[0].outputs[0].token_ids
        assert ours == _hf_greedy(hf, inputs, GREEDY.max_tokens), arch


def test_batched_chunked_and_prefix_cached(smolvlm):
    """A mixed batch (one image, text only, two images) with a 7-token step budget cutting through
    every image run gives each request its solo tokens (the first equal to transformers'); the
    same request again is a prefix-cache and encoder-cache hit with the same tokens."""
    _, path, hf, proc = smolvlm   # (Idefics3 is the same network: one family covers the scheduling paths)
    a, b, c = _image(90, 70, seed=3), _image(60, 120, seed=4), _image(40, 40, seed=5)
    prompts = [{"prompt": "Look: <image> what is it? Say more.", "images": [a]},
               "plain text prompt with no image at all",
               {"prompt": "First <image> then <image>, compare them.", "images": [b, c]}]
    with Engine(str(path), dtype="f32", num_kv_blocks=256, max_model_len=512, max_num_batched_tokens=7) as eng:
        solo = [eng.generate(p, GREEDY)[0].outputs[0].token_ids for p in prompts]
        assert solo[0] == _hf_greedy(hf, _hf_inputs(proc, prompts[0]["prompt"], [a]), GREEDY.max_tokens)
        other = {"prompt": prompts[0]["prompt"], "images": [b]}
        lp = [eng.generate(p, SamplingParams(temperature=0, max_tokens=1, logprobs=True))[0].outputs[0].logprobs[0]
              for p in (prompts[0], other)]
        assert lp[0].logprob != lp[1].logprob   # the image matters
        cache = eng.core.runner.encoder_cache
        hits = cache.hits
        batched = [r.outputs[0].token_ids for r in eng.generate(prompts, GREEDY)]
        assert batched == solo
        assert cache.hits > hits
        again = eng.generate(prompts[2], GREEDY)[0]
        assert again.outputs[0].token_ids == solo[2] and again.num_cached_tokens > 0


def test_config_defaults_and_text_family():
    """Published SmolVLM configs leave vision keys at transformers' defaults and name their text
    model VLlama3ForCausalLM (not registered): the model type decides."""
    from mistralpy.models.idefics3 import SmolVLMForConditionalGeneration, text_class_by_type
    from mistralpy.models.llama import LlamaForCausalLM
    from mistralpy.models.qwen2 import Qwen2ForCausalLM

    cfg = SmolVLMForConditionalGeneration.complete_config({"vision_config": {"hidden_size": 768, "patch_size": 16},
                                                           "text_config": {"model_type": "llama"}})
    assert cfg["vision_config"]["image_size"] == 224 and cfg["vision_config"]["hidden_act"] == "gelu_pytorch_tanh"
    assert cfg["vision_config"]["layer_norm_eps"] == 1e-6 and cfg["scale_factor"] == 2
    assert text_class_by_type({"model_type": "llama", "architectures": ["VLlama3ForCausalLM"]}) is LlamaForCausalLM
    assert text_class_by_type({"model_type": "qwen2"}) is Qwen2ForCausalLM


def test_isq_keeps_the_tower_float_and_decodes_natively(smolvlm, monkeypatch):
    """ISQ Q8_0 (bf16) quantizes the text model only; its decode steps then run in the native CPU loop
    (reached through ``model.model``), with the eager path's tokens."""
    from mistralpy.kernels import cpu as cpu_ext
    from mistralpy.layers.linear import Linear

    _, path, _, _ = smolvlm
    prompt = {"prompt": "Look: <image> what is it?", "images": [_image(90, 70, seed=3)]}
    tokens = []
    for native in ("1", "0"):
        monkeypatch.setenv("MISTRALPY_NATIVE_DECODE", native)
        with Engine(str(path), dtype="bf16", isq="q8_0", num_kv_blocks=64, max_model_len=512) as eng:
            model = eng.core.runner.model
            tower = [m for part in (model.vision_model, model.connector) for m in part.modules()
                     if isinstance(m, Linear)]
            text = [m for m in model.language_model.modules() if isinstance(m, Linear)]
            assert tower and all(m.isq is None and m.qkernel is None for m in tower)
            assert text and all(m.qkernel is not None for m in text)
            if native == "1" and cpu_ext.load():
                assert eng.core.runner.native is not None
            tokens.append(eng.generate(prompt, GREEDY)[0].outputs[0].token_ids)
    assert tokens[0] == tokens[1] and len(tokens[0]) == GREEDY.max_tokens
