"""Tiny random vision-language checkpoints written by transformers (the oracle), with their PIL
image processor config and a tokenizer holding the image token."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch


def random_image(w: int, h: int, seed: int, mode: str = "RGB") -> Any:
    """A w x h image of uniform random RGB pixels (seeded), converted to ``mode``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


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


QWEN_VL_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_VL_TEMPLATE = VLM_TEMPLATE.replace("'<image>'", "'<|vision_start|><|image_pad|><|vision_end|>'")


def build_qwen2_vl(out_dir: Path, tokenizer_dir: Path, version: str = "qwen2_vl", seed: int = 0,
                   tie_word_embeddings: bool = False) -> Path:
    """A tiny Qwen2-VL ("qwen2_vl") or Qwen2.5-VL ("qwen2_5_vl") checkpoint: vision depth 2 (2.5: window
    attention in block 0, full in block 1, 2x2-unit windows), hidden 32, 2 text layers, head_dim 16 with
    mrope_section [2, 3, 3]; images sized within 56*56 .. 28*28*20 pixels (at most 20 merged tokens)."""
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    ids = vlm_tokenizer(tokenizer_dir, out_dir, QWEN_VL_TOKENS)
    tok_cfg = json.loads((out_dir / "tokenizer_config.json").read_text())
    tok_cfg["chat_template"] = QWEN_VL_TEMPLATE
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    text = {"vocab_size": 4160, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 512,
            "rms_norm_eps": 1e-6, "bos_token_id": None, "eos_token_id": 2, "pad_token_id": 0,
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}}
    special = {"image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
               "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"]}
    if version == "qwen2_vl":
        vision = {"depth": 2, "embed_dim": 32, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2}
        config = transformers.Qwen2VLConfig(text_config=text, vision_config=vision,
                                            tie_word_embeddings=tie_word_embeddings, **special)
        cls = transformers.Qwen2VLForConditionalGeneration
    elif version == "qwen2_5_vl":
        vision = {"depth": 2, "hidden_size": 32, "out_hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                  "window_size": 56, "fullatt_block_indexes": [1], "tokens_per_second": 2}
        config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                                               tie_word_embeddings=tie_word_embeddings, **special)
        cls = transformers.Qwen2_5_VLForConditionalGeneration
    else:
        raise ValueError(version)
    torch.manual_seed(seed)
    model = cls(config).float()
    with torch.no_grad():   # non-trivial norms and biases; larger weights so images move the logits
        for name, p in model.named_parameters():
            if "norm" in name or "ln_q" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
            elif p.dim() >= 2:
                p.mul_(4.0)
    model.save_pretrained(out_dir)
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 20, patch_size=14, temporal_patch_size=2,
                             merge_size=2).save_pretrained(out_dir)
    return out_dir


LLAVA_NEXT_PINPOINTS = [[56, 56], [56, 112], [112, 56], [112, 112]]


def build_llava_next(out_dir: Path, tokenizer_dir: Path, seed: int = 0, image_size: int = 28,
                     pinpoints: list[list[int]] | None = None, feature_layer: int | list[int] = -2) -> Path:
    """A tiny LLaVA-NeXT: CLIP (3 layers, hidden 32, 28 px crops of 2x2 patches), a 2-layer Llama;
    grid pinpoints up to 112x112 (at most 4x4 crops) and the matching PIL image processor."""
    import transformers
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    pinpoints = pinpoints or LLAVA_NEXT_PINPOINTS
    ids = vlm_tokenizer(tokenizer_dir, out_dir, ["<image>"])
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                           num_attention_heads=2, image_size=image_size, patch_size=14)
    text = transformers.LlamaConfig(vocab_size=4160, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                    rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=2, pad_token_id=0)
    config = transformers.LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=ids["<image>"],
                                          vision_feature_layer=feature_layer, vision_feature_select_strategy="default",
                                          image_grid_pinpoints=pinpoints, projector_hidden_act="gelu")
    torch.manual_seed(seed)
    model = transformers.LlavaNextForConditionalGeneration(config).float()
    with torch.no_grad():   # non-trivial norms and biases; larger image rows (projector, newline) and
        for name, p in model.named_parameters():   # decoder weights, so the layout of the rows moves the logits
            if name.endswith(("norm.weight", ".bias")) or "layer_norm" in name or "layrnorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith("image_newline") or (p.dim() >= 2 and "multi_modal_projector" in name):
                p.mul_(8.0)
            elif p.dim() >= 2 and ".layers." in name and "vision_tower" not in name:
                p.mul_(2.0)
    model.save_pretrained(out_dir)
    LlavaNextImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                               image_grid_pinpoints=pinpoints).save_pretrained(out_dir)
    return out_dir


