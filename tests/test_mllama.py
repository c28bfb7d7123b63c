"""Mllama (Llama 3.2 Vision) on the paged engine against transformers (float32): top logprobs after the
prompt and every greedy step's logprob within 1e-4, tokens identical, with one and two images; the
image matters in decode steps (their cross-attention); alone, batched with text-only and other-image
requests, chunked prefill cutting before / after the image token, after a prefix-cache hit; preemption,
abort and a zero encoder-cache budget keep / release the encoder references; native and compiled
decode decline the model.

Prompts that start with ``<|image|>`` compare with transformers as it is; prompts with text before the
first image compare with transformers patched to zero those rows' cross-attention output as Meta's
reference does (fixtures_mllama.reference_row_masking; transformers 5.25 leaks it, #39379)."""
from __future__ import annotations

import contextlib
import time

import pytest
import torch
from fixtures_mllama import build_mllama, hf_inputs, reference_row_masking
from fixtures_vlm import random_image

from mistralpy import Engine, SamplingParams

N = 20
GREEDY = SamplingParams(temperature=0, max_tokens=N, ignore_eos=True, logprobs=True)
TOP = SamplingParams(temperature=0, max_tokens=1, top_logprobs=20)
IMAGES = {"wide": random_image(50, 30, seed=1), "tall": random_image(20, 70, seed=2),
          "big": random_image(90, 60, seed=3)}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer_dir):
    import transformers

    path = build_mllama(tmp_path_factory.mktemp("mllama"), tokenizer_dir)
    hf = transformers.MllamaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return path, hf


