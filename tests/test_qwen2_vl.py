"""Qwen2-VL and Qwen2.5-VL on the paged engine against transformers (float32): M-RoPE, the vision
towers (2.5: window attention), last-position logits and greedy tokens with one and two images of
different sizes, per-step logprobs (which catch a wrong decode delta that the tokens alone may not),
text-only prompts, a request alone vs in a mixed batch with chunked prefill cutting through the image
run, prefix-cache hits, both checkpoint layouts with a tied head, ISQ leaving the tower float, and the
native / compiled decode paths declining these models."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from fixtures_vlm import assert_same_as_hf as _assert_same_as_hf
from fixtures_vlm import build_qwen2_vl
from fixtures_vlm import qwen_hf_generate as _hf_generate
from fixtures_vlm import qwen_hf_kwargs as _hf_kwargs
from fixtures_vlm import qwen_hf_pixels as _hf_pixels
from fixtures_vlm import random_image as _image
from PIL import Image

from mistralpy import Engine, SamplingParams

transformers = pytest.importorskip("transformers")

VERSIONS = ("qwen2_vl", "qwen2_5_vl")
PH = "<|vision_start|><|image_pad|><|vision_end|>"
N_TOKENS = 20
GREEDY = SamplingParams(temperature=0, max_tokens=N_TOKENS, ignore_eos=True, logprobs=True)


# 140x100 -> 8x10 patches, 20 merged tokens (several 2.5 windows); 60x90 -> 6x4 patches, 6 tokens
IMAGES = [_image(140, 100, 1), _image(60, 90, 2)]


def _hf_class(version: str) -> type:
    return {"qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
            "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration}[version]


@pytest.fixture(scope="module", params=VERSIONS)
def ckpt(request, tmp_path_factory, tokenizer_dir):
    version = request.param
    path = build_qwen2_vl(tmp_path_factory.mktemp(version), tokenizer_dir, version)
    hf = _hf_class(version).from_pretrained(path, dtype=torch.float32).eval()
    return version, path, hf


@pytest.fixture(scope="module")
def engine(ckpt):
    with Engine(str(ckpt[1]), dtype="f32", num_kv_blocks=64, max_model_len=256) as eng:
        yield eng


def _expanded(eng: Engine, prompt) -> list[int]:
    return eng._prepare(prompt, GREEDY)[1][0].prompt_token_ids


# ---- pieces ------------------------------------------------------------------------------------------

def test_mrope_rotation_matches_transformers(ckpt):
    """[3, T] positions against transformers' rotary + apply_rotary_pos_emb; equal axes = plain RoPE."""
    from mistralpy.layers.mrope import get_mrope
    from mistralpy.layers.rotary import get_rope

    hf = ckpt[2]
    rotary = hf.model.language_model.rotary_emb
    ours = get_mrope(16, 512, 10000.0, [2, 3, 3], torch.float32)
    g = torch.Generator().manual_seed(0)
    t = 37
    pos = torch.randint(0, 300, (3, t), generator=g)
    q, k = torch.randn(t, 2, 16, generator=g), torch.randn(t, 1, 16, generator=g)
    cos, sin = rotary(q, pos[:, None, :])
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb

    ref_q, ref_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    oq, ok = ours(pos, q, k)
    assert torch.allclose(oq, ref_q[0].transpose(0, 1), atol=1e-6) and torch.allclose(ok, ref_k[0].transpose(0, 1),
                                                                                        atol=1e-6)
    flat = pos[0]
    plain_q, plain_k = get_rope(16, 16, 512, 10000.0, None, torch.float32)(flat, q, k)
    eq_q, eq_k = ours(flat.expand(3, -1).clone(), q, k)
    assert torch.allclose(eq_q, plain_q, atol=1e-6) and torch.allclose(eq_k, plain_k, atol=1e-6)


def test_vision_tower_matches_transformers(ckpt, engine):
    """Each image alone through our tower equals its rows of transformers' tower run on both at once."""
    _, path, hf = ckpt
    px = _hf_pixels(path, IMAGES)
    with torch.no_grad():
        ref = hf.model.visual(px["pixel_values"], grid_thw=px["image_grid_thw"]).pooler_output
    items = engine._prepare({"prompt": f"{PH}{PH}", "images": IMAGES}, GREEDY)[1][0].mm_items
    ours = torch.cat([engine.core.runner.model.embed_multimodal(it) for it in items])
    assert [it.num_embeds for it in items] == [20, 6]
    assert ours.shape == ref.shape and (ours - ref).abs().max().item() < 1e-5


