"""Mixture-of-experts families (Mixtral, Qwen3-MoE, Phi-3.5-MoE) against transformers in float32.

Every test prompt routes tokens to every expert of every sparse layer (asserted through a hook on
the experts), so each expert's weights and their loading are exercised.
"""
from __future__ import annotations

import json
from typing import Self

import pytest
import torch
from fixtures_models import all_logits, build_checkpoint, load_hf
from safetensors.torch import save_file

from mistralpy import Engine, SamplingParams
from mistralpy.layers.linear import Linear
from mistralpy.layers.moe import FusedExperts, Router, topk_softmax_routing

MOE_VARIANTS = ["mixtral", "mixtral_swa", "qwen3_moe", "qwen3_moe_mixed", "phimoe"]
PROMPT_LEN = 40
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
# Measured max |ours - transformers| over 40 positions (logits span 0.7 .. 2.0): 6e-8 .. 4.8e-7.
LOGIT_TOL = 2e-4
# ISQ Q8_0 against our float model on the same prompt, at positions whose routing is unchanged;
# measured 0.0067 (mixtral), 0.0095 (qwen3_moe), 0.0086 (qwen3_moe_mixed), 0.015 (phimoe, span 2.0).
Q8_0_TOL = 0.03


def stable_positions(a: list[tuple[torch.Tensor, torch.Tensor]], b: list[tuple[torch.Tensor, torch.Tensor]],
                     n: int) -> torch.Tensor:
    """Positions routed to the same experts with weights within 0.02 in every layer of two runs.

    Routing is discrete (and sparsemixer's masks are thresholds), so quantization noise may
    flip an expert choice or a mask; logits are compared where it did not."""
    same = torch.ones(n, dtype=torch.bool)
    for (w1, i1), (w2, i2) in zip(a, b, strict=True):
        s1, o1 = i1.sort(-1)
        s2, o2 = i2.sort(-1)
        same &= (s1 == s2).all(-1) & ((w1.gather(-1, o1) - w2.gather(-1, o2)).abs() < 0.02).all(-1)
    return same


def _prompt(seed: int = 0, n: int = PROMPT_LEN) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 4096, (n,), generator=g).tolist()


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 4096, (n,), generator=g).tolist() for n in lengths]


def _tokens(results):
    return [r.outputs[0].token_ids for r in results]