def _hf_reference(hf, path, ids: list[int], images: list, image_id: int, patched: bool
                  ) -> tuple[torch.Tensor, list[int], list[torch.Tensor]]:
    """(last prompt logits, N greedy tokens, their step log-softmaxes) from transformers."""
    inputs = hf_inputs(path, ids, images, image_id)
    with (reference_row_masking() if patched else contextlib.nullcontext()), torch.no_grad():
        logits = hf(**inputs).logits[0, -1]
        out = hf.generate(**inputs, max_new_tokens=N, min_new_tokens=N, do_sample=False, eos_token_id=None,
                          pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    return logits, out.sequences[0, len(ids):].tolist(), [torch.log_softmax(s[0].double(), -1) for s in out.scores]


@pytest.mark.parametrize("prompt,names,patched", [
    ("<|image|>describe this picture please", ["wide"], False),
    ("<|image|>look <|image|> and compare the two", ["wide", "big"], False),
    ("User: what is in <|image|> here and <|image|> there?", ["tall", "big"], True),
    ("<|image|><|image|>both of them", ["big", "tall"], False),   # adjacent: both seen to the end
])
def test_logits_and_greedy_match_transformers(ckpt, prompt, names, patched):
    path, hf = ckpt
    images = [IMAGES[n] for n in names]
    with Engine(str(path), dtype="f32", num_kv_blocks=64, max_model_len=512) as eng:
        image_id = eng.tokenizer.token_to_id("<|image|>")
        p = {"prompt": prompt, "images": images}
        req = eng._prepare(p, GREEDY)[1][0]
        assert [it.placeholder.offset for it in req.mm_items] == \
            [i for i, t in enumerate(req.prompt_token_ids) if t == image_id]
        logits, hf_tokens, hf_logprobs = _hf_reference(hf, path, req.prompt_token_ids, images, image_id, patched)
        ref = torch.log_softmax(logits.double(), -1)
        top = eng.generate(p, TOP)[0].outputs[0].logprobs[0]
        assert len(top.top_logprobs) == 20
        assert max(abs(t.logprob - ref[t.token_id].item()) for t in top.top_logprobs) < 1e-4
        ours = eng.generate(p, GREEDY)[0].outputs[0]
        assert ours.token_ids == hf_tokens
        diffs = [abs(e.logprob - lp[t].item()) for e, lp, t in zip(ours.logprobs, hf_logprobs, hf_tokens)]
        assert max(diffs) < 1e-4, diffs


def test_decode_steps_attend_to_the_image(ckpt):
    """Decode rows see the image through the cross layers: dropping the media from decode steps
    changes the continuation (so the parity above covers decode-time cross-attention)."""
    path, _ = ckpt
    p = {"prompt": "<|image|>describe this picture please", "images": [IMAGES["big"]]}
    with Engine(str(path), dtype="f32", num_kv_blocks=64, max_model_len=512) as eng:
        runner = eng.core.runner
        assert runner.native is None and runner.enable_compile() is False
        full = eng.generate(p, GREEDY)[0].outputs[0].token_ids
        orig = runner._cross_media

        def prefill_only(sched, batch):
            cross = orig(sched, batch)
            if batch.is_decode_only:
                cross.media = [[] for _ in cross.media]
            return cross

        runner._cross_media = prefill_only
        assert eng.generate(p, GREEDY)[0].outputs[0].token_ids != full


def test_batched_chunked_and_prefix_cached(ckpt):
    """A mixed batch (one image, text only, two images, an image after a long text) with a 5-token
    step budget (chunks ending just before and just after image tokens) gives each request its solo
    tokens, the first equal to transformers'; the same request again hits the prefix cache with the
    same tokens, and the same text with another image does not reuse the image's blocks."""
    path, hf = ckpt
    a, b, c = IMAGES["wide"], IMAGES["tall"], IMAGES["big"]
    prompts = [{"prompt": "<|image|>what is it? Say more about it.", "images": [a]},
               "plain text prompt with no image at all",
               {"prompt": "x y z w <|image|> then <|image|> ok", "images": [b, c]},
               {"prompt": "a b c d e f g h <|image|> and so on", "images": [c]}]
    with Engine(str(path), dtype="f32", num_kv_blocks=256, block_size=4, max_model_len=512,
                max_num_batched_tokens=5) as eng:
        image_id = eng.tokenizer.token_to_id("<|image|>")
        starts = [[it.placeholder.offset for it in eng._prepare(p, GREEDY)[1][0].mm_items]
                  for p in prompts if isinstance(p, dict)]
        assert any(s % 5 == 0 for ss in starts for s in ss) and any(s % 5 == 4 for ss in starts for s in ss)
        solo = [eng.generate(p, GREEDY)[0].outputs[0].token_ids for p in prompts]
        ids = eng._prepare(prompts[0], GREEDY)[1][0].prompt_token_ids
        assert solo[0] == _hf_reference(hf, path, ids, [a], image_id, False)[1]
        cache = eng.core.runner.encoder_cache
        hits = cache.hits
        batched = [r.outputs[0].token_ids for r in eng.generate(prompts, GREEDY)]
        assert batched == solo
        assert cache.hits > hits
        cache.budget_rows = 0   # the image's rows are gone: the prefix hit skips its token, the hook re-encodes
        cache.release("nobody")
        assert cache.rows == 0
        again = eng.generate(prompts[3], GREEDY)[0]
        assert again.outputs[0].token_ids == solo[3] and again.num_cached_tokens > starts[2][0]
        other = eng.generate({"prompt": prompts[3]["prompt"], "images": [a]}, GREEDY)[0]
        n_text = starts[2][0]   # blocks before the image token's are shared, not the rest
        assert other.num_cached_tokens <= n_text and other.outputs[0].token_ids != solo[3]


def test_preemption_abort_and_eviction_keep_running_requests_whole(ckpt):
    """Two image requests in a KV pool too small for both, with an encoder cache budget of zero rows:
    the running requests' entries are never evicted (both give their solo tokens across preemption
    and recompute); finished and aborted requests leave no references, and then no entries."""
    path, _ = ckpt
    long = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    prompts = [{"prompt": "<|image|>tell me about this one please", "images": [im]}
               for im in (IMAGES["wide"], IMAGES["big"])]
    with Engine(str(path), dtype="f32", num_kv_blocks=7, block_size=8, max_model_len=56) as eng:
        cache, model = eng.core.runner.encoder_cache, eng.core.runner.model
        cache.budget_rows = 0
        calls = []
        encode = model.embed_multimodal
        model.embed_multimodal = lambda item: calls.append(item.hash) or encode(item)
        solo = [eng.generate(p, long)[0].outputs[0].token_ids for p in prompts]
        assert len(calls) == 2 and cache.rows == 0   # kept through all 40 decode steps, evicted after
        before = eng.core.scheduler.num_preemptions
        both = [r.outputs[0].token_ids for r in eng.generate(prompts, long)]
        assert eng.core.scheduler.num_preemptions > before
        assert both == solo
        assert not cache._by_request and not cache._refs and cache.rows == 0
        stream = eng.generate_stream(prompts[0], long)
        next(stream)
        assert cache.rows > 0
        stream.close()  # aborts the request
        deadline = time.time() + 10
        while (cache._by_request or eng.core.requests) and time.time() < deadline:
            time.sleep(0.05)
        assert not cache._by_request and not cache._refs and cache.rows == 0


def test_opt_out_of_native_and_compiled_decode_under_isq(ckpt):
    """bf16 + ISQ Q8_0: the text model (cross layers included) is quantized, the tower and projector
    stay float; native decode and compiled decode decline the model; generation runs."""
    from mistralpy.layers.linear import Linear
    from mistralpy.models.mllama import MllamaForConditionalGeneration
    from mistralpy.worker.compile import CompiledDecode
    from mistralpy.worker.native_decode import NativeDecode

    path, _ = ckpt
    with Engine(str(path), dtype="bf16", isq="q8_0", num_kv_blocks=16, max_model_len=128) as eng:
        model = eng.core.runner.model
        assert isinstance(model, MllamaForConditionalGeneration) and model.cross_attention
        tower = [m for part in (model.vision_model, model.multi_modal_projector) for m in part.modules()
                 if isinstance(m, Linear)]
        assert tower and all(m.qkernel is None for m in tower)
        assert model.language_model.model.layers[1].cross_attn.kv_proj.qkernel is not None
        assert NativeDecode.install(model) is None
        with pytest.raises(ValueError):
            CompiledDecode(model, 128)
        out = eng.generate({"prompt": "<|image|>hi", "images": [IMAGES["wide"]]}, GREEDY)[0].outputs[0]
        assert len(out.token_ids) == N


def test_transformers5_module_names_load(ckpt, tmp_path):
    """The same weights under transformers 5's module names (model.vision_model.*, model.language_model.*,
    model.multi_modal_projector.*, lm_head.*) give the same tokens as the saved layout."""
    import shutil

    from safetensors.torch import load_file, save_file

    path, _ = ckpt
    renamed = tmp_path / "renamed"
    shutil.copytree(path, renamed)
    tensors = load_file(str(path / "model.safetensors"))

    def new_name(k: str) -> str:
        if k.startswith("language_model.model."):
            return "model.language_model." + k[len("language_model.model."):]
        if k.startswith("language_model.lm_head."):
            return k[len("language_model."):]
        return "model." + k

    save_file({new_name(k): v for k, v in tensors.items()}, str(renamed / "model.safetensors"))
    p = {"prompt": "<|image|>name it", "images": [IMAGES["tall"]]}
    tokens = []
    for folder in (path, renamed):
        with Engine(str(folder), dtype="f32", num_kv_blocks=16, max_model_len=128) as eng:
            tokens.append(eng.generate(p, GREEDY)[0].outputs[0].token_ids)
    assert tokens[0] == tokens[1]
