"""Gemma 1 / 2 / 3 beyond the common parity suite (tests/test_models_parity.py runs the `gemma`,
`gemma2` and `gemma3` VARIANTS against transformers): soft-capping that actually bites, older
Gemma 3 config spellings, the text part of Gemma3ForConditionalGeneration under both checkpoint
layouts, batch / chunked-prefill / prefix-cache invariance with local layers, and ISQ.

Every prompt is longer than the sliding window (8), so local and global layers differ.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from fixtures_models import BASE, VARIANTS, all_logits, build_checkpoint, load_hf
from mistralpy import Engine, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
PROMPT_LEN = 40


def _prompts(lengths, seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 4096, (n,), generator=g).tolist() for n in lengths]


def _tokens(results) -> list[list[int]]:
    return [r.outputs[0].token_ids for r in results]


def _edit_weights(path: Path, edit) -> None:
    """Rewrite model.safetensors through edit(dict of tensors) -> dict of tensors."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(path / "model.safetensors"))
    save_file(edit(state), str(path / "model.safetensors"), metadata={"format": "pt"})


def _sharp_gemma2(out: Path, tokenizer_dir: Path) -> Path:
    """Gemma 2 with q and k weights x10 (scores x100) and an attention cap of 1.0: with random init
    the scores stay far below any cap, which then never acts (test_softcap_and_window_are_exercised)."""
    path = build_checkpoint(out, "gemma2", tokenizer_dir, attn_logit_softcapping=1.0)
    _edit_weights(path, lambda s: {k: v * 10 if (".q_proj." in k or ".k_proj." in k) else v for k, v in s.items()})
    return path


def _old_config_gemma3(out: Path, tokenizer_dir: Path) -> Path:
    """The `gemma3` variant with its config.json in the pre-transformers-5 spelling (rope_theta,
    rope_local_base_freq, rope_scaling for global layers, sliding_window_pattern instead of
    layer_types), as published hub checkpoints have it."""
    path = build_checkpoint(out, "gemma3", tokenizer_dir)
    cfg = json.loads((path / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg.pop("layer_types")
    cfg.update(rope_theta=rope["full_attention"]["rope_theta"], rope_local_base_freq=rope["sliding_attention"]["rope_theta"],
               rope_scaling={"rope_type": "linear", "factor": rope["full_attention"]["factor"]},
               sliding_window_pattern=2)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


# A text_config as sparse as the published gemma-3-4b/12b/27b ones: everything else (8 heads of 256,
# 4 kv heads, windows on five layers in six, rope bases 1e6 / 1e4, ...) is transformers' default.
SPARSE_TEXT_CONFIG = dict(model_type="gemma3_text", vocab_size=4096, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=6, sliding_window=8, rope_scaling={"rope_type": "linear", "factor": 8.0},
                          eos_token_id=2, pad_token_id=0, bos_token_id=None)


def _multimodal_gemma3(out: Path, tokenizer_dir: Path, new_names: bool = False, sparse: bool = False) -> Path:
    """A Gemma3ForConditionalGeneration (tiny SigLIP tower) whose text part is the `gemma3` variant
    (or SPARSE_TEXT_CONFIG, written back as sparse as it was given). transformers saves
    `language_model.model.*`; new_names renames to `model.language_model.*`."""
    import transformers

    _, extra = VARIANTS["gemma3"]
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=32, patch_size=8)
    text = dict(SPARSE_TEXT_CONFIG) if sparse else {**BASE, **extra}
    cfg = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out)
    for f in Path(tokenizer_dir).iterdir():
        shutil.copy(f, out / f.name)
    if sparse:
        saved = json.loads((out / "config.json").read_text())
        (out / "config.json").write_text(json.dumps({**saved, "text_config": SPARSE_TEXT_CONFIG}))
    if new_names:
        def rename(state):
            prefix = "language_model.model."
            return {("model.language_model." + k[len(prefix):] if k.startswith(prefix) else "model." + k): v
                    for k, v in state.items()}
        _edit_weights(out, rename)
    return out


_BUILDERS = {
    "gemma2_sharp": _sharp_gemma2,
    "gemma3_old_config": _old_config_gemma3,
    "gemma3_mm": _multimodal_gemma3,
    "gemma3_mm_new_names": lambda out, tok: _multimodal_gemma3(out, tok, new_names=True),
    "gemma3_mm_sparse_config": lambda out, tok: _multimodal_gemma3(out, tok, sparse=True),
}


