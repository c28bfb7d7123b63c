"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL preprocessing against transformers 5.24 (the oracle).

Images: Qwen2VLImageProcessorPil. Prompt expansion: the real HF processors (Qwen2VLProcessor,
Qwen2_5_VLProcessor, Qwen3VLProcessor) on a small tokenizer with the Qwen special tokens. M-RoPE:
``get_rope_index`` of tiny random HF models. transformers' video processors need torchvision, which
is not installed: the HF processors get a stand-in video processor that returns our grid and the
video metadata (their text path, second_per_grid_ts and timestamps are still HF's); our video pixels
are checked against HF's image processor on frames that need no resize, and against HF's own
smart_resize / patchify source (read without importing torchvision) for resized ones.
"""
from __future__ import annotations

import ast
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

transformers = pytest.importorskip("transformers")
from transformers import AutoTokenizer, Qwen2_5_VLProcessor, Qwen2VLProcessor, Qwen3VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from mistralpy.multimodal.inputs import MediaError, MMItem, PlaceholderRange
from mistralpy.multimodal.mrope import decode_positions, mrope_positions
from mistralpy.multimodal.processors import qwen2_vl as ours
from mistralpy.tokenizer.tokenizer import Tokenizer

QWEN_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
HF_MODELS = Path(transformers.__file__).parent / "models"

# small settings per version (image config == video config here, as in a legacy folder)
CONFIGS = {
    "qwen2_vl": {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 24, "patch_size": 14, "temporal_patch_size": 2,
                 "merge_size": 2},
    "qwen2_5_vl": {"min_pixels": 28 * 28 * 2, "max_pixels": 28 * 28 * 30, "patch_size": 14, "temporal_patch_size": 2,
                   "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                   "image_std": [0.26862954, 0.26130258, 0.27577711]},
    "qwen3_vl": {"size": {"shortest_edge": 32 * 32 * 2, "longest_edge": 32 * 32 * 24}, "patch_size": 16,
                 "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
                 "image_std": [0.5, 0.5, 0.5]},
}
MODEL_TYPES = {"qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_5_vl", "qwen3_vl": "qwen3_vl"}
HF_PROCESSORS = {"qwen2_vl": Qwen2VLProcessor, "qwen2_5_vl": Qwen2_5_VLProcessor, "qwen3_vl": Qwen3VLProcessor}


def _rng_image(h: int, w: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed + h * 7 + w)
    if mode == "L":
        return Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
    if mode == "RGBA":
        arr = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
        arr[: h // 2, :, 3] = 0      # a fully transparent half, the rest random alpha
        return Image.fromarray(arr, "RGBA")
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    return img.quantize(colors=17) if mode == "P" else img


# ---- fixtures ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def qwen_tok_dir(tokenizer_dir: Path, tmp_path_factory) -> Path:
    """The suite's small BPE tokenizer with Qwen-VL's special tokens added."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTok

    out = tmp_path_factory.mktemp("qwen_vl_tok")
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    tok = HFTok.from_file(str(out / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_TOKENS])
    tok.save(str(out / "tokenizer.json"))
    return out


@pytest.fixture(scope="module")
def our_tok(qwen_tok_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(qwen_tok_dir)


@pytest.fixture(scope="module")
def hf_tok(qwen_tok_dir: Path):
    return AutoTokenizer.from_pretrained(str(qwen_tok_dir))


def _hf_config(version: str, tok: Tokenizer) -> dict:
    ids = {k: tok.token_to_id(t) for k, t in zip(("vision_start_token_id", "vision_end_token_id", "image_token_id",
                                                   "video_token_id"), QWEN_TOKENS)}
    patch = CONFIGS[version]["patch_size"]
    return {"model_type": MODEL_TYPES[version], **ids,
            "vision_config": {"patch_size": patch, "spatial_merge_size": 2, "temporal_patch_size": 2,
                              **({"tokens_per_second": 2} if version == "qwen2_5_vl" else {})}}


def _ours(version: str, tok: Tokenizer, **cfg_over) -> ours.Qwen2VLProcessor:
    cfg = {**CONFIGS[version], **cfg_over}
    return ours.Qwen2VLProcessor(cfg, _hf_config(version, tok), tok)


class _FakeVideoProcessor:
    """Stands in for transformers' torchvision video processor: our grid, HF's default metadata."""

    def __init__(self, grids: list[list[int]], fps: list[float | None], temporal_patch_size: int = 2):
        self.grids, self.fps = grids, fps
        self.merge_size, self.temporal_patch_size = 2, temporal_patch_size

    def __call__(self, videos, **kwargs):
        from transformers.video_utils import make_batched_metadata, make_batched_videos

        videos = make_batched_videos(videos)
        meta = make_batched_metadata(videos, video_metadata=None)
        for m, fps in zip(meta, self.fps):
            m.fps = fps
        return {"video_grid_thw": torch.tensor(self.grids), "video_metadata": meta}


def _hf_processor(version: str, hf_tok, video: _FakeVideoProcessor | None = None):
    cls = HF_PROCESSORS[version]

    class _NoTorchvision(cls):   # skip the video processor's class check (its class needs torchvision)
        def check_argument_for_proper_class(self, name, arg):
            return None if name == "video_processor" else super().check_argument_for_proper_class(name, arg)

    cfg = {k: v for k, v in CONFIGS[version].items()}
    proc = _NoTorchvision(image_processor=Qwen2VLImageProcessorPil(**cfg), tokenizer=hf_tok, video_processor=None)
    proc.video_processor = video
    return proc


# ---- image pixels ------------------------------------------------------------------------------------

IMAGE_CASES = [(1, 1, "RGB"), (37, 500, "RGB"), (500, 37, "RGB"), (4000, 30, "RGB"), (29, 29, "RGB"),
               (64, 48, "RGBA"), (50, 70, "P"), (45, 33, "L"), (28, 56, "RGB")]


@pytest.mark.parametrize("version", list(CONFIGS))
@pytest.mark.parametrize("h,w,mode", IMAGE_CASES)
def test_image_pixels_match_hf(version, h, w, mode, our_tok):
    image = _rng_image(h, w, mode)
    if mode == "P":   # a palette image with a transparent entry
        image.info["transparency"] = 3
    hf = Qwen2VLImageProcessorPil(**CONFIGS[version])(images=[image], return_tensors="pt")
    item = _ours(version, our_tok).process_image(image, "hash")
    assert item.modality == "image"
    assert torch.equal(item.inputs["image_grid_thw"], hf["image_grid_thw"])
    assert item.inputs["image_grid_thw"].dtype == torch.int64
    pv = item.inputs["pixel_values"]
    assert pv.dtype == torch.float32 and pv.shape == hf["pixel_values"].shape
    assert (pv - hf["pixel_values"]).abs().max().item() <= 1e-6
    assert item.num_embeds == int(hf["image_grid_thw"].prod()) // 4


def test_image_extreme_aspect_raises_like_hf(our_tok):
    image = _rng_image(10, 2500)
    with pytest.raises(ValueError):
        Qwen2VLImageProcessorPil(**CONFIGS["qwen2_vl"])(images=[image])
    with pytest.raises(MediaError):
        _ours("qwen2_vl", our_tok).process_image(image, "hash")


def test_image_hash_covers_settings(our_tok):
    image = _rng_image(40, 40)
    a = _ours("qwen2_vl", our_tok).process_image(image, "h1")
    assert a.hash == _ours("qwen2_vl", our_tok).process_image(image, "h1").hash
    assert a.hash != _ours("qwen2_vl", our_tok).process_image(image, "h2").hash
    assert a.hash != _ours("qwen2_vl", our_tok, max_pixels=28 * 28 * 8).process_image(image, "h1").hash


def test_min_max_pixels_override_size(our_tok):
    """transformers: top-level min_pixels / max_pixels win over size.shortest_edge / longest_edge."""
    cfg = {"size": {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 100}, "max_pixels": 28 * 28 * 4}
    image = _rng_image(300, 200)
    hf = Qwen2VLImageProcessorPil(**cfg)(images=[image], return_tensors="pt")
    item = ours.Qwen2VLProcessor(cfg, _hf_config("qwen2_vl", our_tok), our_tok).process_image(image, "h")
    assert torch.equal(item.inputs["image_grid_thw"], hf["image_grid_thw"])
    assert (item.inputs["pixel_values"] - hf["pixel_values"]).abs().max().item() <= 1e-6


# ---- video pixels ------------------------------------------------------------------------------------

def _hf_source_function(relpath: str, name: str, cls: str | None = None):
    """A function from a transformers module that cannot be imported here (it needs torchvision)."""
    tree = ast.parse((HF_MODELS / relpath).read_text())
    body = tree.body
    if cls is not None:
        body = next(n for n in body if isinstance(n, ast.ClassDef) and n.name == cls).body
    fn = next(n for n in body if isinstance(n, ast.FunctionDef) and n.name == name)
    fn.decorator_list = []
    fn.args.args = [a for a in fn.args.args if a.arg != "self"]   # the methods we take do not use self
    for a in fn.args.args + fn.args.kwonlyargs:
        a.annotation = None
    fn.returns = None
    namespace: dict = {"math": math, "torch": torch, "np": np}
    # transformers' own code, compiled from its installed source file
    exec(compile(ast.Module(body=[fn], type_ignores=[]), relpath, "exec"), namespace)  # noqa: S102
    return namespace[name]


@pytest.mark.parametrize("version,size", [("qwen2_vl", (56, 84)), ("qwen3_vl", (64, 96))])
@pytest.mark.parametrize("num_frames", [4, 3])
def test_video_pixels_no_resize_match_hf_image_processor(version, size, num_frames, our_tok):
    """Frames already at a valid size: each temporal patch of (f, f) equals HF's image of f, and an odd
    frame count is padded with the last frame."""
    h, w = size
    distinct = [_rng_image(h, w, seed=s) for s in range((num_frames + 1) // 2)]
    frames = [distinct[i // 2] for i in range(num_frames)]
    item = _ours(version, our_tok).process_video(frames, 2.0, "vhash")
    gt = (num_frames + 1) // 2
    hf = Qwen2VLImageProcessorPil(**CONFIGS[version])(images=distinct, return_tensors="pt")
    gh, gw = (int(v) for v in hf["image_grid_thw"][0, 1:])
    assert item.inputs["video_grid_thw"].tolist() == [[gt, gh, gw]]
    pv = item.inputs["pixel_values_videos"]
    assert pv.shape == hf["pixel_values"].shape and pv.dtype == torch.float32
    assert (pv - hf["pixel_values"]).abs().max().item() <= 1e-6
    assert item.num_embeds == gt * gh * gw // 4


@pytest.mark.parametrize("version", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("num_frames,h,w", [(4, 37, 90), (5, 120, 33), (2, 20, 20)])
def test_video_pixels_resized_match_hf_pipeline(version, num_frames, h, w, our_tok):
    """Resized frames: HF's own smart_resize and patchify, torchvision's resize kernel (F.interpolate on
    uint8, bicubic, antialias) and the fused normalization."""
    cfg = CONFIGS[version]
    min_px = cfg.get("min_pixels") or cfg["size"]["shortest_edge"]
    max_px = cfg.get("max_pixels") or cfg["size"]["longest_edge"]
    patch, factor = cfg["patch_size"], cfg["patch_size"] * 2
    rng = np.random.default_rng(num_frames + h)
    video = rng.integers(0, 256, (num_frames, h, w, 3), dtype=np.uint8)
    if version == "qwen3_vl":
        sr = _hf_source_function("qwen3_vl/video_processing_qwen3_vl.py", "smart_resize")
        rh, rw = sr(num_frames=num_frames, height=h, width=w, temporal_factor=2, factor=factor,
                    min_pixels=min_px, max_pixels=max_px)
        patchify = _hf_source_function("qwen3_vl/video_processing_qwen3_vl.py", "patchify", "Qwen3VLVideoProcessor")
    else:
        sr = _hf_source_function("qwen2_vl/video_processing_qwen2_vl.py", "smart_resize")
        rh, rw = sr(h, w, factor=factor, min_pixels=min_px, max_pixels=max_px)
        patchify = _hf_source_function("qwen2_vl/video_processing_qwen2_vl.py", "patchify", "Qwen2VLVideoProcessor")
    x = torch.from_numpy(video).permute(0, 3, 1, 2).contiguous()
    x = F.interpolate(x, size=[rh, rw], mode="bicubic", align_corners=False, antialias=True)
    mean = torch.tensor(cfg.get("image_mean", ours.OPENAI_CLIP_MEAN if version != "qwen3_vl" else [0.5] * 3)) * 255.0
    std = torch.tensor(cfg.get("image_std", ours.OPENAI_CLIP_STD if version != "qwen3_vl" else [0.5] * 3)) * 255.0
    x = (x.to(torch.float32) - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)
    ref, gt, gh, gw = patchify(x[None], patch_size=patch, merge_size=2, temporal_patch_size=2)

    item = _ours(version, our_tok).process_video(video, None, "v")
    assert item.inputs["video_grid_thw"].tolist() == [[gt, gh, gw]]
    assert (item.inputs["pixel_values_videos"] - ref[0]).abs().max().item() <= 1e-6
    pil_item = _ours(version, our_tok).process_video([Image.fromarray(f) for f in video], None, "v")
    assert torch.equal(pil_item.inputs["pixel_values_videos"], item.inputs["pixel_values_videos"])


def test_qwen3_video_needs_two_frames(our_tok):
    with pytest.raises(MediaError):
        _ours("qwen3_vl", our_tok).process_video([_rng_image(64, 64)], 2.0, "v")


def test_video_config_precedence(our_tok):
    """transformers: processor_config["video_processor"] (or video_preprocessor_config.json) over the image config."""
    vcfg = dict(CONFIGS["qwen2_vl"], max_pixels=28 * 28 * 4)
    p = ours.Qwen2VLProcessor(CONFIGS["qwen2_vl"], _hf_config("qwen2_vl", our_tok), our_tok,
                              {"video_processor": vcfg})
    assert p.video_settings.max_pixels == 28 * 28 * 4 and p.image_settings.max_pixels == 28 * 28 * 24
    p = ours.Qwen2VLProcessor(CONFIGS["qwen2_vl"], _hf_config("qwen2_vl", our_tok), our_tok,
                              video_preprocessor_config=vcfg)
    assert p.video_settings.max_pixels == 28 * 28 * 4
    q3 = ours.Qwen2VLProcessor({}, {"model_type": "qwen3_vl"}, our_tok)   # class defaults
    assert (q3.video_settings.patch_size, q3.video_settings.min_pixels, q3.video_settings.image_mean) == \
        (16, 128 * 32 * 32, (0.5, 0.5, 0.5))
    assert q3.image_settings.patch_size == 14   # Qwen2VLImageProcessor's default (Qwen3 configs set 16)


# ---- placeholder expansion ---------------------------------------------------------------------------

IMG, VID = "<|vision_start|><|image_pad|><|vision_end|>", "<|vision_start|><|video_pad|><|vision_end|>"
PROMPTS = [  # (text, image sizes, videos as (frames, h, w, fps))
    ("<|im_start|>user\nno media here<|im_end|>\n", [], []),
    (f"<|im_start|>user\n{IMG}What is this?<|im_end|>\n<|im_start|>assistant\n", [(37, 90)], []),
    (f"two: {IMG} and {IMG}, compare", [(60, 40), (29, 29)], []),
    (f"clip {VID} what happens?", [], [(4, 56, 84, 2.0)]),
    (f"{IMG} first, then {VID} and {IMG} {VID}end", [(50, 50), (80, 30)], [(3, 40, 70, None), (6, 64, 64, 3.0)]),
]


def _media(images, videos):
    pil = [_rng_image(h, w, seed=i) for i, (h, w) in enumerate(images)]
    vids = [[_rng_image(h, w, seed=10 * j + k) for k in range(t)] for j, (t, h, w, _) in enumerate(videos)]
    return pil, vids


def _run_both(version, text, images, videos, our_tok, hf_tok):
    """(our expanded ids, our items, HF processor output) for one prompt."""
    proc = _ours(version, our_tok)
    pil, vids = _media(images, videos)
    items = [proc.process_image(im, f"i{i}") for i, im in enumerate(pil)]
    items += [proc.process_video(v, fps, f"v{j}") for j, (v, (_, _, _, fps)) in enumerate(zip(vids, videos))]
    ids = proc.expand(our_tok.encode(text), items)
    fake = _FakeVideoProcessor([it.inputs["video_grid_thw"][0].tolist() for it in items if it.modality == "video"],
                               [fps for *_, fps in videos])
    kw = {"images": pil} if pil else {}
    if vids:
        kw["videos"] = vids
    hf = _hf_processor(version, hf_tok, fake)(text=[text], return_tensors="pt", **kw)
    return ids, items, hf


@pytest.mark.parametrize("version", list(CONFIGS))
@pytest.mark.parametrize("case", range(len(PROMPTS)))
def test_expand_matches_hf_processor(version, case, our_tok, hf_tok):
    text, images, videos = PROMPTS[case]
    ids, items, hf = _run_both(version, text, images, videos, our_tok, hf_tok)
    assert ids == hf["input_ids"][0].tolist()
    image_id, video_id = our_tok.token_to_id("<|image_pad|>"), our_tok.token_to_id("<|video_pad|>")
    for item in items:
        pos = item.placeholder.embed_positions()
        assert len(pos) == item.num_embeds
        assert all(ids[p] == (image_id if item.modality == "image" else video_id) for p in pos)
    # every placeholder token belongs to exactly one item, in order
    covered = sorted(p for it in items for p in it.placeholder.embed_positions())
    assert covered == [i for i, t in enumerate(ids) if t in (image_id, video_id)]
    if version == "qwen2_5_vl" and videos:
        ours_spg = [float(it.inputs["second_per_grid_ts"][0]) for it in items if it.modality == "video"]
        assert ours_spg == pytest.approx(hf["second_per_grid_ts"].tolist(), abs=0)


def test_qwen3_video_placeholder_covers_timestamps(our_tok):
    proc = _ours("qwen3_vl", our_tok)
    item = proc.process_video([_rng_image(64, 64, seed=k) for k in range(4)], 2.0, "v")
    ids = proc.expand(our_tok.encode(f"a {VID} b"), [item])
    ph = item.placeholder
    text = our_tok.decode(ids[ph.offset:ph.offset + ph.length], skip_special_tokens=False)
    # the text before the first timestamp is tokenized with it (as transformers >= 5.25 does), so
    # the run starts there
    assert text.startswith("a <0.2 seconds><|vision_start|><|video_pad|>") and text.endswith("<|vision_end|>")
    assert "<1.2 seconds>" in text and ph.num_embeds == item.num_embeds
    assert item.extra["timestamps"] == [0.25, 1.25]


@pytest.mark.parametrize("version", list(CONFIGS))
def test_expand_count_mismatch(version, our_tok, hf_tok):
    proc = _ours(version, our_tok)
    image = _rng_image(40, 40)
    text = f"{IMG} and {IMG}"
    with pytest.raises(ValueError):   # HF refuses too
        _hf_processor(version, hf_tok)(text=[text], images=[image])
    with pytest.raises(MediaError):
        proc.expand(our_tok.encode(text), [proc.process_image(image, "h")])
    with pytest.raises(MediaError):
        proc.expand(our_tok.encode("no placeholder"), [proc.process_image(image, "h")])
    video = proc.process_video([image, image], 2.0, "v")
    with pytest.raises(MediaError):
        proc.expand(our_tok.encode(f"{IMG}"), [proc.process_image(image, "h"), video])


# ---- M-RoPE ------------------------------------------------------------------------------------------

def _tiny_model(version: str, vocab: int):
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
    )

    text = {"vocab_size": vocab, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1, "bos_token_id": 0, "eos_token_id": 0,
            "pad_token_id": 0,
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}}
    vision = {"depth": 1, "hidden_size": 32, "num_heads": 2}
    torch.manual_seed(0)
    if version == "qwen2_vl":
        cfg = Qwen2VLConfig(text_config=text, vision_config={**vision, "embed_dim": 32, "mlp_ratio": 2})
        return Qwen2VLForConditionalGeneration(cfg).eval()
    vision.update(out_hidden_size=32, intermediate_size=64)
    if version == "qwen2_5_vl":
        cfg = Qwen2_5_VLConfig(text_config=text, vision_config={**vision, "tokens_per_second": 2,
                                                                "fullatt_block_indexes": [0]})
        return Qwen2_5_VLForConditionalGeneration(cfg).eval()
    text = {**text, "head_dim": 16, "rope_parameters": {**text["rope_parameters"], "mrope_interleaved": True}}
    cfg = Qwen3VLConfig(text_config=text, vision_config={**vision, "patch_size": 16, "deepstack_visual_indexes": [0],
                                                         "num_position_embeddings": 16})
    return Qwen3VLForConditionalGeneration(cfg).eval()


@pytest.fixture(scope="module")
def tiny_models(our_tok):
    return {v: _tiny_model(v, len(our_tok)) for v in CONFIGS}


MROPE_PROMPTS = PROMPTS + [
    # long videos at a low fps: Qwen2.5-VL's time positions run past the spatial ones
    (f"see {VID} then {IMG} ok", [(33, 70)], [(8, 40, 40, 1.0)]),
    (f"{VID}{VID}", [], [(6, 30, 90, 3.0), (2, 90, 30, 0.5)]),
]


@pytest.mark.parametrize("version", list(CONFIGS))
@pytest.mark.parametrize("case", range(len(MROPE_PROMPTS)))
def test_mrope_matches_hf_get_rope_index(version, case, our_tok, hf_tok, tiny_models):
    text, images, videos = MROPE_PROMPTS[case]
    ids, items, hf = _run_both(version, text, images, videos, our_tok, hf_tok)
    assert ids == hf["input_ids"][0].tolist()
    kw = {k: hf[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if k in hf}
    hf_pos, hf_delta = tiny_models[version].model.get_rope_index(hf["input_ids"], hf["mm_token_type_ids"], **kw)
    tps = 2 if version == "qwen2_5_vl" else None
    pos, delta = mrope_positions(ids, items, 2, tps, version)
    assert pos.dtype == torch.long and pos.shape == (3, len(ids))
    assert torch.equal(pos, hf_pos[:, 0])
    assert delta == int(hf_delta[0, 0])
    pos2, delta2 = _ours(version, our_tok).positions(ids, items)
    assert torch.equal(pos2, pos) and delta2 == delta


@pytest.mark.parametrize("version", list(CONFIGS))
def test_decode_positions_match_hf(version, our_tok, hf_tok, tiny_models):
    text, images, videos = PROMPTS[4]
    ids, items, _hf = _run_both(version, text, images, videos, our_tok, hf_tok)
    _, delta = mrope_positions(ids, items, 2, 2 if version == "qwen2_5_vl" else None, version)
    model = tiny_models[version].model
    model.rope_deltas = torch.tensor([[delta]])
    cache = SimpleNamespace(get_seq_length=lambda: len(ids))
    hf_pos = model.compute_3d_position_ids(input_ids=None, image_grid_thw=None, video_grid_thw=None,
                                           inputs_embeds=torch.zeros(1, 3, 32), attention_mask=None, cache=cache)
    model.rope_deltas = None
    assert torch.equal(decode_positions(delta, len(ids), 3), hf_pos[:, 0])


def test_mrope_advance_past_video_time():
    """The reference-code rule: text after a block starts at the block's max position + 1."""
    grid = torch.tensor([[4, 4, 4]])   # 4 time steps, 2 x 2 merged
    item = MMItem("video", "h", {"video_grid_thw": grid, "second_per_grid_ts": torch.tensor([1.0])}, 16,
                  PlaceholderRange(2, 16))
    ids = [0] * 2 + [9] * 16 + [0] * 3
    hf_rule, d1 = mrope_positions(ids, [item], 2, 2, "qwen2_5_vl")
    ref_rule, d2 = mrope_positions(ids, [item], 2, 2, "qwen2_5_vl", advance_past_video_time=True)
    assert hf_rule[0, 2:18].unique().tolist() == [2, 4, 6, 8]          # t = 2 + 2 * step
    assert hf_rule[:, 18].tolist() == [4, 4, 4]                         # 2 + max(h, w)
    assert ref_rule[:, 18].tolist() == [9, 9, 9] and d2 == 12 - 21      # max (8) + 1
    assert d1 == 8 + 1 - 21
    text_only, d0 = mrope_positions([5, 6, 7], [], 2)
    assert text_only.tolist() == [[0, 1, 2]] * 3 and d0 == 0