class ExpertUse:
    """Counts the expert ids every FusedExperts of a model receives while active."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.blocks = {name: m for name, m in model.named_modules() if isinstance(m, FusedExperts)}
        self.counts = {name: torch.zeros(m.num_experts, dtype=torch.int64) for name, m in self.blocks.items()}
        self.routing: list[tuple[torch.Tensor, torch.Tensor]] = []  # (weights, ids) per call, in order
        self.handles = []

    def __enter__(self) -> Self:
        for name, m in self.blocks.items():
            def hook(module, args, output, name=name):
                self.counts[name] += torch.bincount(args[2].reshape(-1).cpu(), minlength=module.num_experts)
                self.routing.append((args[1].detach().cpu(), args[2].cpu()))
            self.handles.append(m.register_forward_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()

    def assert_all_used(self) -> None:
        assert self.blocks, "no expert blocks found"
        for name, counts in self.counts.items():
            assert (counts > 0).all(), f"{name}: expert counts {counts.tolist()}"


@pytest.fixture(scope="module", params=MOE_VARIANTS)
def variant(request, tmp_path_factory, tokenizer_dir):
    path = build_checkpoint(tmp_path_factory.mktemp(request.param), request.param, tokenizer_dir)
    engine = Engine(str(path), dtype="f32", num_kv_blocks=96, max_model_len=512)
    yield request.param, path, engine, load_hf(path)
    engine.shutdown()


def test_logits_match_transformers_with_every_expert_used(variant):
    name, _, engine, hf = variant
    ids = _prompt()
    with ExpertUse(engine.core.runner.model) as use:
        ours = all_logits(engine, ids)
    use.assert_all_used()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert (ours - ref).abs().max().item() < LOGIT_TOL, name


def test_greedy_32_tokens_match_transformers(variant):
    name, _, engine, hf = variant
    ids = _prompt(1, 24)
    out = engine.generate(ids, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))[0].outputs[0]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    assert out.token_ids == ref, name


def test_same_tokens_alone_and_in_mixed_batch(variant):
    _, _, engine, _ = variant
    prompts = _prompts([5, 37, 64, 3, 100, 18])
    alone = [_tokens(engine.generate(p, GREEDY))[0] for p in prompts]
    with ExpertUse(engine.core.runner.model) as use:
        batched = _tokens(engine.generate(prompts, GREEDY))
    use.assert_all_used()
    assert batched == alone


def test_chunked_prefill_and_preemption_give_same_tokens(variant):
    _, path, engine, _ = variant
    prompts = _prompts([90, 70, 45, 120], seed=3)
    reference = _tokens(engine.generate(prompts, GREEDY))
    small = Engine(str(path), dtype="f32", num_kv_blocks=24, max_num_batched_tokens=16, max_model_len=512,
                   enable_prefix_caching=False)
    try:
        got = _tokens(small.generate(prompts, GREEDY))
        assert small.core.scheduler.num_preemptions > 0
    finally:
        small.shutdown()
    assert got == reference


def test_prefix_cache_hit_same_tokens(variant):
    _, path, engine, _ = variant
    system = _prompts([64], seed=5)[0]
    a, b = system + [11, 12, 13], system + [21, 22]
    first = engine.generate(a, GREEDY)[0]
    second = engine.generate(b, GREEDY)[0]
    assert second.num_cached_tokens == 64
    fresh = Engine(str(path), dtype="f32", num_kv_blocks=64, max_model_len=512, enable_prefix_caching=False)
    try:
        assert _tokens(fresh.generate([a, b], GREEDY)) == [first.outputs[0].token_ids, second.outputs[0].token_ids]
    finally:
        fresh.shutdown()


def test_isq_q8_0_quantizes_every_expert_and_stays_close(variant):
    name, path, engine, _ = variant
    ids = _prompt()
    with ExpertUse(engine.core.runner.model) as float_use:
        base = all_logits(engine, ids)
    with Engine(str(path), dtype="f32", num_kv_blocks=64, max_model_len=512, isq="Q8_0") as q_engine:
        model = q_engine.core.runner.model
        linears = [m for m in model.modules() if isinstance(m, Linear)]
        assert all(m.qkernel is not None for m in linears)  # widths 32/64/128: Q8_0 everywhere
        experts = [m for m in model.modules() if isinstance(m, FusedExperts)]
        assert all(e.gate_up_proj.qkernel is not None for block in experts for e in block)
        routers = [m for m in model.modules() if isinstance(m, Router)]
        assert routers and all(r.weight is not None and r.weight.dtype == torch.float32 for r in routers)
        with ExpertUse(model) as use:
            logits = all_logits(q_engine, ids)
        use.assert_all_used()
    stable = stable_positions(float_use.routing, use.routing, len(ids))
    assert stable.float().mean().item() >= 0.9, f"{name}: routing changed at {(~stable).sum().item()} positions"
    err = (logits - base).abs().amax(-1)[stable].max().item()
    assert err < Q8_0_TOL, f"{name}: {err:.4f}"
    assert (logits.argmax(-1) == base.argmax(-1)).float().mean().item() >= 0.9


# --- loading layouts ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_fused_3d_expert_tensors_load(name, tmp_path, tokenizer_dir):
    """transformers 5's in-memory layout (experts.gate_up_proj [E, 2I, H], experts.down_proj
    [E, H, I], mlp.* names) loads to the same model as the per-expert checkpoint."""
    path = build_checkpoint(tmp_path / "std", name, tokenizer_dir)
    hf = load_hf(path)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") and v.dim() == 3 for k, v in state.items())
    fused = tmp_path / "fused"
    fused.mkdir()
    for f in path.iterdir():
        if f.name != "model.safetensors":
            (fused / f.name).write_bytes(f.read_bytes())
    save_file(state, str(fused / "model.safetensors"), metadata={"format": "pt"})
    ids = _prompt()
    with Engine(str(path), dtype="f32", num_kv_blocks=32, max_model_len=512) as a, \
            Engine(str(fused), dtype="f32", num_kv_blocks=32, max_model_len=512) as b:
        assert torch.equal(all_logits(a, ids), all_logits(b, ids))


def test_phimoe_transformers_names_load(tmp_path, tokenizer_dir):
    """Phi-MoE saved as in transformers' memory (mlp.router, fused experts) loads too."""
    path = build_checkpoint(tmp_path / "std", "phimoe", tokenizer_dir)
    hf = load_hf(path)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(".mlp.router." in k for k in state)
    fused = tmp_path / "fused"
    fused.mkdir()
    for f in path.iterdir():
        if f.name != "model.safetensors":
            (fused / f.name).write_bytes(f.read_bytes())
    save_file(state, str(fused / "model.safetensors"), metadata={"format": "pt"})
    ids = _prompt()
    with Engine(str(path), dtype="f32", num_kv_blocks=32, max_model_len=512) as a, \
            Engine(str(fused), dtype="f32", num_kv_blocks=32, max_model_len=512) as b:
        assert torch.equal(all_logits(a, ids), all_logits(b, ids))


# --- routing units -----------------------------------------------------------------------------


