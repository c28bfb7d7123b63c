"""Tiny random Llama 4 checkpoints written by transformers (the oracle): the text-only
``Llama4ForCausalLM`` and the ``Llama4ForConditionalGeneration`` VLM, with a tokenizer that holds
Llama 4's image tokens, and the image / processor configs Llama4Processor reads.

Text: 4 layers, MoE in layers 1 and 3 (``interleave_moe_layer_step`` 2; 4 experts, top 2, a shared
expert), dense MLPs in 0 and 2 (``intermediate_size_mlp``), layer 3 NoPE (full attention with
temperature tuning; ``floor_scale`` 8 so it acts on short prompts), layers 0-2 RoPE (llama3 scaling)
with L2 QK-norm and chunked attention of 16 tokens. Vision: 64 px tiles of 8 px patches (64 patches
+ a class token), 2 layers, pixel shuffle 0.5 -> 16 rows a tile; up to 4 tiles + the global one.

transformers' Llama4ImageProcessor runs on torchvision; without it ``torchvision_shim`` stands in
with the calls it makes, on the same torch ops torchvision 0.2x itself uses (uint8 antialiased
bilinear ``interpolate`` on AVX2/AVX512 CPUs, zero padding, ``(x - mean) / std`` in the image dtype).
"""
from __future__ import annotations

import contextlib
import enum
import importlib.util
import json
import platform
import sys
import types
from pathlib import Path
from typing import Any

import torch
from fixtures_vlm import _randomize, vlm_tokenizer

LLAMA4_TOKENS = ["<|image_start|>", "<|image_end|>", "<|image|>", "<|patch|>", "<|tile_x_separator|>",
                 "<|tile_y_separator|>"]
LLAMA4_TEMPLATE_IMAGE = "'<|image|>'"

TEXT = dict(vocab_size=4160, hidden_size=64, intermediate_size=32, intermediate_size_mlp=96, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
            rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=2, pad_token_id=0, num_local_experts=4,
            num_experts_per_tok=2, interleave_moe_layer_step=2, no_rope_layer_interval=4, attention_chunk_size=16,
            attn_temperature_tuning=True, floor_scale=8, attn_scale=0.5, use_qk_norm=True, tie_word_embeddings=False,
            rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                 high_freq_factor=4.0, original_max_position_embeddings=64))
VISION = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=64,
              patch_size=8, vision_output_dim=64, projector_input_dim=64, projector_output_dim=64,
              pixel_shuffle_ratio=0.5, norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
IMAGE_PP = {"image_processor_type": "Llama4ImageProcessor", "size": {"height": 64, "width": 64}, "max_patches": 4,
            "resize_to_max_canvas": False, "resample": 2, "do_resize": True, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5], "do_convert_rgb": True}


def _tokenizer(out_dir: Path, tokenizer_dir: Path) -> dict[str, int]:
    ids = vlm_tokenizer(tokenizer_dir, out_dir, LLAMA4_TOKENS)
    tok_cfg = json.loads((out_dir / "tokenizer_config.json").read_text())
    tok_cfg["chat_template"] = tok_cfg["chat_template"].replace("'<image>'", LLAMA4_TEMPLATE_IMAGE)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    return ids