# ---- against transformers ----------------------------------------------------------------------------

@pytest.mark.parametrize("n_images", [1, 2])
def test_logits_and_greedy_match_transformers(ckpt, engine, n_images):
    _, path, hf = ckpt
    images = IMAGES[:n_images]
    text = f"Describe {PH} briefly." if n_images == 1 else f"Compare {PH} with {PH} now."
    ids = engine.tokenize(text, add_special_tokens=False)
    prompt = {"prompt": ids, "images": images}
    expanded = _expanded(engine, prompt)
    assert len(expanded) == len(ids) - n_images + sum((20, 6)[:n_images])
    kwargs = _hf_kwargs(engine, path, expanded, images)
    with torch.no_grad():
        ref = torch.log_softmax(hf(input_ids=torch.tensor([expanded]), **kwargs).logits[0, -1].double(), -1)
    out = engine.generate(prompt, SamplingParams(temperature=0, max_tokens=1, top_logprobs=20))[0].outputs[0]
    top = out.logprobs[0].top_logprobs
    assert len(top) == 20 and out.token_ids[0] == int(ref.argmax())
    assert max(abs(t.logprob - ref[t.token_id].item()) for t in top) < 1e-4
    ours = engine.generate(prompt, GREEDY)[0].outputs[0]
    _assert_same_as_hf(ours, *_hf_generate(hf, expanded, kwargs))


def test_text_only_matches_transformers(ckpt, engine):
    hf = ckpt[2]
    ids = engine.tokenize("plain text, no picture at all", add_special_tokens=False)
    ours = engine.generate(ids, GREEDY)[0].outputs[0]
    _assert_same_as_hf(ours, *_hf_generate(hf, ids, {}))


def test_batched_chunked_and_prefix_cached(ckpt):
    """Two image requests (20 and 6 image tokens) and a text-only one, alone and together, with an
    8-token budget cutting through the image runs: the same tokens and logprobs; the first again is
    a prefix-cache hit with the same tokens; the image changes the output."""
    _, path, hf = ckpt
    with Engine(str(path), dtype="f32", num_kv_blocks=128, max_model_len=256, max_num_batched_tokens=8) as eng:
        ids = eng.tokenize(f"Look: {PH} what is it? Say more words here.", add_special_tokens=False)
        prompts = [{"prompt": ids, "images": [IMAGES[0]]}, "a text-only prompt in the same batch",
                   {"prompt": ids, "images": [IMAGES[1]]}]
        solo = [eng.generate(p, GREEDY)[0].outputs[0] for p in prompts]
        expanded = _expanded(eng, prompts[0])
        _assert_same_as_hf(solo[0], *_hf_generate(hf, expanded, _hf_kwargs(eng, path, expanded, [IMAGES[0]])))
        assert solo[0].logprobs[0].logprob != solo[2].logprobs[0].logprob   # the image matters
        batched = [r.outputs[0] for r in eng.generate(prompts, GREEDY)]
        for a, b in zip(batched, solo):
            assert a.token_ids == b.token_ids
            assert max(abs(x.logprob - y.logprob) for x, y in zip(a.logprobs, b.logprobs)) < 1e-5
        again = eng.generate(prompts[0], GREEDY)[0]
        assert again.num_cached_tokens > 0 and again.outputs[0].token_ids == solo[0].token_ids


def test_request_rope_positions_span_prompt_and_output():
    """A recompute chunk after preemption can run past the prompt: table rows, then index + delta."""
    from mistralpy.core.request import Request

    table = torch.tensor([[0, 1, 1, 1, 1, 3], [0, 1, 1, 2, 2, 3], [0, 1, 2, 1, 2, 3]])
    req = Request("r#0", [7] * 6, SamplingParams(max_tokens=4).resolved(), 64)
    req.output_token_ids = [5, 5, 5]
    req.mrope_positions, req.mrope_delta = table, -2
    assert torch.equal(req.rope_positions(4, 8), torch.tensor([[1, 3, 4, 5], [2, 3, 4, 5], [2, 3, 4, 5]]))
    assert torch.equal(req.rope_positions(7, 8), torch.tensor([[5], [5], [5]]))
    plain = Request("t#0", [7] * 3, SamplingParams(max_tokens=4).resolved(), 64)
    assert torch.equal(plain.rope_positions(1, 4), torch.arange(1, 4).expand(3, -1))


