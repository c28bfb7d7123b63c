"""Llama 4 on the paged engine against transformers (float32).

Text (``Llama4ForCausalLM``, tests/fixtures_llama4.py): MoE / dense interleave, a NoPE layer with
temperature tuning, chunked attention of 16 tokens on the RoPE layers; prompts span 2-6 chunks, so
prefill chunks, decode rows and the prefix cache all cross chunk boundaries. VLM
(``Llama4ForConditionalGeneration``): an image of 4 tiles + the global one; alone, batched with a
text-only request, with a 7-token prefill budget cutting through the image run, a prefix-cache hit,
and the tower kept float under ISQ.
"""
from __future__ import annotations

import shutil

import pytest
import torch
from fixtures_llama4 import build_llama4_text, build_llama4_vlm, hf_llama4_processor
from fixtures_models import all_logits
from fixtures_vlm import random_image
from test_models_moe import ExpertUse

from mistralpy import Engine, SamplingParams
from mistralpy.attention import cpu_paged
from mistralpy.attention.backend import AttentionSpec
from mistralpy.attention.torch_ref import TorchRefBackend, _prefill_mask, _traced_decode
from mistralpy.layers.linear import Linear

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
LOGPROBS = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=True)
TOL = 1e-4
CHUNK = 16


def _prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 4096, (n,), generator=g).tolist() for n in lengths]


def _tokens(results) -> list[list[int]]:
    return [r.outputs[0].token_ids for r in results]


def _hf_generate(hf, ids: list[int], n: int, **kwargs) -> tuple[list[int], list[torch.Tensor]]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          eos_token_id=None, pad_token_id=0, output_scores=True, return_dict_in_generate=True,
                          **kwargs)
    return out.sequences[0, len(ids):].tolist(), [torch.log_softmax(s[0].double(), -1) for s in out.scores]


def _assert_same(ours, tokens: list[int], logprobs: list[torch.Tensor]) -> None:
    """Same greedy tokens, and every step's chosen-token logprob within TOL (decode rows included)."""
    assert ours.token_ids == tokens
    diffs = [abs(e.logprob - lp[t].item()) for e, lp, t in zip(ours.logprobs, logprobs, tokens)]
    assert max(diffs) < TOL, diffs


