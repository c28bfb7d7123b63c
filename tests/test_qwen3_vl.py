"""Qwen3-VL and Qwen3-VL-MoE on the paged engine against transformers (float32): interleaved M-RoPE, the vision tower
(learned position table interpolated to each grid, DeepStack mergers), last-position logits and
greedy tokens / per-step logprobs with one and two images of different sizes (DeepStack rows added
after the first decoder layers at the image positions), text-only prompts, a request alone vs in a
mixed batch with chunked prefill cutting through the image run, and prefix-cache hits. MoE: the
same against transformers, with experts fused in either layout."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from fixtures_vlm import assert_same_as_hf as _assert_same_as_hf
from fixtures_vlm import build_qwen3_vl
from fixtures_vlm import qwen_hf_generate as _hf_generate
from fixtures_vlm import qwen_hf_kwargs as _hf_kwargs
from fixtures_vlm import qwen_hf_pixels as _hf_pixels
from fixtures_vlm import random_image as _image
from PIL import Image

from mistralpy import Engine, SamplingParams

transformers = pytest.importorskip("transformers")

ARCHS = {"Qwen3VLForConditionalGeneration": ("qwen3_vl", "Qwen3VLForConditionalGeneration"),
         "Qwen3VLMoeForConditionalGeneration": ("qwen3_vl", "Qwen3VLMoeForConditionalGeneration")}
PH = "<|vision_start|><|image_pad|><|vision_end|>"
N_TOKENS = 20
GREEDY = SamplingParams(temperature=0, max_tokens=N_TOKENS, ignore_eos=True, logprobs=True)


# 140x100 -> 96x128 px, 6x8 patches, 12 merged tokens; 60x90 -> 96x64 px, 6x4 patches, 6 tokens
IMAGES = [_image(140, 100, 1), _image(60, 90, 2)]
NUM_EMBEDS = (12, 6)


@pytest.fixture(scope="module", autouse=True)
def registered():
    """The registry entry the lead adds to models/registry.py."""
    from mistralpy.models import registry

    with pytest.MonkeyPatch.context() as mp:
        for arch, entry in ARCHS.items():
            mp.setitem(registry._REGISTRY, arch, entry)
        yield


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer_dir):
    path = build_qwen3_vl(tmp_path_factory.mktemp("qwen3_vl"), tokenizer_dir)
    hf = transformers.Qwen3VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return path, hf


@pytest.fixture(scope="module")
def engine(ckpt):
    with Engine(str(ckpt[0]), dtype="f32", num_kv_blocks=64, max_model_len=256) as eng:
        yield eng


def _expanded(eng: Engine, prompt) -> list[int]:
    return eng._prepare(prompt, GREEDY)[1][0].prompt_token_ids


# ---- pieces ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("section", [[4, 2, 2], [2, 3, 3]])
def test_interleaved_mrope_matches_transformers(section):
    """[3, T] positions against transformers' Qwen3-VL rotary (interleaved axes) + apply_rotary_pos_emb;
    the Qwen2-VL (chunked) mode of the same section differs."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding, apply_rotary_pos_emb

    from mistralpy.layers.mrope import get_mrope

    cfg = transformers.Qwen3VLTextConfig(hidden_size=32, num_attention_heads=2, head_dim=16,
                                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                          "mrope_section": section})
    rotary = Qwen3VLTextRotaryEmbedding(cfg)
    ours = get_mrope(16, 512, 10000.0, section, torch.float32, interleaved=True)
    g = torch.Generator().manual_seed(0)
    t = 37
    pos = torch.randint(0, 300, (3, t), generator=g)
    q, k = torch.randn(t, 2, 16, generator=g), torch.randn(t, 1, 16, generator=g)
    cos, sin = rotary(q, pos[:, None, :])
    ref_q, ref_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    oq, ok = ours(pos, q, k)
    assert torch.allclose(oq, ref_q[0].transpose(0, 1), atol=1e-6) and torch.allclose(ok, ref_k[0].transpose(0, 1),
                                                                                        atol=1e-6)
    chunked_q, _ = get_mrope(16, 512, 10000.0, section, torch.float32)(pos, q, k)
    assert not torch.allclose(chunked_q, oq, atol=1e-3)


def test_vision_tower_matches_transformers(ckpt, engine):
    """Each image alone through our tower equals its rows of transformers' tower run on both at once:
    the merged rows and each DeepStack merger's rows."""
    path, hf = ckpt
    px = _hf_pixels(path, IMAGES)
    with torch.no_grad():
        out = hf.model.visual(px["pixel_values"], grid_thw=px["image_grid_thw"])
    ref = torch.cat([out.pooler_output, *out.deepstack_features], dim=-1)
    assert len(out.deepstack_features) == 2
    items = engine._prepare({"prompt": f"{PH}{PH}", "images": IMAGES}, GREEDY)[1][0].mm_items
    ours = torch.cat([engine.core.runner.model.embed_multimodal(it) for it in items])
    assert [it.num_embeds for it in items] == list(NUM_EMBEDS)
    assert ours.shape == ref.shape == (sum(NUM_EMBEDS), 3 * 32)
    assert (ours - ref).abs().max().item() < 1e-5


