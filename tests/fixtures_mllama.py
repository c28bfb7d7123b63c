"""A tiny random Mllama (Llama 3.2 Vision) checkpoint written by transformers, its PIL image processor
config, and helpers that build transformers' inputs for a prompt of our token ids."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from fixtures_vlm import vlm_tokenizer

MLLAMA_TOKENS = ["<|image|>", "<|begin_of_text|>"]
TILE = 28          # 28 px tiles of 14 px patches: 4 patches + CLS = 5 rows a tile (padded to 8 in the tower)
MAX_TILES = 4
ROWS_PER_TILE = (TILE // 14) ** 2 + 1


def build_mllama(out_dir: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """Vision: hidden 32, 2 heads, 3 local layers (layers 0 and 2 also feed the output), 2 gated global
    layers, up to 4 tiles of 28 px; text: hidden 64, 4 layers of which 1 and 3 cross-attend, GQA 4/2.
    Gates and norms are randomised (transformers initialises the cross gates at 0, which would hide the
    image) and the projector is scaled so that the image visibly moves the logits."""
    import transformers
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    ids = vlm_tokenizer(tokenizer_dir, out_dir, MLLAMA_TOKENS)
    tok_cfg = json.loads((out_dir / "tokenizer_config.json").read_text())
    tok_cfg["chat_template"] = tok_cfg["chat_template"].replace("'<image>'", "'<|image|>'")
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_global_layers": 2,
              "attention_heads": 2, "image_size": TILE, "patch_size": 14, "max_num_tiles": MAX_TILES,
              "intermediate_layers_indices": [0, 2], "vision_output_dim": 32 * 3, "norm_eps": 1e-5}
    text = {"vocab_size": 4160, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "cross_attention_layers": [1, 3],
            "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "bos_token_id": ids["<|begin_of_text|>"],
            "eos_token_id": 2, "pad_token_id": 0, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    config = transformers.MllamaConfig(vision_config=vision, text_config=text, image_token_index=ids["<|image|>"])
    torch.manual_seed(seed)
    model = transformers.MllamaForConditionalGeneration(config).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gate", "gate_attn", "gate_ffn", "cross_attn_attn_gate", "cross_attn_mlp_gate")):
                p.copy_(torch.empty_like(p).uniform_(0.5, 1.0))
            elif "norm" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
            elif "multi_modal_projector" in name or "embedding" in name:
                p.mul_(4.0)
    model.save_pretrained(out_dir)
    MllamaImageProcessorPil(size={"height": TILE, "width": TILE}, max_image_tiles=MAX_TILES).save_pretrained(out_dir)
    return out_dir


def hf_inputs(path: Path, ids: list[int], images: list[Any], image_token_id: int) -> dict[str, torch.Tensor]:
    """transformers' model inputs for prompt ``ids`` (already holding one ``<|image|>`` per image):
    its image processor's tensors and its processor's cross-attention mask rule."""
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense,
        get_cross_attention_token_mask,
    )

    out: dict[str, torch.Tensor] = {"input_ids": torch.tensor([ids])}
    if not images:
        return out
    proc = MllamaImageProcessorPil.from_pretrained(str(path))
    px = proc([images], return_tensors="pt")
    mask = convert_sparse_cross_attention_mask_to_dense([get_cross_attention_token_mask(ids, image_token_id)],
                                                        px["num_tiles"], proc.max_image_tiles, len(ids))
    out.update(pixel_values=px["pixel_values"], aspect_ratio_ids=px["aspect_ratio_ids"],
               aspect_ratio_mask=px["aspect_ratio_mask"], cross_attention_mask=torch.from_numpy(mask))
    return out


def reference_row_masking():
    """A context manager patching transformers' cross-attention layer to zero the attention output of
    text rows that see no image, as Meta's reference implementation (and vLLM, and this engine) do;
    transformers 5.25 zeroes only the MLP part (huggingface/transformers#39379), which changes rows
    before the first ``<|image|>`` only."""
    from unittest import mock

    from transformers.models.mllama import modeling_mllama as mm

    def forward(self, hidden_states, cross_attention_states, cross_attention_mask, attention_mask,
                full_text_row_masked_out_mask, position_ids=None, cache=None, use_cache=False,
                position_embeddings=None, **kwargs):
        residual = hidden_states
        attn, _ = self.cross_attn(hidden_states=self.input_layernorm(hidden_states),
                                  attention_mask=cross_attention_mask,
                                  cross_attention_states=cross_attention_states, cache=cache, **kwargs)
        if full_text_row_masked_out_mask is not None:
            attn = full_text_row_masked_out_mask[:, 0] * attn
        hidden_states = residual + self.cross_attn_attn_gate.tanh() * attn
        residual = hidden_states
        mlp = self.mlp(self.post_attention_layernorm(hidden_states))
        if full_text_row_masked_out_mask is not None:
            mlp = full_text_row_masked_out_mask[:, 0] * mlp
        return residual + self.cross_attn_mlp_gate.tanh() * mlp

    return mock.patch.object(mm.MllamaCrossAttentionDecoderLayer, "forward", forward)


def hf_greedy(hf: Any, inputs: dict, n: int) -> list[int]:
    out = hf.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                      pad_token_id=0)
    return out[0, inputs["input_ids"].shape[1]:].tolist()
