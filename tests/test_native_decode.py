"""Native decode (worker/native_decode.py: all decoder layers of a decode step in one C++ op) gives
bitwise what the eager Python path gives.

The op makes the same kernel calls with the same arguments as the eager CPU path, so every decode
step's logits must be EQUAL (not close) to those of an engine with MISTRALPY_NATIVE_DECODE=0, and
so the greedy tokens: bf16 with dense pair-tiled weights and with ISQ Q4_0 / Q8_0 / Q4K (qmm
kernels), batches of 1, 3 and 16 sequences of mixed lengths, Qwen 2 (q/k/v biases), Qwen 3 (q/k
norms), Llama with o/MLP biases, and Mistral's sliding window decoded past the window.
"""
from __future__ import annotations

import pytest
import torch
from fixtures_models import build_checkpoint

from mistralpy import Engine, SamplingParams
from mistralpy.kernels import cpu as cpu_ext
from mistralpy.layers import dense_cpu
from mistralpy.quant.gguf.kernels_cpu import fast as qmm_fast

pytestmark = pytest.mark.skipif(not cpu_ext.load(), reason="CPU extension unavailable")

# multiples of 32 (qmm's blocks) everywhere; head_dim 32
SIZES = {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2}
# Q4_K blocks are 256 wide
SIZES_K = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 8, "num_key_value_heads": 2}
PROMPTS = [list(range(10 + 7 * i, 10 + 7 * i + n)) for i, n in enumerate(
    [40, 17, 5, 90, 3, 28, 61, 12, 9, 33, 70, 21, 14, 6, 47, 25])]


def _run(path, prompts, monkeypatch, native: bool, isq: str | None, max_tokens: int = 12, shrink_rope: bool = False):
    """(tokens per prompt, logits of every step keyed by step index, the native object or None, batch sizes it ran)."""
    monkeypatch.setenv("MISTRALPY_NATIVE_DECODE", "1" if native else "0")
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    with Engine(str(path), dtype="bf16", num_kv_blocks=256, max_model_len=512, isq=isq) as engine:
        runner = engine.core.runner
        steps: list[torch.Tensor] = []
        orig = runner.compute_logits

        def record(sched):
            logits = orig(sched)
            steps.append(logits.clone())
            return logits

        runner.compute_logits = record
        sizes: list[int] = []
        nat = runner.native
        if nat is not None:
            op = nat._op

            def counted(hidden, *args):
                sizes.append(hidden.shape[0])
                return op(hidden, *args)

            nat._op = counted
            if shrink_rope:  # positions past the tables: the native path must grow them first
                for rope in nat.ropes:
                    rope._build(4, rope._cos.device)
        out = engine.generate(prompts, sp)
        tokens = [r.outputs[0].token_ids for r in out]
    return tokens, steps, nat, sizes


def _check_equal(path, prompts, monkeypatch, isq=None, max_tokens=12, shrink_rope=False):
    tokens, steps, nat, sizes = _run(path, prompts, monkeypatch, True, isq, max_tokens, shrink_rope)
    ref_tokens, ref_steps, ref_nat, _ = _run(path, prompts, monkeypatch, False, isq, max_tokens)
    assert ref_nat is None
    assert nat is not None and nat.calls > 0 and nat.calls == len(sizes)
    assert len(steps) == len(ref_steps)
    for i, (a, b) in enumerate(zip(steps, ref_steps)):
        assert torch.equal(a, b), f"step {i}: logits differ by {(a - b).abs().max().item()}"
    assert tokens == ref_tokens
    return nat, sizes


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer_dir):
    made = {}

    def get(variant: str, sizes: dict = SIZES):
        key = (variant, tuple(sizes.items()))
        if key not in made:
            made[key] = build_checkpoint(tmp_path_factory.mktemp(variant), variant, tokenizer_dir, **sizes)
        return made[key]

    return get


@pytest.mark.parametrize("batch", [1, 3, 16])
def test_dense_bf16_matches_eager(checkpoints, monkeypatch, batch):
    if not dense_cpu.available():
        pytest.skip("dense bf16 kernel needs AVX512-BF16 or AVX2")
    nat, sizes = _check_equal(checkpoints("llama"), PROMPTS[:batch], monkeypatch)
    assert max(sizes) == batch  # the whole batch decoded natively at least once
    assert all(f == 0 for f in nat.args["formats"])  # every linear dense


@pytest.mark.parametrize("isq, sizes", [("Q4_0", SIZES), ("Q8_0", SIZES), ("Q4K", SIZES_K)])
@pytest.mark.parametrize("batch", [1, 3, 16])
def test_isq_matches_eager(checkpoints, monkeypatch, isq, sizes, batch):
    if not qmm_fast():
        pytest.skip("qmm kernels need a SIMD build (AVX512-VNNI or AVX2)")
    nat, ran = _check_equal(checkpoints("llama", sizes), PROMPTS[:batch], monkeypatch, isq=isq)
    assert max(ran) == batch
    assert all(f >= 4 for f in nat.args["formats"])  # every linear a qmm kernel