# ------------------------------------------------------------------------------ chunked attention
@pytest.mark.parametrize("chunk", [16, 24], ids=["whole_blocks", "part_blocks"])
def test_chunked_attention_masks_and_decode_paths(monkeypatch, chunk):
    """A query at p sees keys p // C * C .. p: the prefill mask by brute force; decode rows (eager,
    through the C++ op when chunks are whole 16-token blocks, else torch's; and the traced form
    worker/compile.py uses) against a float64 oracle over that span."""
    from test_paged_attention_cpu import _case, _clone_caches, _md

    for q_len, seq_len in ((40, 40), (7, 40), (1, 17), (16, 32)):
        got = _prefill_mask(q_len, seq_len, None, torch.device("cpu"), chunk)
        want = torch.tensor([[q // chunk * chunk <= k <= q for k in range(seq_len)]
                             for q in range(seq_len - q_len, seq_len)])
        assert torch.equal(got, want)
    calls = []
    real = cpu_paged.decode
    monkeypatch.setattr(cpu_paged, "decode", lambda *a: calls.append(1) or real(*a))
    c = _case(5, [1, 16, 17, 33, 48, 50, 70], hk=2, group=2, d=32, dtype=torch.float32, cache_dtype=torch.float32)
    spec = AttentionSpec(scale=32 ** -0.5, attention_chunk_size=chunk)
    outs = []
    for traced in (False, True):
        kc, vc = _clone_caches(c)
        if traced:
            outs.append(_traced_decode(c["q"], c["k"], c["v"], kc, vc, _md(c), spec))
        else:
            outs.append(TorchRefBackend().forward(c["q"], c["k"], c["v"], kc, vc, _md(c), spec))
    assert len(calls) == (1 if chunk % 16 == 0 and cpu_paged.available() else 0)
    for i, n in enumerate(c["lens"].tolist()):
        lo = (n - 1) // chunk * chunk
        keys = kc[c["table"][i]].reshape(-1, 2, 32)[lo:n].double().repeat_interleave(2, 1)   # [L, Hq, D]
        vals = vc[c["table"][i]].reshape(-1, 2, 32)[lo:n].double().repeat_interleave(2, 1)
        probs = torch.softmax(torch.einsum("hd,lhd->hl", c["q"][i].double(), keys) * spec.scale, -1)
        want = torch.einsum("hl,lhd->hd", probs, vals)
        for out in outs:
            assert (out[i].double() - want).abs().max().item() < 1e-5, (i, n)


# ------------------------------------------------------------------------------------------- text
@pytest.fixture(scope="module")
def text(tmp_path_factory, tokenizer_dir):
    import transformers

    path = build_llama4_text(tmp_path_factory.mktemp("llama4_text"), tokenizer_dir)
    hf = transformers.Llama4ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with Engine(str(path), dtype="f32", num_kv_blocks=96, max_model_len=512) as eng:
        yield path, eng, hf


def test_text_logits_every_position_and_every_expert(text):
    _, eng, hf = text
    ids = _prompts([3 * CHUNK + 5])[0]
    with ExpertUse(eng.core.runner.model) as use:
        ours = all_logits(eng, ids)
    use.assert_all_used()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert (ours - ref).abs().max().item() < TOL


def test_text_greedy_24_tokens_match_transformers(text):
    _, eng, hf = text
    ids = _prompts([2 * CHUNK + 7], seed=1)[0]   # prompt + output cross 3 chunk boundaries
    tokens, logprobs = _hf_generate(hf, ids, 24)
    _assert_same(eng.generate(ids, LOGPROBS)[0].outputs[0], tokens, logprobs)


def test_text_batched_chunked_prefill_and_prefix_cache(text):
    path, eng, _ = text
    prompts = _prompts([5, 2 * CHUNK + 3, 70, CHUNK, 100], seed=2)
    alone = [_tokens(eng.generate(p, GREEDY))[0] for p in prompts]
    assert _tokens(eng.generate(prompts, GREEDY)) == alone
    with Engine(str(path), dtype="f32", num_kv_blocks=96, max_model_len=512, max_num_batched_tokens=7) as small:
        assert _tokens(small.generate(prompts, GREEDY)) == alone
        hit = small.generate(prompts[4][:64] + [7, 8, 9], GREEDY)[0]   # 64 cached: 4 chunks of 16
        assert hit.num_cached_tokens > 0
    assert hit.outputs[0].token_ids == _tokens(eng.generate(prompts[4][:64] + [7, 8, 9], GREEDY))[0]


# -------------------------------------------------------------------------------------------- VLM
PROMPT = "Describe <|image|> briefly, then say more words here."


@pytest.fixture(scope="module")
def vlm(tmp_path_factory, tokenizer_dir):
    import transformers

    path = build_llama4_vlm(tmp_path_factory.mktemp("llama4_vlm"), tokenizer_dir)
    hf = transformers.Llama4ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    with hf_llama4_processor(path) as proc, \
            Engine(str(path), dtype="f32", num_kv_blocks=128, max_model_len=512) as eng:
        yield path, eng, hf, proc


def _hf_inputs(proc, text: str, image) -> tuple[list[int], torch.Tensor]:
    batch = proc(text=text, images=[image], return_tensors="pt")
    return batch["input_ids"][0].tolist(), batch["pixel_values"].float()


def test_vlm_logits_and_greedy_with_a_tiled_image(vlm):
    _, eng, hf, proc = vlm
    img = random_image(90, 70, seed=3)
    ids, pixels = _hf_inputs(proc, PROMPT, img)
    assert pixels.shape[0] == 5   # a 2x2 grid + the global tile
    prompt = eng.tokenize(PROMPT, add_special_tokens=False)
    assert eng._prepare({"prompt": prompt, "images": [img]}, GREEDY)[1][0].prompt_token_ids == ids
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0, -1]
        blind = hf(input_ids=torch.tensor([ids])).logits[0, -1]
    assert (ref - blind).abs().max().item() > 0.05   # the image moves the logits
    out = eng.generate({"prompt": prompt, "images": [img]},
                       SamplingParams(temperature=0, max_tokens=1, logprobs=True, top_logprobs=5))[0].outputs[0]
    ref_lp = torch.log_softmax(ref.double(), -1)
    assert len(out.logprobs[0].top_logprobs) == 5
    for t in out.logprobs[0].top_logprobs:
        assert abs(t.logprob - ref_lp[t.token_id].item()) < TOL
    tokens, logprobs = _hf_generate(hf, ids, LOGPROBS.max_tokens, pixel_values=pixels)
    _assert_same(eng.generate({"prompt": prompt, "images": [img]}, LOGPROBS)[0].outputs[0], tokens, logprobs)


