"""Tiny random checkpoints written by transformers (the oracle), one per architecture variant."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

BASE = dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=2, pad_token_id=0)

# Phi-3.5-MoE-style longrope for head_dim 16 (8 factors). original_max = max_position_embeddings so
# an engine with max_model_len <= 512 uses the short factors, as transformers' Phimoe always does.
PHIMOE_ROPE = dict(rope_type="longrope", rope_theta=10000.0, original_max_position_embeddings=512,
                   short_factor=[1.0, 1.1, 1.2, 1.5, 2.0, 3.0, 4.0, 6.0],
                   long_factor=[1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 12.0, 16.0], short_mscale=1.1, long_mscale=1.25)

# DeepSeek V2/V3 sizes (every one explicit: transformers' defaults are the full models).
DEEPSEEK_BASE = dict(num_hidden_layers=3, num_key_value_heads=4, intermediate_size=128, moe_intermediate_size=32,
                     n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                     n_group=4, topk_group=2, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=32,
                     v_head_dim=32, norm_topk_prob=False, routed_scaling_factor=1.0)
DEEPSEEK_YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=128,
                     beta_fast=32, beta_slow=1, mscale=0.707, mscale_all_dim=0.707)

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
    # Dense families: partial rotary (Phi-2, Phi-3 here, GLM-4), prompts longer than the windows of 8.
    "phi2": ("phi", dict(hidden_act="gelu_new", rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                                     partial_rotary_factor=0.5))),
    "phi3": ("phi3", dict(sliding_window=8, rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                                 partial_rotary_factor=0.75))),
    "starcoder2": ("starcoder2", dict(sliding_window=8, use_bias=True, norm_epsilon=1e-5)),
    "glm4": ("glm4", dict(head_dim=32, attention_bias=True)),
    "smollm3": ("smollm3", dict(no_rope_layer_interval=2, use_sliding_window=True, sliding_window=8)),
    # Gemma: head_dim explicit (defaults 256); the 40-token parity prompt is longer than the windows.
    "gemma": ("gemma", dict(head_dim=16, hidden_act="gelu")),
    "gemma2": ("gemma2", dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=24, final_logit_softcapping=1.0)),
    "gemma3": ("gemma3", dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=24,
                              layer_types=["sliding_attention", "full_attention"],
                              rope_parameters={"sliding_attention": dict(rope_type="default", rope_theta=10000.0),
                                               "full_attention": dict(rope_type="linear", rope_theta=1e6,
                                                                      factor=2.0)})),
    "mixtral": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=64)),
    "mixtral_swa": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=64,
                                    sliding_window=8)),
    "qwen3_moe": ("qwen3_moe", dict(head_dim=32, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)),
    "qwen3_moe_mixed": ("qwen3_moe", dict(head_dim=32, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32,
                                          norm_topk_prob=True, decoder_sparse_step=2)),
    "phimoe": ("phimoe", dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=64, attention_bias=True,
                              lm_head_bias=True, router_jitter_noise=0.3, rope_parameters=PHIMOE_ROPE,
                              initializer_range=0.05)),  # embeddings not drowned by the o_proj bias
    # DeepSeek MLA + MoE: 3 layers (1 dense), 8 routed experts in 4 groups (2 kept), 1 shared expert, yarn
    "deepseek_v2_lite": ("deepseek_v2", dict(DEEPSEEK_BASE, q_lora_rank=None, topk_method="group_limited_greedy",
                                             rope_parameters=DEEPSEEK_YARN)),
    "deepseek_v2": ("deepseek_v2", dict(DEEPSEEK_BASE, q_lora_rank=24, topk_method="group_limited_greedy",
                                        routed_scaling_factor=2.0, rope_parameters=DEEPSEEK_YARN)),
    "deepseek_v3": ("deepseek_v3", dict(DEEPSEEK_BASE, q_lora_rank=24, num_experts_per_tok=3, norm_topk_prob=True,
                                        routed_scaling_factor=2.5,
                                        rope_parameters=dict(DEEPSEEK_YARN, mscale=1.0, mscale_all_dim=0.8))),
}

_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "phi": ("PhiConfig", "PhiForCausalLM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM"),
    "glm4": ("Glm4Config", "Glm4ForCausalLM"),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM"),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM"),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM"),
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