def test_preempted_request_recomputes_its_positions(ckpt):
    """Two image requests in a pool too small for both: the newer is preempted and recomputed over
    prompt + generated tokens; both keep their solo tokens and logprobs."""
    path = ckpt[1]
    long = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=True)
    with Engine(str(path), dtype="f32", num_kv_blocks=7, block_size=16, max_model_len=112) as eng:
        prompts = [{"prompt": f"Picture: {PH} tell me.", "images": [im]} for im in IMAGES]
        solo = [eng.generate(p, long)[0].outputs[0] for p in prompts]
        before = eng.core.scheduler.num_preemptions
        both = [r.outputs[0] for r in eng.generate(prompts, long)]
        assert eng.core.scheduler.num_preemptions > before
        for a, b in zip(both, solo):
            assert a.token_ids == b.token_ids
            assert max(abs(x.logprob - y.logprob) for x, y in zip(a.logprobs, b.logprobs)) < 1e-5


# ---- loading -----------------------------------------------------------------------------------------

def _v5_layout(src, dst) -> None:
    """transformers 5 saves the published layout (visual.*, model.*); rename to its in-memory one."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    renamed = {}
    for name, t in tensors.items():
        if name.startswith("visual."):
            name = "model." + name
        elif name.startswith("model."):
            name = "model.language_model." + name[len("model."):]
        renamed[name] = t
    save_file(renamed, str(dst / "model.safetensors"), metadata={"format": "pt"})


def test_v5_layout_and_tied_head(tmp_path, tokenizer_dir):
    path = build_qwen2_vl(tmp_path / "tied", tokenizer_dir, "qwen2_vl", seed=1, tie_word_embeddings=True)
    hf = transformers.Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    assert hf.lm_head.weight.data_ptr() == hf.model.language_model.embed_tokens.weight.data_ptr()
    _v5_layout(path, tmp_path / "v5")
    for folder in (path, tmp_path / "v5"):
        with Engine(str(folder), dtype="f32", num_kv_blocks=32, max_model_len=128) as eng:
            assert eng.core.runner.model.lm_head.tied
            prompt = {"prompt": f"Describe {PH} briefly.", "images": [IMAGES[1]]}
            expanded = _expanded(eng, prompt)
            ours = eng.generate(prompt, GREEDY)[0].outputs[0]
            _assert_same_as_hf(ours, *_hf_generate(hf, expanded, _hf_kwargs(eng, path, expanded, [IMAGES[1]])))


def test_config_layouts_read_alike(ckpt):
    """A published (flat) config.json builds the same language model as transformers 5's nested one."""
    from mistralpy.attention.torch_ref import TorchRefBackend
    from mistralpy.models.qwen2_vl import text_config

    cfg = json.loads((ckpt[1] / "config.json").read_text())
    flat = {**{k: v for k, v in cfg.items() if k != "text_config"}, **cfg["text_config"]}
    flat["text_config"] = flat.copy()   # what loading/model_loader.py passes for a flat config
    a, b = text_config(cfg), text_config(flat)
    for key in ("hidden_size", "num_hidden_layers", "head_dim", "rope_parameters", "tie_word_embeddings"):
        assert a[key] == b[key], key
    from mistralpy.models.registry import get_model_class

    model = get_model_class(cfg["architectures"][0])(flat, TorchRefBackend())
    assert model.language_model.model.layers[0].self_attn.rotary_emb.mrope_section == (2, 3, 3)


def test_isq_keeps_the_tower_float_and_fast_decode_paths_decline(ckpt):
    from mistralpy.layers.linear import Linear
    from mistralpy.worker.native_decode import NativeDecode, NotEligible

    with Engine(str(ckpt[1]), dtype="f32", isq="q8_0", num_kv_blocks=32, max_model_len=128) as eng:
        runner = eng.core.runner
        model = runner.model
        tower = [m for m in model.visual.modules() if isinstance(m, Linear)]
        text = [m for m in model.language_model.modules() if isinstance(m, Linear)]
        assert tower and all(m.isq is None and m.qkernel is None for m in tower)
        assert text and all(m.qkernel is not None for m in text)
        assert runner.native is None
        with pytest.raises(NotEligible):
            NativeDecode(model)
        with pytest.raises(NotEligible):
            NativeDecode(model.language_model)   # its M-RoPE is not the plain rotary the C++ loop applies
        assert runner.enable_compile() is False
        out = eng.generate({"prompt": f"Describe {PH} briefly.", "images": [IMAGES[1]]}, GREEDY)[0].outputs[0]
        assert len(out.token_ids) == N_TOKENS