def test_sparsemixer_matches_transformers():
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    from mistralpy.models.phimoe import sparsemixer_routing

    g = torch.Generator().manual_seed(0)
    for scale, eps in ((0.2, 0.3), (3.0, 0.01), (1.0, 0.1)):
        scores = torch.randn(500, 16, generator=g) * scale
        scores[:10] = scores[:10].round()  # some ties
        ref_w, ref_ids = sparsemixer(scores, jitter_eps=eps, training=False)
        w, ids = sparsemixer_routing(scores, eps)
        assert torch.equal(ids, ref_ids)
        assert torch.allclose(w, ref_w, atol=1e-7)
        assert ((w > 0) & (w <= 1)).all()


def test_topk_softmax_routing():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    w, ids = topk_softmax_routing(logits, 2, renormalize=False)
    p = torch.softmax(logits, -1)
    assert ids.tolist() == [[1, 2]] and torch.allclose(w, p[:, [1, 2]])
    w, _ = topk_softmax_routing(logits, 2, renormalize=True)
    assert torch.allclose(w.sum(-1), torch.ones(1)) and w.dtype == torch.float32


def test_fused_experts_equal_a_per_token_loop():
    torch.manual_seed(0)
    experts = FusedExperts(6, 16, 8)
    for p in experts.parameters():
        p.data.normal_(0, 0.3)
    x = torch.randn(33, 16)
    w, ids = topk_softmax_routing(torch.randn(33, 6), 3, renormalize=True)
    ref = torch.stack([sum(w[t, s] * experts[int(ids[t, s])](x[t:t + 1])[0] for s in range(3)) for t in range(33)])
    assert torch.allclose(experts(x, w, ids), ref, atol=1e-6)
    assert experts.experts is experts and dict(experts.named_parameters()).keys() >= {"0.gate_up_proj.weight"}


def test_qwen3_moe_sparse_and_dense_layers(tmp_path, tokenizer_dir):
    from mistralpy.layers.moe import FusedExperts as FE
    from mistralpy.models.llama import LlamaMLP

    path = build_checkpoint(tmp_path / "q", "qwen3_moe", tokenizer_dir, num_hidden_layers=4, mlp_only_layers=[2],
                            decoder_sparse_step=1)
    with Engine(str(path), dtype="f32", num_kv_blocks=32, max_model_len=512) as engine:
        kinds = [type(layer.mlp.experts if hasattr(layer.mlp, "experts") else layer.mlp)
                 for layer in engine.core.runner.model.model.layers]
        assert kinds == [FE, FE, LlamaMLP, FE]
        ours = all_logits(engine, _prompt())
    with torch.no_grad():
        ref = load_hf(path)(torch.tensor([_prompt()])).logits[0]
    assert (ours - ref).abs().max().item() < LOGIT_TOL


def test_phimoe_long_context_uses_long_factors_and_mscale(tmp_path, tokenizer_dir):
    from fixtures_models import PHIMOE_ROPE

    path = build_checkpoint(tmp_path / "p", "phimoe", tokenizer_dir, max_position_embeddings=2048)
    assert json.loads((path / "config.json").read_text())["rope_parameters"]["original_max_position_embeddings"] == 512
    head_dim = 16
    base = 10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    for max_len, factors, mscale in ((512, "short_factor", "short_mscale"), (1024, "long_factor", "long_mscale")):
        with Engine(str(path), dtype="f32", num_kv_blocks=16, max_model_len=max_len) as engine:
            rope = engine.core.runner.model.model.layers[0].self_attn.rotary_emb
            assert rope.attention_scaling == pytest.approx(PHIMOE_ROPE[mscale])
            want = 1.0 / (torch.tensor(PHIMOE_ROPE[factors]) * base)
            assert torch.allclose(rope.inv_freq.cpu(), want)


def test_compiled_decode_gives_eager_tokens(tmp_path, tokenizer_dir):
    """worker/compile.py compiles whole decoder layers with fullgraph=True: the experts' data-dependent
    loop runs as one opaque op inside the graph (and the router's prepacked weight through the
    compiler's packed-linear op)."""
    path = build_checkpoint(tmp_path / "m", "mixtral", tokenizer_dir)
    prompts = _prompts([20, 7, 33], seed=9)
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    with Engine(str(path), dtype="f32", num_kv_blocks=64, max_model_len=512) as engine:
        eager = _tokens(engine.generate(prompts, sp)) + _tokens(engine.generate(prompts[0], sp))
    with Engine(str(path), dtype="f32", num_kv_blocks=64, max_model_len=512, compile=True) as engine:
        compiled = _tokens(engine.generate(prompts, sp)) + _tokens(engine.generate(prompts[0], sp))
        assert engine.core.runner.compiled.compile_seconds > 0
    assert compiled == eager
