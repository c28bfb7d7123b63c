"""Idefics3 / SmolVLM and Idefics2 preprocessing against transformers' PIL image processors and
processors: pixel values, masks and tile grids for odd image sizes and modes, and the expanded
prompt ids (with each item's placeholder range) for prompts with 0, 1 and 2 images."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import AutoTokenizer
from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

from mistralpy.multimodal.inputs import MediaError
from mistralpy.multimodal.processors.idefics2 import Idefics2Processor
from mistralpy.multimodal.processors.idefics3 import Idefics3Processor
from mistralpy.tokenizer.tokenizer import Tokenizer

SEQ_LEN = 4   # <image> tokens per tile (small so the expected ids stay readable)
I3_PP = {"size": {"longest_edge": 128}, "max_image_size": {"longest_edge": 64}}
I2_SIZE = {"shortest_edge": 32, "longest_edge": 64}
ROW_COL = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]


# ------------------------------------------------------------------------------------ fixtures
def build_tokenizer_dir(base: Path, out: Path, specials: list[str], config: dict | None = None,
                        tokenizer_file: str = "tokenizer.json") -> Path:
    """``base``'s tokenizer (the session's byte-level BPE) with ``specials`` added as special tokens,
    saved as a HF folder."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTok

    tok = HFTok.from_file(str(base / tokenizer_file))
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
           "bos_token": None, "unk_token": None, **(config or {})}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    return out


def _idefics_tok_dir(kind: str, tokenizer_dir: Path, tmp_path_factory) -> Path:
    specials = ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]
    if kind == "row_col_added":
        specials += ["<global-img>", *ROW_COL]
    return build_tokenizer_dir(tokenizer_dir, tmp_path_factory.mktemp(kind), specials)


@pytest.fixture(scope="module", params=["row_col_added", "row_col_text"])
def idefics_tok_dir(request, tokenizer_dir, tmp_path_factory) -> Path:
    """SmolVLM-like (row / column / global markers are added tokens) or not (they are plain text)."""
    return _idefics_tok_dir(request.param, tokenizer_dir, tmp_path_factory)


def _legacy_sentencepiece_backend():
    """A small BPE with Llama's legacy pipeline (Prepend("▁") + Replace normalizer, no pre-tokenizer,
    Strip decoder), as Idefics2's Mistral tokenizer has; trained over "▁"-split words for speed."""
    import sysconfig

    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    corpus = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(stdlib.glob("*.py"))[:40]]
    alphabet = [chr(c) for c in range(32, 127)] + ["\n", "\t", "▁"]
    tok.train_from_iterator(corpus, trainer=trainers.BpeTrainer(vocab_size=1500, initial_alphabet=alphabet,
                                                                show_progress=False))
    tok.pre_tokenizer = None
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return tok


@pytest.fixture(scope="module", params=["byte_level", "legacy_sentencepiece"])
def idefics2_tok_dir(request, tokenizer_dir, tmp_path_factory) -> Path:
    specials = ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]
    out = tmp_path_factory.mktemp(request.param)
    if request.param == "byte_level":
        return build_tokenizer_dir(tokenizer_dir, out, specials)
    _legacy_sentencepiece_backend().save(str(out / "base.json"))
    return build_tokenizer_dir(out, out, specials, tokenizer_file="base.json")


@pytest.fixture(scope="module")
def smol_tok(tokenizer_dir, tmp_path_factory) -> Tokenizer:
    return Tokenizer.from_dir(_idefics_tok_dir("row_col_added", tokenizer_dir, tmp_path_factory))