# ---------------------------------------------------------------------------- Idefics3 / SmolVLM
IDEFICS3_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>",
                   *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7))]
IDEFICS3_PP = {"size": {"longest_edge": 128}, "max_image_size": {"longest_edge": 64}, "do_image_splitting": True}


def _randomize(model: torch.nn.Module, scale: float = 2.0) -> None:
    """Non-trivial norms and biases; larger matrices so images move the logits. Zero-initialised
    parameters (Gemma 3's projection) get random values first."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and not p.any():
                p.normal_(0.0, 0.02)
            if "norm" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
            elif p.dim() >= 2:
                p.mul_(scale)


def smolvlm_hf_processor_patches():
    """transformers' SmolVLMProcessor needs num2words and (without torchvision) trips on its video
    processor's class check; both only concern videos. A context manager that stubs them."""
    import contextlib
    from unittest import mock

    import transformers.models.smolvlm.processing_smolvlm as smolvlm
    from transformers import SmolVLMProcessor

    check = SmolVLMProcessor.check_argument_for_proper_class
    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch.object(smolvlm, "num2words", str, create=True))
    stack.enter_context(mock.patch.object(
        SmolVLMProcessor, "check_argument_for_proper_class",
        lambda self, name, arg: None if name == "video_processor" else check(self, name, arg)))
    return stack


def build_idefics3(out_dir: Path, tokenizer_dir: Path, arch: str = "smolvlm", seed: int = 0) -> Path:
    """A tiny SmolVLM ("smolvlm": Llama text) or Idefics3 ("idefics3": Qwen2 text) checkpoint: SigLIP
    hidden 32 / 2 layers / 64 px tiles of 8 px patches, pixel shuffle 2 (16 rows a tile), text hidden
    64 / 2 layers; images resized to a 128 px longest edge and split into 64 px tiles + the global
    image. The processor config is saved by transformers' processor class."""
    import transformers
    from transformers import AutoTokenizer

    ids = vlm_tokenizer(tokenizer_dir, out_dir, IDEFICS3_TOKENS)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=64, patch_size=8)
    text = dict(vocab_size=4160, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5, bos_token_id=None,
                eos_token_id=2, pad_token_id=0, model_type="llama" if arch == "smolvlm" else "qwen2")
    tok = AutoTokenizer.from_pretrained(str(out_dir))
    if arch == "smolvlm":
        from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
        from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

        config = transformers.SmolVLMConfig(vision_config=vision, text_config=text, scale_factor=2,
                                            image_token_id=ids["<image>"])
        cls = transformers.SmolVLMForConditionalGeneration
        with smolvlm_hf_processor_patches():
            processor = transformers.SmolVLMProcessor(image_processor=SmolVLMImageProcessorPil(**IDEFICS3_PP),
                                                      tokenizer=tok, video_processor=SmolVLMVideoProcessor(),
                                                      image_seq_len=16)
    elif arch == "idefics3":
        from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

        config = transformers.Idefics3Config(vision_config=vision, text_config=text, scale_factor=2,
                                             image_token_id=ids["<image>"])
        cls = transformers.Idefics3ForConditionalGeneration
        processor = transformers.Idefics3Processor(image_processor=Idefics3ImageProcessorPil(**IDEFICS3_PP),
                                                   tokenizer=tok, image_seq_len=16)
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = cls(config).float()
    _randomize(model)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


# ------------------------------------------------------------------------------------------ Gemma 3
GEMMA3_TOKENS = ["<start_of_image>", "<image_soft_token>", "<end_of_image>"]


