"""LLaVA 1.5 on the paged engine against transformers (float32): pixel values, placeholder
expansion, logits with an image in the prompt, greedy tokens; alone, batched with text-only and
other-image requests, with chunked prefill cutting through the image, after a prefix-cache hit."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from fixtures_vlm import build_llava
from fixtures_vlm import random_image as _image
from PIL import Image

from mistralpy import Engine, SamplingParams
from mistralpy.multimodal.inputs import MediaError

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def llava(tmp_path_factory, tokenizer_dir):
    return build_llava(tmp_path_factory.mktemp("llava"), tokenizer_dir)


@pytest.fixture(scope="module")
def hf(llava):
    import transformers

    return transformers.LlavaForConditionalGeneration.from_pretrained(llava, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_processor(llava):
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    return LlavaImageProcessorPil.from_pretrained(llava)


def _hf_greedy(hf, ids: list[int], pixels: torch.Tensor | None, n: int) -> list[int]:
    kwargs = {"pixel_values": pixels} if pixels is not None else {}
    out = hf.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                      eos_token_id=None, pad_token_id=0, **kwargs)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("size,mode", [((1, 1), "RGB"), ((37, 500), "RGB"), ((500, 37), "RGBA"), ((64, 64), "P"),
                                       ((4000, 30), "L")])
def test_pixels_equal_the_pil_processor(llava, hf_processor, size, mode):
    import json

    from mistralpy.multimodal.processors.llava import LlavaProcessor
    from mistralpy.tokenizer.tokenizer import Tokenizer

    img = _image(*size, seed=size[0], mode=mode)
    if mode == "RGBA":
        a = np.array(img)
        a[..., 3] = np.arange(a.shape[1])[None, :] % 256
        img = Image.fromarray(a, "RGBA")
    ref = hf_processor(img, return_tensors="pt")["pixel_values"]
    proc = LlavaProcessor(json.loads((llava / "preprocessor_config.json").read_text()),
                          json.loads((llava / "config.json").read_text()), Tokenizer.from_dir(llava))
    ours = proc.process_image(img, "x").inputs["pixel_values"]
    assert ours.shape == ref.shape and (ours - ref).abs().max().item() <= 1e-6


def test_logits_and_greedy_match_transformers(llava, hf, hf_processor):
    img = _image(80, 60, seed=1)
    with Engine(str(llava), dtype="f32", num_kv_blocks=64, max_model_len=256) as eng:
        ids = eng.tokenize("Describe <image> briefly.", add_special_tokens=False)
        tracker, reqs = eng._prepare({"prompt": ids, "images": [img]}, GREEDY)
        expanded = reqs[0].prompt_token_ids
        n_img = 16  # (56 / 14)^2 patches, CLS dropped
        image_id = eng.tokenizer.token_to_id("<image>")
        assert expanded.count(image_id) == n_img and len(expanded) == len(ids) - 1 + n_img
        assert reqs[0].mm_items[0].placeholder.offset == ids.index(image_id)
        pixels = hf_processor(img, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            ref_logits = hf(input_ids=torch.tensor([expanded]), pixel_values=pixels).logits[0, -1]
        out = eng.generate({"prompt": ids, "images": [img]},
                           SamplingParams(temperature=0, max_tokens=1, logprobs=True, top_logprobs=5))
        top = out[0].outputs[0].logprobs[0]
        ref_lp = torch.log_softmax(ref_logits.double(), -1)
        assert len(top.top_logprobs) == 5
        for t in top.top_logprobs:
            assert abs(t.logprob - ref_lp[t.token_id].item()) < 1e-4
        assert out[0].outputs[0].token_ids[0] == int(ref_logits.argmax())
        ours = eng.generate({"prompt": ids, "images": [img]}, GREEDY)[0].outputs[0].token_ids
        assert ours == _hf_greedy(hf, expanded, pixels, GREEDY.max_tokens)


def test_batched_chunked_and_prefix_cached(llava, hf, hf_processor):
    """A mixed batch (two images, one text-only), with a 7-token prefill budget cutting through
    the 16 image positions, gives each request its solo tokens; the same image + text again is a
    prefix-cache hit and an encoder-cache hit; another image with the same text is not."""
    imgs = [_image(70, 90, seed=2), _image(50, 50, seed=3)]
    with Engine(str(llava), dtype="f32", num_kv_blocks=128, max_model_len=256, max_num_batched_tokens=7) as eng:
        ids = eng.tokenize("Look: <image> what is it? Say more words here.", add_special_tokens=False)
        prompts = [{"prompt": ids, "images": [imgs[0]]}, "plain text prompt with no image",
                   {"prompt": ids, "images": [imgs[1]]}]
        solo = []
        for p in prompts:
            solo.append(eng.generate(p, GREEDY)[0].outputs[0].token_ids)
        # reference for the first: transformers
        expanded = eng._prepare(prompts[0], GREEDY)[1][0].prompt_token_ids
        pixels = hf_processor(imgs[0], return_tensors="pt")["pixel_values"]
        assert solo[0] == _hf_greedy(hf, expanded, pixels, GREEDY.max_tokens)
        lp = [eng.generate(p, SamplingParams(temperature=0, max_tokens=1, logprobs=True))[0].outputs[0].logprobs[0]
              for p in (prompts[0], prompts[2])]
        assert lp[0].logprob != lp[1].logprob  # the image matters
        cache = eng.core.runner.encoder_cache
        hits = cache.hits
        batched = [r.outputs[0].token_ids for r in eng.generate(prompts, GREEDY)]
        assert batched == solo
        assert cache.hits > hits  # the images came from the encoder cache
        again = eng.generate(prompts[0], GREEDY)[0]
        assert again.outputs[0].token_ids == solo[0] and again.num_cached_tokens >= 16


def test_chat_with_image_parts_and_errors(llava, tmp_path):
    img = _image(40, 40, seed=4)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    path = tmp_path / "cat.png"
    path.write_bytes(buf.getvalue())
    import base64

    data_url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    with Engine(str(llava), dtype="f32", num_kv_blocks=64, max_model_len=256) as eng:
        msg = lambda src: [{"role": "user", "content": [{"type": "text", "text": "What is this?"},  # noqa: E731
                                                          {"type": "image_url", "image_url": {"url": src}}]}]
        a = eng.chat(msg(data_url), temperature=0, max_tokens=8)
        b = eng.chat(msg(str(path)), temperature=0, max_tokens=8)
        c = eng.generate({"prompt": eng.render_chat(msg(str(path)), images=[]), "images": [img]},
                         SamplingParams(temperature=0, max_tokens=8))
        assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"] == c[0].outputs[0].text
        with pytest.raises(MediaError, match="placeholder"):
            eng.generate({"prompt": "no placeholder here", "images": [img]}, GREEDY)
        with pytest.raises(MediaError, match=r"content\[1\].*image"):
            eng.chat(msg("data:image/png;base64," + base64.b64encode(b"hello").decode()), max_tokens=2)
        with pytest.raises(MediaError, match="at most"):
            eng.generate({"prompt": "<image>" * 9, "images": [img] * 9}, GREEDY)


def test_cli_image_one_shot_and_interactive(llava, tmp_path):
    """`mistralpy run --image PATH -i ...` and an image path typed in interactive mode answer like
    the Python API."""
    import subprocess
    import sys

    path = tmp_path / "pic.png"
    _image(90, 70, seed=9).save(path)
    common = ["-m", str(llava), "--dtype", "f32", "--temperature", "0", "--max-tokens", "6"]
    one = subprocess.run([sys.executable, "-m", "mistralpy.cli.main", "run", *common, "-i", "Describe",
                          "--image", str(path)], capture_output=True, text=True, timeout=180)
    assert one.returncode == 0, one.stderr
    inter = subprocess.run([sys.executable, "-m", "mistralpy.cli.main", "run", *common],
                           input=f"Describe {path}\n/exit\n", capture_output=True, text=True, timeout=180)
    assert inter.returncode == 0, inter.stderr
    with Engine(str(llava), dtype="f32", num_kv_blocks=64, max_model_len=256) as eng:
        msgs = [{"role": "user", "content": [{"type": "text", "text": "Describe"},
                                             {"type": "image_url", "image_url": {"url": str(path)}}]}]
        want = eng.chat(msgs, temperature=0, max_tokens=6)["choices"][0]["message"]["content"]
    assert one.stdout == want + "\n"
    assert want in inter.stdout


def test_max_edge_shrinks_before_preprocessing(llava):
    """max_edge=20: a 90x70 image is shrunk to 20x16 first (its pixels and hash change; the
    placeholder count does not, CLIP's crop is fixed)."""
    from mistralpy.multimodal.processors.llava import LlavaProcessor

    img = _image(90, 70, seed=9)
    with Engine(str(llava), dtype="f32", num_kv_blocks=64, max_model_len=256, max_edge=20) as eng:
        ids = eng.tokenize("Describe <image>", add_special_tokens=False)
        item = eng._prepare({"prompt": ids, "images": [img]}, GREEDY)[1][0].mm_items[0]
        proc: LlavaProcessor = eng.media.processor
        want = proc.process_image(img.resize((20, 16), Image.Resampling.BICUBIC), "x").inputs["pixel_values"]
        assert torch.equal(item.inputs["pixel_values"], want)
        full = proc.process_image(img, "x").inputs["pixel_values"]
        assert not torch.equal(full, want)


def test_preemption_and_abort_release_encoder_references(llava):
    """Two image requests in a KV pool too small for both: the newer is preempted (its encoder
    references dropped), recomputed later, and both still give their solo tokens; an aborted
    stream and every finished request leave no references behind."""
    imgs = [_image(60, 60, seed=11), _image(61, 59, seed=12)]
    long = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    with Engine(str(llava), dtype="f32", num_kv_blocks=7, block_size=16, max_model_len=112) as eng:
        ids = eng.tokenize("Picture: <image> tell me.", add_special_tokens=False)
        prompts = [{"prompt": ids, "images": [im]} for im in imgs]
        solo = [eng.generate(p, long)[0].outputs[0].token_ids for p in prompts]
        before = eng.core.scheduler.num_preemptions
        both = [r.outputs[0].token_ids for r in eng.generate(prompts, long)]
        assert eng.core.scheduler.num_preemptions > before
        assert both == solo
        cache = eng.core.runner.encoder_cache
        assert not cache._by_request and not cache._refs
        stream = eng.generate_stream(prompts[0], long)
        next(stream)
        stream.close()  # aborts the request
        import time

        deadline = time.time() + 10
        while (cache._by_request or eng.core.requests) and time.time() < deadline:
            time.sleep(0.05)
        assert not cache._by_request and not cache._refs


def test_llava_hf_checkpoint_layout_loads(llava, tmp_path):
    """The same weights under the llava-hf checkpoints' names (vision_tower.vision_model.*) and
    under transformers 5's module names (model.vision_tower.*, model.language_model.*, lm_head)
    load to the same model as the layout transformers 5.24 writes."""
    import shutil

    from safetensors.torch import load_file, save_file

    tensors = load_file(str(llava / "model.safetensors"))
    assert any(n.startswith("vision_tower.embeddings.") for n in tensors)   # what 5.24 writes

    def llava_hf(name: str) -> str:
        return "vision_tower.vision_model." + name[len("vision_tower."):] if name.startswith("vision_tower.") else name

    def v5_modules(name: str) -> str:
        for old, new in (("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector."),
                         ("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head.")):
            if name.startswith(old):
                return new + name[len(old):]
        return name

    img = _image(64, 48, seed=5)
    outs = []
    for k, rename in enumerate((None, llava_hf, v5_modules)):
        path = llava
        if rename is not None:
            path = tmp_path / f"layout{k}"
            shutil.copytree(llava, path)
            save_file({rename(n): t for n, t in tensors.items()}, str(path / "model.safetensors"), metadata={"format": "pt"})
        with Engine(str(path), dtype="f32", num_kv_blocks=64, max_model_len=256) as eng:
            ids = eng.tokenize("Describe <image> now.", add_special_tokens=False)
            outs.append(eng.generate({"prompt": ids, "images": [img]}, GREEDY)[0].outputs[0].token_ids)
    assert outs[0] == outs[1] == outs[2]


def test_native_decode_and_compile_serve_llava_decode_steps(llava):
    """Decode steps (no media) of a vision model go through the text model's fast paths: the native
    C++ decode loop in bf16 where it is eligible, and compile=True builds; tokens equal the eager path."""
    img = _image(50, 40, seed=21)
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outs = {}
    for label, kwargs, env in (("eager", {}, "0"), ("native", {}, "1"), ("compile", {"compile": True}, "0")):
        import os

        old = os.environ.get("MISTRALPY_NATIVE_DECODE")
        os.environ["MISTRALPY_NATIVE_DECODE"] = env
        try:
            with Engine(str(llava), dtype="f32", num_kv_blocks=64, max_model_len=256, **kwargs) as eng:
                ids = eng.tokenize("See <image> and", add_special_tokens=False)
                outs[label] = eng.generate({"prompt": ids, "images": [img]}, sp)[0].outputs[0].token_ids
                if label == "native":
                    outs["native_used"] = eng.core.runner.native is not None
        finally:
            if old is None:
                os.environ.pop("MISTRALPY_NATIVE_DECODE", None)
            else:
                os.environ["MISTRALPY_NATIVE_DECODE"] = old
    assert outs["eager"] == outs["compile"]
    if outs["native_used"]:
        assert outs["eager"] == outs["native"]
