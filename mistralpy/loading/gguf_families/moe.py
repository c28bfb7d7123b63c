"""GGUF mixture-of-experts: Mixtral (llama.cpp arch `llama` with `llama.expert_count` > 0) and
Qwen3-MoE (arch `qwen3moe`).

llama.cpp stacks each layer's experts into one tensor per projection: `blk.N.ffn_gate_exps` /
`ffn_up_exps` [E, I, H] and `ffn_down_exps` [E, H, I] (PyTorch order; GGUF lists dims reversed),
plus the router `blk.N.ffn_gate_inp` [E, H] (kept F32 by llama.cpp's quantizer). ``convert`` cuts
a stacked tensor into one 2-D tensor per expert, named as transformers' per-expert checkpoints
(`mlp.experts.{e}.{gate,up,down}_proj.weight`), which the model fuses as usual. Every quantized
row is a whole number of blocks, so expert e is simply the e-th slab of the raw bytes.

A dense `llama` file passes through untouched (no expert count, no expert tensors).
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from mistralpy.errors import ModelLoadError
from mistralpy.quant.gguf.tensor import GGUFTensor

LAYER_NAMES = {
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
}
_STACKED_RE = re.compile(r"^(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)\.weight$")


def update_config(cfg: dict[str, Any], get: Any, meta: dict[str, Any], tensor_names: set[str]) -> None:
    experts = int(get("expert_count") or 0)
    if experts == 0:
        return  # a dense model
    used = get("expert_used_count")
    if not used:
        raise ModelLoadError(f"GGUF file has {experts} experts but no {cfg['model_type']}.expert_used_count")
    cfg["num_local_experts"] = experts
    cfg["num_experts_per_tok"] = int(used)
    if cfg["model_type"] == "llama":
        cfg["architectures"] = ["MixtralForCausalLM"]
    elif cfg["model_type"] == "qwen3moe":
        if get("expert_feed_forward_length") is None:
            raise ModelLoadError("GGUF qwen3moe file lacks qwen3moe.expert_feed_forward_length")
        cfg["moe_intermediate_size"] = int(get("expert_feed_forward_length"))
        # llama.cpp always renormalises the top-k weights of qwen3moe unless the file says otherwise.
        cfg["norm_topk_prob"] = bool(get("expert_weights_norm", True))
        cfg["decoder_sparse_step"] = 1
        cfg["mlp_only_layers"] = [i for i in range(cfg["num_hidden_layers"])
                                  if f"blk.{i}.ffn_gate_inp.weight" not in tensor_names]


def convert(name: str, tensor: GGUFTensor, cfg: dict[str, Any]) -> Iterator[tuple[str, GGUFTensor]]:
    m = _STACKED_RE.match(name)
    if m is None:
        yield name, tensor
        return
    if len(tensor.shape) != 3 or tensor.shape[0] != cfg.get("num_local_experts"):
        raise ModelLoadError(f"stacked expert tensor {name} has shape {tensor.shape}, expected "
                             f"[{cfg.get('num_local_experts')}, out, in]")
    per_expert = tensor.raw.reshape(tensor.shape[0], -1)
    shape = tuple(tensor.shape[1:])
    for e in range(tensor.shape[0]):
        yield f"{m.group(1)}.{e}.{m.group(2)}.weight", GGUFTensor(per_expert[e].reshape(shape[0], -1), tensor.qtype,
                                                                   shape)