def build_gemma3_vlm(out_dir: Path, tokenizer_dir: Path, seed: int = 0, tokens_per_image: int = 16) -> Path:
    """A tiny Gemma3ForConditionalGeneration: SigLIP hidden 32 / 2 layers over 64 px images of 8 px
    patches, pooled to ``tokens_per_image`` soft tokens; Gemma 3 text hidden 64, a local layer
    (window 8, shorter than an image run) then a global one; the tokenizer's boi / soft / eoi
    tokens are the config's. Processor config saved by transformers' Gemma3Processor."""
    import transformers
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    ids = vlm_tokenizer(tokenizer_dir, out_dir, GEMMA3_TOKENS)
    tok_cfg = json.loads((out_dir / "tokenizer_config.json").read_text())
    tok_cfg["chat_template"] = VLM_TEMPLATE.replace("'<image>'", "'<start_of_image>'")
    tok_cfg["extra_special_tokens"] = {"boi_token": "<start_of_image>", "image_token": "<image_soft_token>",
                                       "eoi_token": "<end_of_image>"}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=64, patch_size=8, vision_use_head=False)
    text = dict(vocab_size=4160, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32, sliding_window=8,
                layer_types=["sliding_attention", "full_attention"], max_position_embeddings=1024,
                bos_token_id=None, eos_token_id=2, pad_token_id=0)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=tokens_per_image,
                                       boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
                                       image_token_index=ids["<image_soft_token>"])
    torch.manual_seed(seed)
    model = transformers.Gemma3ForConditionalGeneration(config).float()
    _randomize(model)
    model.save_pretrained(out_dir)
    from transformers import AutoTokenizer

    processor = transformers.Gemma3Processor(image_processor=Gemma3ImageProcessorPil(size={"height": 64, "width": 64}),
                                             tokenizer=AutoTokenizer.from_pretrained(str(out_dir)),
                                             image_seq_length=tokens_per_image)
    processor.save_pretrained(out_dir)
    return out_dir


def hf_idefics3_processor(path: Path, arch: str = "smolvlm"):
    """transformers' processor for a build_idefics3 folder (AutoProcessor would load SmolVLM's video
    processor, which needs torchvision)."""
    import transformers
    from transformers import AutoTokenizer

    image_seq_len = json.loads((path / "processor_config.json").read_text())["image_seq_len"]
    tok = AutoTokenizer.from_pretrained(str(path))
    if arch == "smolvlm":
        from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
        from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

        with smolvlm_hf_processor_patches():
            return transformers.SmolVLMProcessor(image_processor=SmolVLMImageProcessorPil.from_pretrained(str(path)),
                                                 tokenizer=tok, video_processor=SmolVLMVideoProcessor(),
                                                 image_seq_len=image_seq_len)
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    return transformers.Idefics3Processor(image_processor=Idefics3ImageProcessorPil.from_pretrained(str(path)),
                                          tokenizer=tok, image_seq_len=image_seq_len)


# ---------------------------------------------------------------------------------------- Mistral 3
MISTRAL3_TOKENS = ["[IMG]", "[IMG_BREAK]", "[IMG_END]"]


