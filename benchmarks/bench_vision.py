#!/usr/bin/env python
"""Time to first token with images: mistralpy's Engine against transformers' `generate`.

One random-weight vision-language checkpoint (written by transformers and cached), the same
prompt text and images for both engines, greedy, one new token. Measures TTFT for one request with
one image, and the wall time until every one of N concurrent requests (default 8, each its own
image) has its first token (mistralpy: one `generate` call, continuous batching; transformers: one
padded batch). Fresh images per timed run, so neither engine's caches hit. Prints a markdown table,
writes JSON with the CPU model. No vision weights can be downloaded here: the shapes are the real
models' (see SHAPES), the weights random.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mistralpy.cli.bench import machine_info, usable_cpus

HERE = Path(__file__).resolve().parent
SMOLLM2_TEXT = dict(vocab_size=49280, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                    max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5)
# name -> (family, vision config, image size); the text model is SmolLM2-135M's shape in all
SHAPES = {
    # LLaVA 1.5's recipe on a small tower: CLIP ViT-B/16 at 224 px (196 image tokens), SmolLM2-135M.
    "llava-clip-b16-smollm2": ("llava", dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                             num_attention_heads=12, image_size=224, patch_size=16), 224),
    # SmolVLM-256M-Instruct: SigLIP-B/16 at 512 px tiles, pixel shuffle 4 (64 rows a tile), SmolLM2-135M.
    # Images resized to a 512 px longest edge (one tile: no split, the global image only), so a
    # 448x448 image is 64 image tokens; the published 2048 px setting gives 17 tiles.
    "smolvlm-256m": ("smolvlm", dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                     num_attention_heads=12, image_size=512, patch_size=16), 512),
    "tiny": ("llava", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           image_size=56, patch_size=14), 56),
}


def build(shape: str, out: Path) -> Path:
    import transformers
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    sys.path.insert(0, str(HERE.parent / "tests"))
    from fixtures_tokenizer import train_tokenizer
    from fixtures_vlm import vlm_tokenizer

    family, vision, size = SHAPES[shape]
    if (out / "config.json").exists():
        return out
    tok = train_tokenizer(out / "base_tok")
    if family == "smolvlm":
        return build_smolvlm(out, tok, vision, size)
    ids = vlm_tokenizer(tok, out, ["<image>"])
    text = dict(SMOLLM2_TEXT) if shape != "tiny" else dict(SMOLLM2_TEXT, num_hidden_layers=2, hidden_size=128,
                                                            intermediate_size=256, num_attention_heads=4,
                                                            num_key_value_heads=2)
    cfg = transformers.LlavaConfig(vision_config=transformers.CLIPVisionConfig(**vision),
                                   text_config=transformers.LlamaConfig(**text), image_token_index=ids["<image>"])
    torch.manual_seed(0)
    transformers.LlavaForConditionalGeneration(cfg).to(torch.bfloat16).save_pretrained(out)
    LlavaImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(out)
    return out


def build_smolvlm(out: Path, tok: Path, vision: dict, size: int) -> Path:
    import transformers
    from fixtures_vlm import IDEFICS3_TOKENS, smolvlm_hf_processor_patches, vlm_tokenizer
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
    from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

    ids = vlm_tokenizer(tok, out, IDEFICS3_TOKENS)
    cfg = transformers.SmolVLMConfig(vision_config=vision, text_config=dict(SMOLLM2_TEXT, model_type="llama"),
                                     scale_factor=4, image_token_id=ids["<image>"])
    torch.manual_seed(0)
    transformers.SmolVLMForConditionalGeneration(cfg).to(torch.bfloat16).save_pretrained(out)
    pp = SmolVLMImageProcessorPil(size={"longest_edge": size}, max_image_size={"longest_edge": size},
                                  do_image_splitting=True)
    with smolvlm_hf_processor_patches():
        transformers.SmolVLMProcessor(image_processor=pp, tokenizer=transformers.AutoTokenizer.from_pretrained(str(out)),
                                      video_processor=SmolVLMVideoProcessor(),
                                      image_seq_len=(size // vision["patch_size"] // 4) ** 2).save_pretrained(out)
    return out


def hf_model_and_processor(path: Path, family: str, torch_dtype: torch.dtype) -> tuple:
    import transformers

    if family == "smolvlm":
        from fixtures_vlm import hf_idefics3_processor

        model = transformers.SmolVLMForConditionalGeneration.from_pretrained(path, dtype=torch_dtype).eval()
        return model, hf_idefics3_processor(path, "smolvlm")
    model = transformers.LlavaForConditionalGeneration.from_pretrained(path, dtype=torch_dtype).eval()
    proc = transformers.LlavaProcessor(
        image_processor=transformers.models.llava.image_processing_pil_llava.LlavaImageProcessorPil.from_pretrained(path),
        tokenizer=transformers.AutoTokenizer.from_pretrained(path), patch_size=model.config.vision_config.patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return model, proc


def images(n: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (448, 448, 3), dtype=np.uint8)) for _ in range(n)]


def run_ours(path: Path, dtype: str, n: int, repeats: int) -> dict[str, float]:
    from mistralpy import Engine, SamplingParams

    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    with Engine(str(path), dtype=dtype, max_model_len=1024, max_num_batched_tokens=2048) as eng:
        prompt = "Describe <image> in detail."
        eng.generate({"prompt": prompt, "images": images(1, 99)}, one)   # warm-up
        single, batch = [], []
        for r in range(repeats):
            t = time.perf_counter()
            eng.generate({"prompt": prompt, "images": images(1, r)}, one)
            single.append(time.perf_counter() - t)
            imgs = images(n, 1000 + r)
            t = time.perf_counter()
            eng.generate([{"prompt": prompt, "images": [im]} for im in imgs], one)
            batch.append(time.perf_counter() - t)
    return {"ttft_1_s": min(single), f"ttft_all_{n}_s": min(batch)}


def run_hf(path: Path, family: str, dtype: str, n: int, repeats: int) -> dict[str, float]:
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    model, proc = hf_model_and_processor(path, family, torch_dtype)
    prompt = "Describe <image> in detail."

    def go(imgs: list[Image.Image]) -> float:
        kw = {"images": [[im] for im in imgs]} if family == "smolvlm" else {"images": imgs}
        inputs = proc(text=[prompt] * len(imgs), return_tensors="pt", padding=True, **kw)
        inputs["pixel_values"] = inputs["pixel_values"].to(torch_dtype)
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=1, do_sample=False, pad_token_id=0)
        return time.perf_counter() - t

    go(images(1, 99))
    single = [go(images(1, r)) for r in range(repeats)]
    batch = [go(images(n, 1000 + r)) for r in range(repeats)]
    return {"ttft_1_s": min(single), f"ttft_all_{n}_s": min(batch)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="llava-clip-b16-smollm2")
    p.add_argument("--dtype", choices=["bf16", "f32"], default="bf16")
    p.add_argument("--concurrent", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=usable_cpus())
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "mistralpy" / "bench_vision")
    p.add_argument("--json", type=Path, default=HERE / "results" / "bench_vision.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    path = build(args.shape, args.cache / args.shape)
    ours = run_ours(path, args.dtype, args.concurrent, args.repeats)
    hf = run_hf(path, SHAPES[args.shape][0], args.dtype, args.concurrent, args.repeats)
    n = args.concurrent
    rows = [("TTFT, 1 request, 1 image (448x448 input)", "ttft_1_s"),
            (f"all {n} first tokens, {n} requests with an image each", f"ttft_all_{n}_s")]
    print(f"| {args.shape}, {args.dtype}, {args.threads} threads | mistralpy (s) | transformers (s) | speed-up |")
    print("|---|---|---|---|")
    for label, key in rows:
        print(f"| {label} | {ours[key]:.3f} | {hf[key]:.3f} | {hf[key] / ours[key]:.2f}x |")
    result = {"shape": args.shape, "dtype": args.dtype, "threads": args.threads, "mistralpy": ours,
              "transformers": hf, "machine": machine_info()}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