def test_position_table_interpolation_matches_transformers():
    """Our bilinear taps equal transformers' get_vision_interpolation_indices_and_weights (merge order)."""
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights

    from mistralpy.multimodal.encoders.qwen2_vl_vision import vision_position_ids
    from mistralpy.multimodal.encoders.qwen3_vl_vision import interpolation_taps

    grid = torch.tensor([[1, 6, 8], [2, 4, 6], [1, 2, 2]])
    ref_i, ref_w = get_vision_interpolation_indices_and_weights(grid, 5, mode="bilinear", align_corners=True,
                                                                spatial_merge_size=2)
    hw = torch.cat([torch.tensor([[h, w]]).expand(t * h * w, 2) for t, h, w in grid.tolist()])
    idx, wts = interpolation_taps(vision_position_ids(grid, 2), hw, 5)
    assert torch.equal(idx, ref_i) and torch.allclose(wts, ref_w, atol=1e-7)


# ---- against transformers ----------------------------------------------------------------------------

@pytest.mark.parametrize("n_images", [1, 2])
def test_logits_and_greedy_match_transformers(ckpt, engine, n_images):
    path, hf = ckpt
    images = IMAGES[:n_images]
    text = f"Describe {PH} briefly." if n_images == 1 else f"Compare {PH} with {PH} now."
    ids = engine.tokenize(text, add_special_tokens=False)
    prompt = {"prompt": ids, "images": images}
    expanded = _expanded(engine, prompt)
    assert len(expanded) == len(ids) - n_images + sum(NUM_EMBEDS[:n_images])
    kwargs = _hf_kwargs(engine, path, expanded, images)
    with torch.no_grad():
        ref = torch.log_softmax(hf(input_ids=torch.tensor([expanded]), **kwargs).logits[0, -1].double(), -1)
    out = engine.generate(prompt, SamplingParams(temperature=0, max_tokens=1, top_logprobs=20))[0].outputs[0]
    top = out.logprobs[0].top_logprobs
    assert len(top) == 20 and out.token_ids[0] == int(ref.argmax())
    assert max(abs(t.logprob - ref[t.token_id].item()) for t in top) < 1e-4
    ours = engine.generate(prompt, GREEDY)[0].outputs[0]
    _assert_same_as_hf(ours, *_hf_generate(hf, expanded, kwargs))


def test_deepstack_moves_the_logits(ckpt, engine):
    """Without the DeepStack rows (transformers' model with them zeroed) the logits differ from ours,
    so the logits test above would catch them being dropped."""
    path, hf = ckpt
    prompt = {"prompt": f"Describe {PH} briefly.", "images": [IMAGES[0]]}
    expanded = _expanded(engine, prompt)
    kwargs = _hf_kwargs(engine, path, expanded, [IMAGES[0]])
    out = engine.generate(prompt, SamplingParams(temperature=0, max_tokens=1, top_logprobs=5))[0].outputs[0]
    visual = hf.model.visual
    mergers = visual.deepstack_merger_list
    saved = [m.linear_fc2.weight.clone() for m in mergers] + [m.linear_fc2.bias.clone() for m in mergers]
    try:
        with torch.no_grad():
            for m in mergers:
                m.linear_fc2.weight.zero_()
                m.linear_fc2.bias.zero_()
            ref = torch.log_softmax(hf(input_ids=torch.tensor([expanded]), **kwargs).logits[0, -1].double(), -1)
    finally:
        with torch.no_grad():
            for m, w, b in zip(mergers, saved[: len(mergers)], saved[len(mergers):]):
                m.linear_fc2.weight.copy_(w)
                m.linear_fc2.bias.copy_(b)
    top = out.logprobs[0].top_logprobs
    assert max(abs(t.logprob - ref[t.token_id].item()) for t in top) > 1e-3


def test_text_only_matches_transformers(ckpt, engine):
    hf = ckpt[1]
    assert engine.core.runner.native is None   # the C++ decode loop applies plain RoPE only
    ids = engine.tokenize("plain text, no picture at all", add_special_tokens=False)
    ours = engine.generate(ids, GREEDY)[0].outputs[0]
    _assert_same_as_hf(ours, *_hf_generate(hf, ids, {}))