def build_mistral3(out_dir: Path, tokenizer_dir: Path, seed: int = 0, patch_size: int = 8,
                   longest_edge: int = 64) -> Path:
    """A tiny Mistral3ForConditionalGeneration: Pixtral (2 layers, hidden 32, 2 heads, ``patch_size``
    px patches, SiLU FFN), spatial merge 2, a 2-layer Mistral text model (hidden 64); images resized
    to fit ``longest_edge`` in multiples of patch * merge. The chat template writes "[IMG]" per image;
    processor_config.json carries patch_size / spatial_merge_size as PixtralProcessor saves them."""
    import transformers
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    ids = vlm_tokenizer(tokenizer_dir, out_dir, MISTRAL3_TOKENS)
    tok_cfg = json.loads((out_dir / "tokenizer_config.json").read_text())
    tok_cfg["chat_template"] = VLM_TEMPLATE.replace("'<image>'", "'[IMG]'")
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    vision = dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, head_dim=16, patch_size=patch_size, image_size=longest_edge,
                  hidden_act="silu")
    text = dict(model_type="mistral", vocab_size=4160, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=2, pad_token_id=0, sliding_window=None,
                tie_word_embeddings=False)
    config = transformers.Mistral3Config(vision_config=vision, text_config=text, image_token_index=ids["[IMG]"],
                                         spatial_merge_size=2, vision_feature_layer=-1, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.Mistral3ForConditionalGeneration(config).float()
    _randomize(model)
    with torch.no_grad():   # larger image rows, so the image visibly moves the logits, and peaked
        for name, p in model.named_parameters():   # tower attention, so its 2-D RoPE matters
            if "multi_modal_projector" in name and p.dim() >= 2:
                p.mul_(4.0)
            elif "vision_tower" in name and name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(10.0)
    model.save_pretrained(out_dir)
    merge_patch = patch_size * 2
    PixtralImageProcessorPil(size={"longest_edge": longest_edge},
                             patch_size={"height": merge_patch, "width": merge_patch}).save_pretrained(out_dir)
    (out_dir / "processor_config.json").write_text(json.dumps(
        {"processor_class": "PixtralProcessor", "patch_size": patch_size, "spatial_merge_size": 2,
         "image_token": "[IMG]", "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]"}))
    return out_dir


# ---------------------------------------------------------------------------------------- Qwen3-VL
def build_qwen3_vl(out_dir: Path, tokenizer_dir: Path, moe: bool = False, seed: int = 0,
                   deepstack: tuple[int, ...] = (0, 1)) -> Path:
    """A tiny Qwen3-VL (``moe``: Qwen3-VL-MoE, 4 experts top 2) checkpoint: vision depth 2, hidden 32,
    16 px patches, a 4x4 learned position table (interpolated to every grid), DeepStack mergers after
    the blocks in ``deepstack``; 2 text layers, head_dim 16, interleaved mrope_section [4, 2, 2];
    images sized within 64*64 .. 32*32*20 pixels (at most 20 merged tokens), mean / std 0.5."""
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    ids = vlm_tokenizer(tokenizer_dir, out_dir, QWEN_VL_TOKENS)
    tok_cfg = json.loads((out_dir / "tokenizer_config.json").read_text())
    tok_cfg["chat_template"] = QWEN_VL_TEMPLATE
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    text = {"vocab_size": 4160, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "max_position_embeddings": 512,
            "rms_norm_eps": 1e-6, "bos_token_id": None, "eos_token_id": 2, "pad_token_id": 0,
            "rope_parameters": {"rope_type": "default", "mrope_section": [4, 2, 2], "rope_theta": 10000.0,
                                "mrope_interleaved": True}}
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, decoder_sparse_step=1)
    vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 32,
              "patch_size": 16, "num_position_embeddings": 16, "deepstack_visual_indexes": list(deepstack)}
    special = {"image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
               "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"]}
    if moe:
        config = transformers.Qwen3VLMoeConfig(text_config=text, vision_config=vision, **special)
        cls = transformers.Qwen3VLMoeForConditionalGeneration
    else:
        config = transformers.Qwen3VLConfig(text_config=text, vision_config=vision, **special)
        cls = transformers.Qwen3VLForConditionalGeneration
    torch.manual_seed(seed)
    model = cls(config).float()
    with torch.no_grad():   # non-trivial norms and biases; larger weights so images move the logits
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
            elif "pos_embed" in name:
                p.normal_(0.0, 1.0)
            elif p.dim() >= 2:
                p.mul_(4.0)
    model.save_pretrained(out_dir)
    Qwen2VLImageProcessorPil(min_pixels=64 * 64, max_pixels=32 * 32 * 20, patch_size=16, temporal_patch_size=2,
                             merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(out_dir)
    return out_dir


# ---- comparing with transformers (the Qwen-VL tests) ---------------------------------------------

def qwen_hf_pixels(path, images: list[Any]) -> dict[str, torch.Tensor]:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    out = Qwen2VLImageProcessorPil.from_pretrained(path)(images, return_tensors="pt")
    return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}


def qwen_hf_kwargs(eng: Any, path, ids: list[int], images: list[Any]) -> dict:
    if not images:
        return {}
    image_id = eng.tokenizer.token_to_id("<|image_pad|>")
    mm = (torch.tensor([ids]) == image_id).int()   # 1 marks image tokens (transformers' mm_token_type_ids)
    return {**qwen_hf_pixels(path, images), "mm_token_type_ids": mm}


def qwen_hf_generate(hf: Any, ids: list[int], kwargs: dict, n: int = 20) -> tuple[list[int], list[torch.Tensor]]:
    out = hf.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                      pad_token_id=0, output_scores=True, return_dict_in_generate=True, **kwargs)
    return out.sequences[0, len(ids):].tolist(), [torch.log_softmax(s[0].double(), -1) for s in out.scores]


def assert_same_as_hf(ours: Any, hf_tokens: list[int], hf_logprobs: list[torch.Tensor]) -> None:
    assert ours.token_ids == hf_tokens
    diffs = [abs(e.logprob - lp[t].item()) for e, lp, t in zip(ours.logprobs, hf_logprobs, hf_tokens)]
    assert max(diffs) < 1e-4, diffs