def _noise(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    bands = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    a = rng.integers(0, 256, size=(h, w, bands), dtype=np.uint8)
    return Image.fromarray(a[..., 0] if bands == 1 else a, mode)


def _palette() -> Image.Image:
    im = _noise(71, 43, seed=3).quantize(colors=16)
    im.info["transparency"] = 5   # one palette entry is transparent
    return im


IMAGES = {
    "1x1": lambda: _noise(1, 1),
    "37x500": lambda: _noise(37, 500, seed=1),
    "500x37": lambda: _noise(500, 37, seed=2),
    "4000x30": lambda: _noise(4000, 30, seed=4),
    "1024x768": lambda: _noise(1024, 768, seed=5),
    "rgba": lambda: _noise(90, 61, "RGBA", seed=6),
    "palette": _palette,
    "grey": lambda: _noise(77, 53, "L", seed=7),
}


def _close(ours, theirs) -> None:
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert ours.shape == theirs.shape
    assert np.abs(ours.astype(np.float64) - theirs.astype(np.float64)).max() <= 1e-6


# ------------------------------------------------------------------------------- Idefics3 pixels
@pytest.mark.parametrize("name", list(IMAGES))
@pytest.mark.parametrize("hf_cls,split", [(Idefics3ImageProcessorPil, True), (SmolVLMImageProcessorPil, True),
                                          (SmolVLMImageProcessorPil, False)])
def test_idefics3_pixels_match_transformers(name, hf_cls, split, smol_tok):
    image = IMAGES[name]()
    pp = {**I3_PP, "do_image_splitting": split}
    ref = hf_cls(**pp)(images=[[image]], return_tensors="np", return_row_col_info=split)
    ours = Idefics3Processor(pp, {}, smol_tok, {"image_seq_len": SEQ_LEN})
    item = ours.process_image(image, "h")
    _close(item.inputs["pixel_values"].numpy(), ref["pixel_values"][0])
    assert item.inputs["pixel_values"].dtype.is_floating_point and item.inputs["pixel_values"].shape[1] == 3
    np.testing.assert_array_equal(item.inputs["pixel_attention_mask"].numpy(), ref["pixel_attention_mask"][0])
    rows, cols = (ref["rows"][0][0], ref["cols"][0][0]) if split else (0, 0)
    assert (item.extra["rows"], item.extra["cols"]) == (rows, cols)
    assert item.num_embeds == ref["pixel_values"].shape[1] * SEQ_LEN


@pytest.mark.parametrize("name", ["500x37", "grey"])
def test_fixed_sizes_and_scalar_mean_match_transformers(name, smol_tok):
    image = IMAGES[name]()
    pp = {"size": {"height": 100, "width": 70}, "max_image_size": {"longest_edge": 64}, "image_mean": 0.3,
          "image_std": 0.2}
    ref = Idefics3ImageProcessorPil(**pp)(images=[[image]], return_tensors="np")
    item = Idefics3Processor(pp, {}, smol_tok, {"image_seq_len": SEQ_LEN}).process_image(image, "h")
    _close(item.inputs["pixel_values"].numpy(), ref["pixel_values"][0])
    pp2 = {"size": {"height": 40, "width": 30}, "do_image_splitting": True, "image_mean": 0.3, "image_std": 0.2}
    ref = Idefics2ImageProcessorPil(**pp2)(images=[[image]], return_tensors="np")
    item = Idefics2Processor(pp2, {}, smol_tok, {"image_seq_len": SEQ_LEN}).process_image(image, "h")
    _close(item.inputs["pixel_values"].numpy(), ref["pixel_values"][0])
    np.testing.assert_array_equal(item.inputs["pixel_attention_mask"].numpy(), ref["pixel_attention_mask"][0])


def test_idefics3_hash_follows_settings(smol_tok):
    tok = smol_tok
    image = IMAGES["500x37"]()
    a = Idefics3Processor(I3_PP, {}, tok, {"image_seq_len": SEQ_LEN}).process_image(image, "h")
    b = Idefics3Processor({**I3_PP, "max_image_size": {"longest_edge": 32}}, {}, tok,
                          {"image_seq_len": SEQ_LEN}).process_image(image, "h")
    c = Idefics3Processor(I3_PP, {}, tok, {"image_seq_len": SEQ_LEN}).process_image(image, "other")
    assert len({a.hash, b.hash, c.hash}) == 3


def test_idefics3_image_seq_len_from_config(smol_tok):
    # SmolVLM-256M: 512 / 16 = 32 patches a side, pixel shuffle 4 -> 64 tokens a tile.
    hf = {"scale_factor": 4, "vision_config": {"image_size": 512, "patch_size": 16}}
    assert Idefics3Processor({}, hf, smol_tok).image_seq_len == 64


# ---------------------------------------------------------------------------- Idefics3 expansion
def _hf_idefics3(kind: str, tok_dir: Path, monkeypatch):
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    if kind == "idefics3":
        from transformers import Idefics3Processor as HF

        return HF(image_processor=Idefics3ImageProcessorPil(**I3_PP), tokenizer=tok, image_seq_len=SEQ_LEN)
    import transformers.models.smolvlm.processing_smolvlm as smolvlm
    from transformers import SmolVLMProcessor as HF
    from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

    # num2words (videos only) is not installed, and without torchvision transformers' video-processor
    # registry is a stub its class check trips on: both only concern videos.
    monkeypatch.setattr(smolvlm, "num2words", str, raising=False)
    check = HF.check_argument_for_proper_class
    monkeypatch.setattr(HF, "check_argument_for_proper_class",
                        lambda self, name, arg: None if name == "video_processor" else check(self, name, arg))
    return HF(image_processor=SmolVLMImageProcessorPil(**I3_PP), tokenizer=tok,
              video_processor=SmolVLMVideoProcessor(), image_seq_len=SEQ_LEN)


IDEFICS3_PROMPTS = [
    ("User: hello<end_of_utterance>\nAssistant:", []),
    ("<|im_start|>User:<image>Describe this image.<end_of_utterance>\nAssistant:", ["500x37"]),
    ("<image>", ["1x1"]),
    ("Look:\n<image> and\n\n<image>!\n\n", ["1024x768", "37x500"]),
    ("<image><image>tail", ["4000x30", "1x1"]),
]


@pytest.mark.parametrize("kind", ["idefics3", "smolvlm"])
@pytest.mark.parametrize("prompt,names", IDEFICS3_PROMPTS)
def test_idefics3_expansion_matches_transformers(kind, prompt, names, idefics_tok_dir, monkeypatch):
    hf = _hf_idefics3(kind, idefics_tok_dir, monkeypatch)
    images = [IMAGES[n]() for n in names]
    ref = hf(text=[prompt], images=[images] if images else None)
    expected = list(ref["input_ids"][0])

    tok = Tokenizer.from_dir(idefics_tok_dir)
    ours = Idefics3Processor(I3_PP, {}, tok, {"image_seq_len": SEQ_LEN})
    items = [ours.process_image(im, f"h{i}") for i, im in enumerate(images)]
    got = ours.expand(tok.encode(prompt), items)
    assert got == expected

    image_id = tok.token_to_id("<image>")
    fake_id = tok.token_to_id("<fake_token_around_image>")
    positions = [p for it in items for p in it.placeholder.embed_positions()]
    assert positions == [i for i, t in enumerate(expected) if t == image_id]
    for it in items:
        r = it.placeholder
        assert got[r.offset] == fake_id and got[r.offset + r.length - 1] == fake_id
        assert r.num_embeds == it.num_embeds
        if it.extra["rows"]:   # markers and newlines inside the run keep their own embeddings
            assert not all(r.embed_mask)
    if len(items) == 2:
        assert items[0].placeholder.offset + items[0].placeholder.length <= items[1].placeholder.offset


def test_idefics3_count_mismatch(idefics_tok_dir, monkeypatch):
    hf = _hf_idefics3("idefics3", idefics_tok_dir, monkeypatch)
    prompt = "a<image>b<image>"
    with pytest.raises(ValueError):
        hf(text=[prompt], images=[[IMAGES["1x1"]()]])
    tok = Tokenizer.from_dir(idefics_tok_dir)
    ours = Idefics3Processor(I3_PP, {}, tok, {"image_seq_len": SEQ_LEN})
    item = ours.process_image(IMAGES["1x1"](), "h")
    with pytest.raises(MediaError, match="2 image placeholder"):
        ours.expand(tok.encode(prompt), [item])
    with pytest.raises(MediaError):
        ours.expand(tok.encode("no image here"), [item])


# -------------------------------------------------------------------------------- Idefics2 pixels
@pytest.mark.parametrize("name", list(IMAGES))
@pytest.mark.parametrize("split", [False, True])
def test_idefics2_pixels_match_transformers(name, split, smol_tok):
    image = IMAGES[name]()
    pp = {"size": I2_SIZE, "do_image_splitting": split}
    ours = Idefics2Processor(pp, {}, smol_tok, {"image_seq_len": SEQ_LEN})
    try:
        ref = Idefics2ImageProcessorPil(**pp)(images=[[image]], return_tensors="np")
    except ZeroDivisionError:   # a 1-pixel-high image cannot be split into quarters
        with pytest.raises(MediaError):
            ours.process_image(image, "h")
        return
    item = ours.process_image(image, "h")
    _close(item.inputs["pixel_values"].numpy(), ref["pixel_values"][0])
    np.testing.assert_array_equal(item.inputs["pixel_attention_mask"].numpy(), ref["pixel_attention_mask"][0])
    assert item.num_embeds == (5 if split else 1) * SEQ_LEN


def test_idefics2_pads_frames_of_one_image():
    # 4 quarters of a 3x5 image differ in size: padded to the largest, the mask marks the real pixels.
    image = _noise(5, 3, seed=9)
    pp = {"do_resize": False, "do_image_splitting": True}
    ref = Idefics2ImageProcessorPil(**pp)(images=[[image]], return_tensors="np")
    from mistralpy.multimodal.processors.idefics2 import idefics2_frames
    from mistralpy.multimodal.processors.idefics3 import pad_tiles

    pixels, mask = pad_tiles(idefics2_frames(image, pp))
    _close(pixels.numpy(), ref["pixel_values"][0])
    np.testing.assert_array_equal(mask.numpy(), ref["pixel_attention_mask"][0])
    assert not mask.all()


# ----------------------------------------------------------------------------- Idefics2 expansion
IDEFICS2_PROMPTS = [
    ("User: hi<end_of_utterance>\nAssistant:", 0),
    ("User:<image>Describe this<end_of_utterance>\nAssistant:", 1),
    ("<image>", 1),
    ("<image>\nwhat? <image> ok", 2),
    ("Two:<image><image>there", 2),
    ("<image><end_of_utterance> x", 1),
]


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("prompt,n", IDEFICS2_PROMPTS)
def test_idefics2_expansion_matches_transformers(prompt, n, split, idefics2_tok_dir):
    from transformers import Idefics2Processor as HF

    pp = {"size": I2_SIZE, "do_image_splitting": split}
    hf = HF(image_processor=Idefics2ImageProcessorPil(**pp),
            tokenizer=AutoTokenizer.from_pretrained(str(idefics2_tok_dir)), image_seq_len=SEQ_LEN)
    images = [IMAGES["500x37"]() for _ in range(n)]
    ref = hf(text=[prompt], images=[images] if images else None)
    expected = list(ref["input_ids"][0])

    tok = Tokenizer.from_dir(idefics2_tok_dir)
    ours = Idefics2Processor(pp, {}, tok, {"image_seq_len": SEQ_LEN})
    items = [ours.process_image(im, "h") for im in images]
    got = ours.expand(tok.encode(prompt), items)
    assert got == expected
    image_id = tok.token_to_id("<image>")
    positions = [p for it in items for p in it.placeholder.embed_positions()]
    assert positions == [i for i, t in enumerate(expected) if t == image_id]
    assert all(it.placeholder.num_embeds == it.num_embeds for it in items)


def test_idefics2_count_mismatch(smol_tok):
    tok = smol_tok
    ours = Idefics2Processor({"size": I2_SIZE}, {}, tok, {"image_seq_len": SEQ_LEN})
    with pytest.raises(MediaError, match="0 image placeholder"):
        ours.expand(tok.encode("no placeholder"), [ours.process_image(IMAGES["1x1"](), "h")])


def test_tokenizer_without_image_tokens_serves_text_only(tokenizer_dir):
    # A checkpoint whose tokenizer lacks the image tokens still loads; images are refused.
    tok = Tokenizer.from_dir(tokenizer_dir)
    ids = tok.encode("just <image> text")
    for proc in (Idefics3Processor(I3_PP, {}, tok, {"image_seq_len": SEQ_LEN}),
                 Idefics2Processor({"size": I2_SIZE}, {}, tok, {"image_seq_len": SEQ_LEN})):
        assert proc.expand(ids, []) == ids
        with pytest.raises(MediaError, match="cannot take images"):
            proc.process_image(IMAGES["1x1"](), "h")