def test_isq_vision_quantizes_the_tower_too(ckpt):
    """``isq_vision``: the tower's linears whose widths fit Q8_0 blocks are quantized too; the answer
    stays close to the float tower's (Q8_0) and still depends on the image."""
    from mistralpy.layers.linear import Linear

    prompt = {"prompt": f"Describe {PH} briefly.", "images": [IMAGES[1]]}
    one = SamplingParams(temperature=0, max_tokens=1, logprobs=True)
    with Engine(str(ckpt[1]), dtype="f32", isq="q8_0", num_kv_blocks=32, max_model_len=128) as eng:
        float_tower = eng.generate(prompt, one)[0].outputs[0].logprobs[0]
    with Engine(str(ckpt[1]), dtype="f32", isq="q8_0", isq_vision=True, num_kv_blocks=32, max_model_len=128) as eng:
        tower = [m for m in eng.core.runner.model.visual.modules() if isinstance(m, Linear)]
        quantized = [m for m in tower if m.qkernel is not None]
        assert quantized and len(quantized) >= len(tower) - 1   # the patch embedding's width may not fit
        out = eng.generate(prompt, one)[0].outputs[0].logprobs[0]
        other = eng.generate({**prompt, "images": [IMAGES[0]]}, one)[0].outputs[0].logprobs[0]
    assert out.token_id == float_tower.token_id and abs(out.logprob - float_tower.logprob) < 0.05
    assert other.logprob != out.logprob


# ---- video (the model side: items built by our processor, fed through Engine._prepare) ---------------

def test_video_matches_transformers(ckpt, engine):
    """A 5-frame video given as frames (3 temporal patches: frame-wise attention, 2.5's windows per
    frame and its second_per_grid_ts time positions) next to an image, through generate's
    ``videos``: logprobs and greedy tokens equal transformers' with our pixel_values_videos (its
    video processor needs torchvision)."""
    version, path, hf = ckpt
    proc = engine.media.processor
    rng = np.random.default_rng(5)
    frames = [Image.fromarray(rng.integers(0, 256, (90, 60, 3), dtype=np.uint8)) for _ in range(5)]
    video = proc.process_video(frames, 2.0, "video-5")   # frame lists are taken at the default 2 fps
    assert video.inputs["video_grid_thw"].tolist() == [[3, 6, 4]]
    ids = engine.tokenize(f"Watch <|vision_start|><|video_pad|><|vision_end|> then {PH} ok", add_special_tokens=False)
    prompt = {"prompt": ids, "images": [IMAGES[1]], "videos": [frames]}
    req = engine._prepare(prompt, GREEDY)[1][0]
    expanded = req.prompt_token_ids
    assert req.mrope_positions is not None and req.mrope_positions.shape == (3, len(expanded))
    tok = engine.tokenizer
    types = torch.tensor([[1 if t == tok.token_to_id("<|image_pad|>") else 2 if t == tok.token_to_id("<|video_pad|>")
                           else 0 for t in expanded]])
    kwargs = {**_hf_pixels(path, [IMAGES[1]]), "pixel_values_videos": video.inputs["pixel_values_videos"],
              "video_grid_thw": video.inputs["video_grid_thw"], "mm_token_type_ids": types}
    if version == "qwen2_5_vl":
        kwargs["second_per_grid_ts"] = video.inputs["second_per_grid_ts"]
    ours = engine.generate(prompt, GREEDY)[0].outputs[0]
    _assert_same_as_hf(ours, *_hf_generate(hf, expanded, kwargs))


def test_video_file_decodes_and_samples_like_its_frames(ckpt, engine, tmp_path):
    """An mp4 (40 frames at 10 fps) given as bytes and as a path is decoded with PyAV and sampled at
    2 fps (8 frames): the same tokens as passing those 8 frames; the video's hash is the file's."""
    from test_video_io import _mp4

    from mistralpy.multimodal.video_io import decode_video

    data, _ = _mp4(40, fps=10, w=60, h=90)
    path = tmp_path / "clip.mp4"
    path.write_bytes(data)
    frames = decode_video(data).frames
    assert len(frames) == 8
    ids = engine.tokenize("Watch <|vision_start|><|video_pad|><|vision_end|> now", add_special_tokens=False)
    outs = [engine.generate({"prompt": ids, "videos": [src]}, GREEDY)[0].outputs[0].token_ids
            for src in (data, str(path), frames)]
    assert outs[0] == outs[1] == outs[2]
    items = [engine._prepare({"prompt": ids, "videos": [src]}, GREEDY)[1][0].mm_items[0] for src in (data, str(path))]
    assert items[0].hash == items[1].hash and items[0].modality == "video"