def _load_hf(path: Path):
    import transformers

    if json.loads((path / "config.json").read_text())["architectures"][0] == "Gemma3ForConditionalGeneration":
        return transformers.AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    return load_hf(path)


@pytest.fixture(scope="module", params=sorted(_BUILDERS))
def extra_variant(request, tmp_path_factory, tokenizer_dir):
    path = _BUILDERS[request.param](tmp_path_factory.mktemp(request.param), tokenizer_dir)
    with Engine(str(path), dtype="f32", num_kv_blocks=64, max_model_len=512) as engine:
        yield request.param, path, engine, _load_hf(path)


def test_logits_and_greedy_match_transformers(extra_variant):
    name, _, engine, hf = extra_variant
    ids = _prompts([PROMPT_LEN])[0]
    ours = all_logits(engine, ids)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert (ours - ref).abs().max().item() < 2e-4, name  # measured: 0 to 4e-6
    prompt = _prompts([24], seed=1)[0]
    out = engine.generate(prompt, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))[0].outputs[0]
    with torch.no_grad():
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert out.token_ids == want, name


def test_softcap_and_window_are_exercised(tmp_path, tokenizer_dir):
    """The sharp Gemma 2's attention cap changes transformers' logits by far more than our tolerance,
    and so does the window: the parity tests above could not pass with either one ignored."""
    path = _sharp_gemma2(tmp_path / "sharp", tokenizer_dir)
    ids = torch.tensor([_prompts([PROMPT_LEN])[0]])
    hf = load_hf(path)
    with torch.no_grad():
        ref = hf(ids).logits[0]
        for layer in hf.model.layers:
            layer.self_attn.attn_logit_softcapping = None
        uncapped = hf(ids).logits[0]
        for layer in hf.model.layers:
            layer.self_attn.attn_logit_softcapping = 1.0
            layer.self_attn.sliding_window = None
        hf.config.layer_types = ["full_attention"] * len(hf.model.layers)
        unwindowed = hf(ids).logits[0]
    assert (ref - uncapped).abs().max().item() > 1e-2
    assert (ref - unwindowed).abs().max().item() > 1e-2


def test_old_config_spelling_gives_the_new_configs_logits(tmp_path, tokenizer_dir):
    new = build_checkpoint(tmp_path / "new", "gemma3", tokenizer_dir)
    old = _old_config_gemma3(tmp_path / "old", tokenizer_dir)
    ids = _prompts([PROMPT_LEN])[0]
    with Engine(str(new), dtype="f32", num_kv_blocks=32) as a, Engine(str(old), dtype="f32", num_kv_blocks=32) as b:
        assert torch.equal(all_logits(a, ids), all_logits(b, ids))
        layers = b.core.runner.model.model.layers
        assert [layer.self_attn.spec.sliding_window for layer in layers] == [8, None]
        assert layers[0].self_attn.rotary_emb is not layers[1].self_attn.rotary_emb


@pytest.fixture(scope="module", params=["gemma", "gemma2", "gemma3"])
def engine_ckpt(request, tmp_path_factory, tokenizer_dir):
    path = build_checkpoint(tmp_path_factory.mktemp(request.param), request.param, tokenizer_dir)
    with Engine(str(path), dtype="f32", num_kv_blocks=256, max_model_len=512) as engine:
        yield path, engine


def test_same_tokens_alone_and_in_mixed_batch(engine_ckpt):
    _, engine = engine_ckpt
    prompts = _prompts([5, 37, 64, 3, 100, 18])
    alone = [_tokens(engine.generate(p, GREEDY))[0] for p in prompts]
    assert _tokens(engine.generate(prompts, GREEDY)) == alone


def test_chunked_prefill_and_preemption_give_same_tokens(engine_ckpt):
    path, engine = engine_ckpt
    prompts = _prompts([90, 70, 45, 120], seed=3)
    reference = _tokens(engine.generate(prompts, GREEDY))
    # A 16-token budget chunks every prompt (chunks cross the window); 24 blocks force preemption.
    with Engine(str(path), dtype="f32", num_kv_blocks=24, max_num_batched_tokens=16, max_model_len=512,
                enable_prefix_caching=False) as small:
        got = _tokens(small.generate(prompts, GREEDY))
        assert small.core.scheduler.num_preemptions > 0
    assert got == reference


