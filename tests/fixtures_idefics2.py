"""A tiny random Idefics2 checkpoint written by transformers (the oracle), with the PIL image
processor's config saved by transformers' Idefics2Processor, image splitting off or on."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from fixtures_vlm import _randomize, vlm_tokenizer

IDEFICS2_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]
N_LATENTS = 8   # perceiver rows per frame (idefics2-8b: 64)
IDEFICS2_SIZE = {"shortest_edge": 32, "longest_edge": 64}


def _save_processor(out_dir: Path, split: bool) -> None:
    import transformers
    from transformers import AutoTokenizer
    from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

    image_processor = Idefics2ImageProcessorPil(size=IDEFICS2_SIZE, do_image_splitting=split)
    transformers.Idefics2Processor(image_processor=image_processor, tokenizer=AutoTokenizer.from_pretrained(str(out_dir)),
                                   image_seq_len=N_LATENTS).save_pretrained(out_dir)


def build_idefics2(out_dir: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """SigLIP-style tower hidden 32 / 2 layers / 64 px table of 8 px patches; SwiGLU projection to
    the text width; a perceiver of depth 2 (4 query heads over 2 key / value heads, head_dim 16,
    N_LATENTS latents, random so each row differs); a 2-layer Mistral text model (hidden 64, no
    sliding window). Frames are resized to 32..64 px sides; image splitting off."""
    import transformers

    ids = vlm_tokenizer(tokenizer_dir, out_dir, IDEFICS2_TOKENS)
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": 64, "patch_size": 8}
    perceiver = {"hidden_size": 64, "rms_norm_eps": 1e-6, "resampler_n_latents": N_LATENTS, "resampler_depth": 2,
                 "resampler_n_heads": 4, "resampler_head_dim": 16, "num_key_value_heads": 2}
    text = {"model_type": "mistral", "vocab_size": 4160, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "bos_token_id": None, "eos_token_id": 2,
            "pad_token_id": 0, "sliding_window": None, "tie_word_embeddings": False}
    config = transformers.Idefics2Config(vision_config=vision, perceiver_config=perceiver, text_config=text,
                                         image_token_id=ids["<image>"], tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.Idefics2ForConditionalGeneration(config).float()
    _randomize(model)
    with torch.no_grad():   # transformers starts the latents at ones: every latent row would be the same
        model.model.connector.perceiver_resampler.latents.normal_(0.0, 1.0)
    model.save_pretrained(out_dir)
    _save_processor(out_dir, split=False)
    return out_dir


def with_splitting(src: Path, out_dir: Path) -> Path:
    """A copy of a build_idefics2 folder whose processor splits each image (4 quarters + the image)."""
    shutil.copytree(src, out_dir, dirs_exist_ok=True)
    _save_processor(out_dir, split=True)
    return out_dir


def hf_idefics2_processor(path: Path) -> Any:
    import transformers
    from transformers import AutoTokenizer
    from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

    proc_cfg = json.loads((path / "processor_config.json").read_text())
    return transformers.Idefics2Processor(image_processor=Idefics2ImageProcessorPil.from_pretrained(str(path)),
                                          tokenizer=AutoTokenizer.from_pretrained(str(path)),
                                          image_seq_len=proc_cfg["image_seq_len"])
