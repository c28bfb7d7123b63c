"""Loading: sharded safetensors, dtype choice, architecture detection/override, clear errors, memory."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from fixtures_models import build_checkpoint, load_hf
from mistralpy import Engine, ModelLoadError, SamplingParams, UnsupportedArchitectureError
from mistralpy.config import resolve_dtype

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def test_sharded_checkpoint_with_index(tmp_path, tokenizer_dir):
    path = build_checkpoint(tmp_path / "sharded", "qwen3", tokenizer_dir, max_shard_size="200KB")
    assert len(list(path.glob("*.safetensors"))) > 1 and (path / "model.safetensors.index.json").exists()
    hf = load_hf(path)
    eng = Engine(str(path), dtype="f32", num_kv_blocks=16)
    try:
        ids = [5, 6, 7, 8, 9]
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, 5:].tolist()
        assert eng.generate(ids, GREEDY)[0].outputs[0].token_ids == ref
    finally:
        eng.shutdown()



def test_auto_dtype_never_f16_on_cpu():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu, "float16") != torch.float16
    assert resolve_dtype("auto", cpu, "float32") == torch.float32
    assert resolve_dtype("f16", cpu, None) == torch.float16  # explicit is honoured
    assert resolve_dtype("bf16", cpu, None) == torch.bfloat16


def test_auto_dtype_of_a_bf16_checkpoint_follows_the_dense_kernel():
    """bf16 where the dense kernel has a SIMD path (AVX512-BF16 or AVX2) or bf16 is native, else f32;
    an f32 checkpoint stays f32."""
    from mistralpy.config import cpu_supports_bf16
    from mistralpy.engine.builder import resolve_checkpoint_dtype
    from mistralpy.layers import dense_cpu

    cpu = torch.device("cpu")
    fast = dense_cpu.available() or cpu_supports_bf16()
    for ckpt in ("bfloat16", "float16"):
        assert resolve_checkpoint_dtype("auto", cpu, ckpt) == (torch.bfloat16 if fast else torch.float32)
    assert resolve_checkpoint_dtype("auto", cpu, "float32") == torch.float32
    assert resolve_checkpoint_dtype("f32", cpu, "bfloat16") == torch.float32


def test_bf16_engine_follows_transformers_bf16(tmp_path, tokenizer_dir):
    path = build_checkpoint(tmp_path / "bf16", "llama", tokenizer_dir, dtype=torch.bfloat16)
    eng = Engine(str(path), dtype="bf16", num_kv_blocks=16)
    try:
        assert eng.model_config.dtype == torch.bfloat16
        assert next(eng.core.runner.model.parameters()).dtype == torch.bfloat16
        out = eng.generate([5, 6, 7, 8], GREEDY)[0].outputs[0].token_ids
        assert len(out) == 16
    finally:
        eng.shutdown()


def test_architecture_override_and_unsupported(tmp_path, tokenizer_dir):
    path = build_checkpoint(tmp_path / "arch", "llama", tokenizer_dir)
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["SomethingNewForCausalLM"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError, match="SomethingNewForCausalLM"):
        Engine(str(path), dtype="f32", num_kv_blocks=8)
    eng = Engine(str(path), dtype="f32", num_kv_blocks=8, arch="LlamaForCausalLM")
    try:
        assert eng.model_config.architecture == "LlamaForCausalLM"
    finally:
        eng.shutdown()


def test_missing_and_mismatched_weights_are_clear(tmp_path, tokenizer_dir):
    from safetensors.torch import load_file, save_file

    path = build_checkpoint(tmp_path / "broken", "llama", tokenizer_dir)
    weights = load_file(path / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, path / "model.safetensors")
    with pytest.raises(ModelLoadError, match="down_proj"):
        Engine(str(path), dtype="f32", num_kv_blocks=8)
    weights["model.layers.1.mlp.down_proj.weight"] = torch.zeros(3, 3)
    save_file(weights, path / "model.safetensors")
    with pytest.raises(ModelLoadError, match="shape"):
        Engine(str(path), dtype="f32", num_kv_blocks=8)
    with pytest.raises(ModelLoadError):
        Engine(str(tmp_path / "does-not-exist"))


def test_peak_memory_stays_near_model_size(tmp_path, tokenizer_dir):
    """Load an ~80 MB f32 checkpoint as bf16 in a fresh process. Peak anonymous memory (not the
    page cache of the memory-mapped file) grows by about the bf16 model: no f32 staging copy of the
    model, no second model."""
    path = build_checkpoint(tmp_path / "mem", "llama", tokenizer_dir, hidden_size=512, intermediate_size=2048,
                            num_attention_heads=8, num_key_value_heads=8, num_hidden_layers=4)
    file_mb = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20
    script = textwrap.dedent(f"""
        import threading, time, torch
        import mistralpy.engine.llm_engine  # import torch & friends before measuring
        def anon(): return int(open('/proc/self/status').read().split('RssAnon:')[1].split()[0]) / 1024
        base, peak, done = anon(), [0.0], threading.Event()
        def watch():
            while not done.is_set():
                peak[0] = max(peak[0], anon()); time.sleep(0.002)
        threading.Thread(target=watch, daemon=True).start()
        from mistralpy import Engine
        eng = Engine({str(path)!r}, dtype="bf16", num_kv_blocks=4)
        done.set(); time.sleep(0.01)
        print(peak[0] - base)
        eng.shutdown()
    """)
    grown = float(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                 check=True).stdout.strip().splitlines()[-1])
    bf16_mb = file_mb / 2
    # bf16 model + one f32 tensor in flight (the largest is 8 MB) + allocator and tokenizer slack
    assert grown < bf16_mb + 30, (grown, file_mb)