def test_prefix_cache_hit_same_tokens(engine_ckpt):
    path, engine = engine_ckpt
    system = _prompts([64], seed=5)[0]
    a, b = system + [11, 12, 13], system + [21, 22]
    first = engine.generate(a, GREEDY)[0]
    hits_before = engine.core.kv.pool.prefix_hits
    second = engine.generate(b, GREEDY)[0]
    assert engine.core.kv.pool.prefix_hits - hits_before == 4  # 64 shared tokens = 4 full blocks
    assert second.num_cached_tokens == 64
    with Engine(str(path), dtype="f32", num_kv_blocks=64, enable_prefix_caching=False) as fresh:
        assert _tokens(fresh.generate([a, b], GREEDY)) == [first.outputs[0].token_ids, second.outputs[0].token_ids]


@pytest.mark.parametrize("variant", ["gemma", "gemma2", "gemma3"])
def test_isq_q8_0_matches_transformers_on_rounded_weights(tmp_path, tokenizer_dir, variant):
    """ISQ Q8_0 of every decoder linear layer (the tied head stays float) gives transformers' logits
    on the same weights rounded through gguf's Q8_0 (measured: bitwise equal), and stays near the
    float model: measured max |diff| 0.0008 (Gemma), 0.012 (Gemma 2), 0.019 (Gemma 3) on logits of
    scale 1.6 / 0.6 / 0.8 (the post-attention norms of Gemma 2/3 rescale the small, relatively
    noisier attention outputs to unit size)."""
    import gguf

    path = build_checkpoint(tmp_path / variant, variant, tokenizer_dir)
    ids = _prompts([PROMPT_LEN])[0]
    with Engine(str(path), dtype="f32", num_kv_blocks=32) as ref_engine:
        float_logits = all_logits(ref_engine, ids)
    with Engine(str(path), dtype="f32", num_kv_blocks=32, isq="Q8_0") as engine:
        assert engine.core.runner.model.model.layers[0].mlp.down_proj.qkernel is not None
        ours = all_logits(engine, ids)
    hf = load_hf(path)
    q8 = gguf.GGMLQuantizationType.Q8_0
    with torch.no_grad():
        for name, module in hf.named_modules():
            if isinstance(module, torch.nn.Linear) and name.startswith("model.layers."):
                rounded = gguf.quants.dequantize(gguf.quants.quantize(module.weight.numpy(), q8), q8)
                module.weight.copy_(torch.from_numpy(rounded))
        ref = hf(torch.tensor([ids])).logits[0]
    assert (ours - ref).abs().max().item() < 2e-4
    err = (ours - float_logits).abs().max().item()
    assert 0 < err < 0.05 * float_logits.abs().max().item(), f"{variant}: {err}"
    assert (ours.argmax(-1) == float_logits.argmax(-1)).float().mean().item() >= 0.9


@pytest.mark.slow
def test_compiled_decode_matches_eager_gemma2(tmp_path, tokenizer_dir):
    """torch.compile'd decode (worker/compile.py) through soft-capped attention and both kinds of
    layer (two graphs per layer kind) gives eager's greedy tokens. ~20-30 s of compiling."""
    path = build_checkpoint(tmp_path / "gemma2", "gemma2", tokenizer_dir)
    prompts = _prompts([40, 17, 5, 90], seed=7)
    with Engine(str(path), dtype="f32", num_kv_blocks=64, max_model_len=256) as eager:
        alone = _tokens(eager.generate(prompts[0], GREEDY))[0]
        batch = _tokens(eager.generate(prompts, GREEDY))
    with Engine(str(path), dtype="f32", num_kv_blocks=64, max_model_len=256, compile=True) as compiled:
        assert _tokens(compiled.generate(prompts[0], GREEDY))[0] == alone
        assert _tokens(compiled.generate(prompts, GREEDY)) == batch
        assert compiled.core.runner.compiled._graphs == {False, True}
        assert compiled.core.runner.model.model.decode_layers is compiled.core.runner.compiled