def _sharpen(model: torch.nn.Module) -> None:
    """Non-trivial norms, peaked attention and larger image rows, so every feature moves the logits."""
    _randomize(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                p.normal_(0.0, 0.1)
            elif ("multi_modal_projector" in name or "vision_adapter" in name
                  or name.endswith(("q_proj.weight", "k_proj.weight"))):
                p.mul_(4.0)
            elif name.endswith(("class_embedding", "positional_embedding_vlm")):
                p.normal_(0.0, 0.5)


def build_llama4_text(out_dir: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    import transformers

    _tokenizer(out_dir, tokenizer_dir)
    config = transformers.Llama4TextConfig(**TEXT)
    torch.manual_seed(seed)
    model = transformers.Llama4ForCausalLM(config).float()
    _sharpen(model)
    model.save_pretrained(out_dir)
    return out_dir


def build_llama4_vlm(out_dir: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    import transformers

    ids = _tokenizer(out_dir, tokenizer_dir)
    config = transformers.Llama4Config(text_config=TEXT, vision_config=VISION, image_token_index=ids["<|patch|>"],
                                       boi_token_index=ids["<|image_start|>"], eoi_token_index=ids["<|image_end|>"])
    torch.manual_seed(seed)
    model = transformers.Llama4ForConditionalGeneration(config).float()
    _sharpen(model)
    model.save_pretrained(out_dir)
    (out_dir / "preprocessor_config.json").write_text(json.dumps(IMAGE_PP))
    (out_dir / "processor_config.json").write_text(json.dumps(
        {"processor_class": "Llama4Processor", "patch_size": VISION["patch_size"], "pixel_shuffle_ratio": 0.5,
         "fake_image_token": "<|image|>", "image_token": "<|image|>"}))
    return out_dir


# ------------------------------------------------------------------------- transformers' processor
def torchvision_shim() -> dict[str, types.ModuleType]:
    """Modules standing in for ``torchvision.transforms.v2.functional``: what Llama4ImageProcessor and
    transformers' TorchvisionBackend call, on the torch ops torchvision's own code runs."""
    import torch.nn.functional as F

    class InterpolationMode(enum.Enum):
        NEAREST = "nearest"
        NEAREST_EXACT = "nearest-exact"
        BILINEAR = "bilinear"
        BICUBIC = "bicubic"
        BOX = "box"
        HAMMING = "hamming"
        LANCZOS = "lanczos"

    def resize(image, size, interpolation=InterpolationMode.BILINEAR, antialias=True, **_):
        h, w = int(size[0]), int(size[1])
        if tuple(image.shape[-2:]) == (h, w):
            return image
        if interpolation != InterpolationMode.BILINEAR:
            raise NotImplementedError(interpolation)
        shape = image.shape
        x = image.reshape(-1, *shape[-3:])
        native = image.dtype == torch.uint8 and (torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
                                                 or platform.machine() in ("aarch64", "arm64"))
        if image.dtype == torch.uint8 and not native:
            out = F.interpolate(x.float(), size=[h, w], mode="bilinear", align_corners=False,
                                antialias=antialias).round_().to(torch.uint8)
        else:
            out = F.interpolate(x, size=[h, w], mode="bilinear", align_corners=False, antialias=antialias)
        return out.reshape(*shape[:-2], h, w)

    def pad(image, padding, fill=0, padding_mode="constant"):
        left, top, right, bottom = padding
        if padding_mode != "constant" or (isinstance(fill, (list, tuple)) and any(fill)):
            raise NotImplementedError((padding_mode, fill))
        return F.pad(image, [left, right, top, bottom], value=0)

    def normalize(image, mean, std, inplace=False):
        m = torch.as_tensor(mean, dtype=image.dtype).view(-1, 1, 1)
        s = torch.as_tensor(std, dtype=image.dtype).view(-1, 1, 1)
        return (image.sub_(m) if inplace else image.sub(m)).div_(s)

    def grayscale_to_rgb(image):
        return image.expand(*image.shape[:-3], 3, *image.shape[-2:]) if image.shape[-3] == 1 else image

    fn = types.ModuleType("torchvision.transforms.v2.functional")
    fn.InterpolationMode = InterpolationMode
    fn.resize, fn.pad, fn.normalize, fn.grayscale_to_rgb = resize, pad, normalize, grayscale_to_rgb
    root = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    v2 = types.ModuleType("torchvision.transforms.v2")
    transforms.InterpolationMode = InterpolationMode
    root.transforms, transforms.v2, v2.functional = transforms, v2, fn
    return {"torchvision": root, "torchvision.transforms": transforms, "torchvision.transforms.v2": v2,
            "torchvision.transforms.v2.functional": fn}


@contextlib.contextmanager
def hf_llama4_processor(path: Path) -> Any:
    """transformers' Llama4Processor for a build_llama4_vlm folder: its image processor on real
    torchvision where installed, else on ``torchvision_shim``."""
    from transformers import AutoTokenizer

    with contextlib.ExitStack() as stack:
        if importlib.util.find_spec("torchvision") is None:
            from unittest import mock

            import transformers.image_processing_backends as backends
            from transformers import image_utils

            shim = torchvision_shim()
            for name, module in shim.items():
                stack.enter_context(mock.patch.dict(sys.modules, {name: module}))
            fn = shim["torchvision.transforms.v2.functional"]
            stack.enter_context(mock.patch.object(backends, "tvF", fn, create=True))
            stack.enter_context(mock.patch.object(backends, "requires", lambda **_: (lambda c: c), create=True))
            mapping = {image_utils.PILImageResampling.BILINEAR: fn.InterpolationMode.BILINEAR}
            stack.enter_context(mock.patch.object(backends, "pil_torch_interpolation_mapping", mapping, create=True))
            for mod in ("transformers.models.llama4.image_processing_llama4",
                        "transformers.models.llama4.processing_llama4"):
                stack.enter_context(mock.patch.dict(sys.modules))
                sys.modules.pop(mod, None)
        # the submodules themselves: the package's lazy attributes are placeholders without torchvision
        ip = importlib.import_module("transformers.models.llama4.image_processing_llama4")
        Llama4Processor = importlib.import_module("transformers.models.llama4.processing_llama4").Llama4Processor

        pp = {k: v for k, v in json.loads((path / "preprocessor_config.json").read_text()).items()
              if k != "image_processor_type"}
        pc = json.loads((path / "processor_config.json").read_text())
        image_processor = ip.Llama4ImageProcessor(**pp)
        yield Llama4Processor(image_processor=image_processor, tokenizer=AutoTokenizer.from_pretrained(str(path)),
                              patch_size=pc["patch_size"], pixel_shuffle_ratio=pc["pixel_shuffle_ratio"])
