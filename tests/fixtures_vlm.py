"""Tiny random vision-language checkpoints written by transformers (the oracle), with their PIL
image processor config and a tokenizer holding the image token."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

VLM_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>' }}"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def vlm_tokenizer(base_dir: Path, out_dir: Path, extra_tokens: list[str]) -> dict[str, int]:
    """The base fixture tokenizer plus special tokens; returns their ids."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(base_dir / "tokenizer.json"))
    tok.add_special_tokens(extra_tokens)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    config = json.loads((base_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = VLM_TEMPLATE
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config))
    shutil.copy(base_dir / "special_tokens_map.json", out_dir / "special_tokens_map.json")
    return {t: tok.token_to_id(t) for t in extra_tokens}


def build_llava(out_dir: Path, tokenizer_dir: Path, seed: int = 0, image_size: int = 56,
                feature_layer: int = -2, strategy: str = "default") -> Path:
    import transformers

    ids = vlm_tokenizer(tokenizer_dir, out_dir, ["<image>"])
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                           num_attention_heads=2, image_size=image_size, patch_size=14)
    text = transformers.LlamaConfig(vocab_size=4160, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                    rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=2, pad_token_id=0)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=ids["<image>"],
                                      vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy,
                                      projector_hidden_act="gelu")
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(config).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias") or "layer_norm" in name or "layrnorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out_dir)
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    LlavaImageProcessorPil(size={"shortest_edge": image_size},
                           crop_size={"height": image_size, "width": image_size}).save_pretrained(out_dir)
    return out_dir