@pytest.mark.parametrize("variant, isq", [("qwen2", None), ("qwen2", "Q8_0"), ("qwen3", None), ("qwen3", "Q4_0"),
                                          ("llama_gqa4_headdim", "Q8_0"), ("llama_gqa4_headdim", None)])
def test_families_match_eager(checkpoints, monkeypatch, variant, isq):
    if not (dense_cpu.available() and qmm_fast()):
        pytest.skip("needs the SIMD dense and qmm kernels (AVX512 or AVX2)")
    sizes = dict(SIZES, head_dim=32) if variant == "qwen3" else SIZES
    if variant == "llama_gqa4_headdim":
        sizes = {"hidden_size": 128, "intermediate_size": 256}  # its own 8 heads of 32, o/MLP biases
    nat, _ = _check_equal(checkpoints(variant, sizes), PROMPTS[:3], monkeypatch, isq=isq)
    if variant == "qwen3":
        assert len(nat.args["norms"]) == 4 * nat.num_layers and nat.qk_norm  # q/k norms passed
    if variant in ("qwen2", "llama_gqa4_headdim"):
        assert nat.args["biases"][0] is not None  # qkv bias passed


def test_sliding_window_past_window(checkpoints, monkeypatch):
    if not dense_cpu.available():
        pytest.skip("dense bf16 kernel needs AVX512-BF16 or AVX2")
    path = checkpoints("mistral_swa", dict(SIZES, sliding_window=8))
    nat, _ = _check_equal(path, [PROMPTS[0], PROMPTS[4], PROMPTS[2]], monkeypatch, max_tokens=20)
    assert set(nat.args["windows"]) == {8}


def test_rope_tables_grown(checkpoints, monkeypatch):
    if not dense_cpu.available():
        pytest.skip("dense bf16 kernel needs AVX512-BF16 or AVX2")
    nat, _ = _check_equal(checkpoints("llama"), PROMPTS[:3], monkeypatch, shrink_rope=True)
    assert nat.rope.max_cached_position >= 40 + 12  # the longest sequence's last position fits


def test_not_eligible_keeps_python_path(checkpoints, monkeypatch):
    monkeypatch.setenv("MISTRALPY_NATIVE_DECODE", "1")
    path = checkpoints("phi2", {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4})
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    with Engine(str(path), dtype="bf16", num_kv_blocks=64, max_model_len=256) as engine:
        assert engine.core.runner.native is None
        assert "decode_layers" not in engine.core.runner.model.model.__dict__
        assert len(engine.generate(PROMPTS[0], sp)[0].outputs[0].token_ids) == 4


def test_disabled_by_env(checkpoints, monkeypatch):
    monkeypatch.setenv("MISTRALPY_NATIVE_DECODE", "0")
    with Engine(str(checkpoints("llama")), dtype="bf16", num_kv_blocks=64, max_model_len=256) as engine:
        assert engine.core.runner.native is None


def test_compile_leaves_an_eligible_model_native(checkpoints, monkeypatch):
    """compile=True does not compile what the (faster) native loop runs, and starts without a warm-up."""
    if not dense_cpu.available():
        pytest.skip("a dense bf16 model runs natively only on a SIMD dense kernel")
    monkeypatch.setenv("MISTRALPY_NATIVE_DECODE", "1")
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    with Engine(str(checkpoints("llama")), dtype="bf16", num_kv_blocks=64, max_model_len=256, compile=True) as engine:
        runner = engine.core.runner
        assert runner.native is not None and runner.compiled is None
        calls = runner.native.calls
        assert len(engine.generate(PROMPTS[0], sp)[0].outputs[0].token_ids) == 4
        assert runner.native.calls > calls


# ---- Gemma: (1 + w) norms, gelu-tanh, Gemma 2 / 3's four norms per layer, per-layer rope tables ----------

GEMMA_SIZES = dict(SIZES, head_dim=32)