def test_batched_chunked_and_prefix_cached(ckpt):
    """Two image requests (12 and 6 image tokens) and a text-only one, alone and together, with a
    5-token budget cutting through the image runs (DeepStack rows split with them): the same tokens
    and logprobs as transformers and as each other; the first again is a prefix-cache hit with the
    same tokens; the image changes the output."""
    path, hf = ckpt
    with Engine(str(path), dtype="f32", num_kv_blocks=128, max_model_len=256, max_num_batched_tokens=5) as eng:
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
        assert max(abs(x.logprob - y.logprob) for x, y in zip(again.outputs[0].logprobs, solo[0].logprobs)) < 1e-5


def test_video_matches_transformers(ckpt, engine):
    """A 5-frame video (3 temporal patches, Qwen3-VL's per-frame timestamp text in the expansion) next
    to an image: DeepStack rows for both modalities; logprobs and greedy tokens equal transformers'
    with our pixel_values_videos (its video processor needs torchvision)."""
    path, hf = ckpt
    rng = np.random.default_rng(5)
    frames = [Image.fromarray(rng.integers(0, 256, (90, 60, 3), dtype=np.uint8)) for _ in range(5)]
    ids = engine.tokenize(f"Watch <|vision_start|><|video_pad|><|vision_end|> then {PH} ok", add_special_tokens=False)
    prompt = {"prompt": ids, "images": [IMAGES[1]], "videos": [frames]}
    req = engine._prepare(prompt, GREEDY)[1][0]
    expanded = req.prompt_token_ids
    video = next(it for it in req.mm_items if it.modality == "video")
    assert video.inputs["video_grid_thw"][0, 0].item() == 3
    tok = engine.tokenizer
    types = torch.tensor([[1 if t == tok.token_to_id("<|image_pad|>") else 2 if t == tok.token_to_id("<|video_pad|>")
                           else 0 for t in expanded]])
    kwargs = {**_hf_pixels(path, [IMAGES[1]]), "pixel_values_videos": video.inputs["pixel_values_videos"],
              "video_grid_thw": video.inputs["video_grid_thw"], "mm_token_type_ids": types}
    ours = engine.generate(prompt, GREEDY)[0].outputs[0]
    _assert_same_as_hf(ours, *_hf_generate(hf, expanded, kwargs))


# ---- Qwen3-VL-MoE ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def moe_ckpt(tmp_path_factory, tokenizer_dir):
    path = build_qwen3_vl(tmp_path_factory.mktemp("qwen3_vl_moe"), tokenizer_dir, moe=True, seed=3, deepstack=(1,))
    hf = transformers.Qwen3VLMoeForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    assert hf.lm_head.weight.data_ptr() != hf.model.language_model.embed_tokens.weight.data_ptr()
    return path, hf


def _published_layout(src, dst) -> None:
    """The released checkpoints' expert layout: gate_up_proj [E, H, 2I], down_proj [E, I, H]."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    out = {k: (v.transpose(1, 2).contiguous() if ".mlp.experts." in k else v) for k, v in tensors.items()}
    assert any(".mlp.experts.gate_up_proj" in k for k in out)
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("layout", ["transformers", "published"])
def test_moe_matches_transformers(moe_ckpt, tmp_path, layout):
    """Two images and a text-only prompt: last-position logprobs, greedy tokens and per-step logprobs
    equal transformers' (DeepStack after decoder layer 0 only), from either expert layout."""
    path, hf = moe_ckpt
    folder = path
    if layout == "published":
        folder = tmp_path / "published"
        _published_layout(path, folder)
    with Engine(str(folder), dtype="f32", num_kv_blocks=64, max_model_len=256) as eng:
        model = eng.core.runner.model
        assert not model.lm_head.tied and model.num_deepstack == 1
        prompt = {"prompt": f"Compare {PH} with {PH} now.", "images": IMAGES}
        expanded = _expanded(eng, prompt)
        kwargs = _hf_kwargs(eng, path, expanded, IMAGES)
        with torch.no_grad():
            ref = torch.log_softmax(hf(input_ids=torch.tensor([expanded]), **kwargs).logits[0, -1].double(), -1)
        out = eng.generate(prompt, SamplingParams(temperature=0, max_tokens=1, top_logprobs=20))[0].outputs[0]
        assert max(abs(t.logprob - ref[t.token_id].item()) for t in out.logprobs[0].top_logprobs) < 1e-4
        _assert_same_as_hf(eng.generate(prompt, GREEDY)[0].outputs[0], *_hf_generate(hf, expanded, kwargs))
        ids = eng.tokenize("plain text, no picture at all", add_special_tokens=False)
        _assert_same_as_hf(eng.generate(ids, GREEDY)[0].outputs[0], *_hf_generate(hf, ids, {}))