def test_vlm_batched_chunked_and_prefix_cached(vlm):
    path, eng, hf, proc = vlm
    imgs = [random_image(80, 60, seed=7), random_image(130, 64, seed=8)]
    prompt = eng.tokenize(PROMPT, add_special_tokens=False)
    prompts = [{"prompt": prompt, "images": [imgs[0]]}, "plain text prompt with no image at all",
               {"prompt": prompt, "images": [imgs[1]]}]
    solo = [_tokens(eng.generate(p, GREEDY))[0] for p in prompts]
    ids, pixels = _hf_inputs(proc, PROMPT, imgs[0])
    assert solo[0] == _hf_generate(hf, ids, GREEDY.max_tokens, pixel_values=pixels)[0]
    assert _tokens(eng.generate(prompts, GREEDY)) == solo
    with Engine(str(path), dtype="f32", num_kv_blocks=128, max_model_len=512, max_num_batched_tokens=7) as small:
        assert _tokens(small.generate(prompts, GREEDY)) == solo
        again = small.generate(prompts[2], GREEDY)[0]
        assert again.outputs[0].token_ids == solo[2] and again.num_cached_tokens > 0


def test_vlm_tower_stays_float_under_isq_and_v5_names_load(vlm, tmp_path):
    """ISQ Q8_0 quantizes the text model (experts included) but not the tower or projector; the same
    weights under transformers 5's module names (model.vision_model.*, model.language_model.*,
    lm_head.*) give the float model's tokens."""
    from safetensors.torch import load_file, save_file

    path, eng, _, _ = vlm
    img = random_image(64, 48, seed=9)
    prompt = eng.tokenize(PROMPT, add_special_tokens=False)
    request = {"prompt": prompt, "images": [img]}
    base = _tokens(eng.generate(request, GREEDY))[0]
    with Engine(str(path), dtype="f32", num_kv_blocks=64, max_model_len=512, isq="Q8_0") as q:
        model = q.core.runner.model
        for name, m in model.named_modules():
            if isinstance(m, Linear):
                tower = name.startswith(("vision_model.", "multi_modal_projector."))
                assert (m.qkernel is None) == tower, name
        assert len(_tokens(q.generate(request, GREEDY))[0]) == GREEDY.max_tokens

    v5 = tmp_path / "v5"
    shutil.copytree(path, v5)
    renames = (("vision_model.", "model.vision_model."), ("multi_modal_projector.", "model.multi_modal_projector."),
               ("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."))

    def rename(n: str) -> str:
        return next((new + n[len(old):] for old, new in renames if n.startswith(old)), n)

    tensors = load_file(str(path / "model.safetensors"))
    save_file({rename(n): t for n, t in tensors.items()}, str(v5 / "model.safetensors"), metadata={"format": "pt"})
    with Engine(str(v5), dtype="f32", num_kv_blocks=64, max_model_len=512) as e5:
        assert _tokens(e5.generate(request, GREEDY))[0] == base