@pytest.mark.parametrize("isq", [None, "Q4_0", "Q8_0"])
def test_gemma3_matches_eager(checkpoints, monkeypatch, isq):
    if not (dense_cpu.available() and qmm_fast()):
        pytest.skip("needs the SIMD dense and qmm kernels (AVX512 or AVX2)")
    # sliding window 8 with a local and a global layer (two rope tables), decoded past the window
    nat, ran = _check_equal(checkpoints("gemma3", GEMMA_SIZES), PROMPTS[:3], monkeypatch, isq=isq, max_tokens=16)
    assert max(ran) == 3
    assert nat.layout == 1 and nat.qk_norm and len(nat.ropes) == 2 and nat._rope_ids == [0, 1]
    assert set(nat.args["offsets"]) == {1.0}  # every norm (1 + w)
    assert nat.args["windows"] == [8, 0] and all(c == 0.0 for c in nat.args["softcaps"])
    assert all((f == 0) if isq is None else (f >= 4) for f in nat.args["formats"])


@pytest.mark.parametrize("variant", ["gemma", "gemma2"])
def test_gemma_1_2_match_eager(checkpoints, monkeypatch, variant):
    if not dense_cpu.available():
        pytest.skip("dense bf16 kernel needs AVX512-BF16 or AVX2")
    nat, _ = _check_equal(checkpoints(variant, GEMMA_SIZES), PROMPTS[:3], monkeypatch, max_tokens=16)
    assert nat.layout == (1 if variant == "gemma2" else 0) and not nat.qk_norm
    if variant == "gemma2":
        assert all(c > 0 for c in nat.args["softcaps"])  # attention logit soft-capping passed


@pytest.mark.parametrize("batch", [3, 130])
def test_int4_plane_kernels_match_eager(checkpoints, monkeypatch, batch):
    """ISQ Q6K held as int4 planes (as where the extension has no SIMD qmm): every linear an
    Int4PlaneKernel (aten's int4 product); a step of 128+ rows, where that kernel takes another
    product, stays eager."""
    if not qmm_fast():
        pytest.skip("qmm kernels need a SIMD build (AVX512-VNNI or AVX2)")
    from mistralpy.quant.gguf import kernels as gguf_kernels

    monkeypatch.setattr(gguf_kernels, "_cpu_ext_ok", lambda *a: False)
    prompts = [PROMPTS[i % 16][: 3 + i % 5] for i in range(batch)]
    nat, ran = _check_equal(checkpoints("llama", SIZES_K), prompts, monkeypatch, isq="Q6K", max_tokens=4)
    assert set(nat.args["formats"]) == {-1}
    assert max(ran) == batch if batch < 128 else max(ran) < 128


@pytest.mark.parametrize("variant", ["gemma3", "llama"])
def test_mixed_format_qkv_matches_eager(checkpoints, monkeypatch, variant):
    """v in Q8_0 beside Q4_0 q / k (as Q4_K_M files keep attn_v): qkv is a ConcatKernel, its parts'
    outputs concatenated in the op."""
    if not qmm_fast():
        pytest.skip("qmm kernels need a SIMD build (AVX512-VNNI or AVX2)")
    from gguf import GGMLQuantizationType as Q

    from mistralpy.layers.linear import ConcatKernel, MergedLinear

    orig = MergedLinear._load_weight

    def v_in_q8(self, param, loaded, shard=None):
        if len(self.shard_sizes) == 3 and shard == 2 and self.isq is not None:
            saved, self.isq = self.isq, Q.Q8_0
            try:
                return orig(self, param, loaded, shard)
            finally:
                self.isq = saved
        return orig(self, param, loaded, shard)

    monkeypatch.setattr(MergedLinear, "_load_weight", v_in_q8)
    sizes = GEMMA_SIZES if variant == "gemma3" else SIZES
    nat, ran = _check_equal(checkpoints(variant, sizes), PROMPTS[:3], monkeypatch, isq="Q4_0")
    assert max(ran) == 3
    assert nat.args["parts"][0::4] == [3] * nat.num_layers  # every qkv in three parts
    assert type(nat.inner.layers[0].self_attn.qkv_proj.qkernel) is ConcatKernel


def test_gemma3_270m_gguf_matches_eager(monkeypatch):
    """The real Gemma-3-270M Q4_K_M file (half its layers keep attn_v in Q8_0 beside Q5_0 q / k):
    a short chat prompt, 8 greedy tokens, every step's logits equal."""
    from assets import gemma3_270m_gguf_path

    if not qmm_fast():
        pytest.skip("qmm kernels need a SIMD build (AVX512-VNNI or AVX2)")
    path = gemma3_270m_gguf_path()
    # the base model's file has no chat template: Gemma's turn markup written out
    chat = "<start_of_turn>user\nName three colours.<end_of_turn>\n<start_of_turn>model\n"
    nat, ran = _check_equal(path, [chat], monkeypatch, max_tokens=8)
    assert len(ran) == 7  # every decode step after the prefill
    assert any(p > 1 for p in nat.args["parts"])  # some merged linears of mixed formats (Q5_0 q / k, Q8_0 v)
    assert 31 in nat.args["formats"]  # Q6_K down_proj: qmm's 6-bit format
