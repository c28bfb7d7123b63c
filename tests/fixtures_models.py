"""Tiny random checkpoints written by transformers (the oracle), one per architecture variant."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

BASE = dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=2, pad_token_id=0)

# name -> (architecture, config overrides)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {}),
    "llama_tied_mha": ("llama", dict(tie_word_embeddings=True, num_key_value_heads=4)),
    "llama_gqa4_headdim": ("llama", dict(num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                                         attention_bias=True, mlp_bias=True)),
    "llama3_rope": ("llama", dict(rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                                       low_freq_factor=1.0, high_freq_factor=4.0,
                                                       original_max_position_embeddings=64))),
    "llama_linear_rope": ("llama", dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0))),
    "llama_dynamic_rope": ("llama", dict(rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0,
                                                              factor=2.0))),
    "llama_yarn_rope": ("llama", dict(rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                                           original_max_position_embeddings=128))),
    "mistral_swa": ("mistral", dict(sliding_window=8)),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", dict(head_dim=32)),
}

_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}


def build_checkpoint(out_dir: Path, variant: str, tokenizer_dir: Path | None = None, seed: int = 0,
                     dtype: torch.dtype = torch.float32, max_shard_size: str = "50GB", **overrides: Any) -> Path:
    """Write a random-weight HF checkpoint (+ tokenizer files) into out_dir."""
    import transformers

    arch, extra = VARIANTS[variant]
    config_cls, model_cls = (getattr(transformers, n) for n in _CLASSES[arch])
    config = config_cls(**{**BASE, **extra, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).to(dtype)
    with torch.no_grad():  # HF inits norms to 1 and biases to 0: randomise so they are tested
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            shutil.copy(f, out_dir / f.name)
    return out_dir


def load_hf(path: Path):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()


def all_logits(engine, ids: list[int]) -> torch.Tensor:
    """Logits of every prompt position through our paged path (one prefill, every row sampled)."""
    from mistralpy import SamplingParams
    from mistralpy.core.request import Request
    from mistralpy.core.scheduler import ScheduledSeq, SchedulerOutput

    runner = engine.core.runner
    req = Request("parity", ids, SamplingParams().resolved(), 512)
    pool = engine.core.kv.pool  # the engine is idle: borrow blocks properly so no cached block is clobbered
    req.block_ids = pool.allocate(-(-len(ids) // runner.block_size))
    try:
        batch = runner.build_batch(SchedulerOutput([ScheduledSeq(req, len(ids), True)]))
        batch.logits_indices = torch.arange(len(ids))
        with torch.inference_mode():
            hidden = runner.model(batch.input_ids, batch.positions, runner.kv_caches,
                                  runner.backend.build_metadata(batch))
            return runner.model.compute_logits(hidden)
    finally:
        pool.free(req.block_ids)
