"""Gemma 3 preprocessing against transformers' Gemma3ImageProcessorPil and Gemma3Processor: pixel
values with pan-and-scan on and off for odd image sizes and modes, and the expanded prompt ids (the
"\\n\\n" around each image merge with neighbouring text in BPE) for prompts with 0, 1 and 2 images,
over a byte-level BPE and a Metaspace ("▁", prepend first) BPE, both adding <bos>."""
from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import AutoTokenizer
from transformers import Gemma3Processor as HFGemma3Processor
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

from mistralpy.multimodal.inputs import MediaError
from mistralpy.multimodal.processors.gemma3 import Gemma3Processor
from mistralpy.tokenizer.tokenizer import Tokenizer

TOKENS = 3          # soft tokens per view (small so the expected ids stay readable)
SIZE = {"height": 64, "width": 64}
PAS = {"pan_and_scan_min_crop_size": 32, "pan_and_scan_max_num_crops": 4, "pan_and_scan_min_ratio_to_activate": 1.2}
SPECIALS = ["<bos>", "<eos>", "<start_of_image>", "<image_soft_token>", "<end_of_image>", "<start_of_turn>",
            "<end_of_turn>"]


# ------------------------------------------------------------------------------------ fixtures
def _metaspace_backend():
    """A small BPE over "▁"-joined words (SentencePiece style, like Gemma's), trained here."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTok(models.BPE(byte_fallback=False, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    corpus = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(stdlib.glob("*.py"))[:40]]
    alphabet = [chr(c) for c in range(32, 127)] + ["\n", "\t", "▁"]
    trainer = trainers.BpeTrainer(vocab_size=1500, initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


def _save(tok, out: Path) -> Path:
    from tokenizers import AddedToken, processors

    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                       special_tokens=[("<bos>", tok.token_to_id("<bos>"))])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
           "pad_token": None, "unk_token": None,
           "extra_special_tokens": {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                    "image_token": "<image_soft_token>"}}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module", params=["byte_level", "metaspace"])
def gemma_tok_dir(request, tokenizer_dir, tmp_path_factory) -> Path:
    from tokenizers import Tokenizer as HFTok

    tok = HFTok.from_file(str(tokenizer_dir / "tokenizer.json")) if request.param == "byte_level" \
        else _metaspace_backend()
    return _save(tok, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def gemma_tok(tokenizer_dir, tmp_path_factory) -> Tokenizer:
    from tokenizers import Tokenizer as HFTok

    return Tokenizer.from_dir(_save(HFTok.from_file(str(tokenizer_dir / "tokenizer.json")),
                                    tmp_path_factory.mktemp("gemma_bl")))


def _noise(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    bands = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    a = rng.integers(0, 256, size=(h, w, bands), dtype=np.uint8)
    return Image.fromarray(a[..., 0] if bands == 1 else a, mode)


def _palette() -> Image.Image:
    im = _noise(71, 43, seed=3).quantize(colors=16)
    im.info["transparency"] = 5
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
    "wide": lambda: _noise(200, 64, seed=8),   # 3 crops of 67 px
}


def _ours(tok: Tokenizer, pan_and_scan: bool, **pp) -> Gemma3Processor:
    config = {"size": SIZE, "resample": 2, "do_pan_and_scan": pan_and_scan, **PAS, **pp}
    return Gemma3Processor(config, {}, tok, {"image_seq_length": TOKENS})


# ---------------------------------------------------------------------------------------- pixels
@pytest.mark.parametrize("name", list(IMAGES))
@pytest.mark.parametrize("pan_and_scan", [False, True])
def test_gemma3_pixels_match_transformers(name, pan_and_scan, gemma_tok):
    image = IMAGES[name]()
    ref = Gemma3ImageProcessorPil(size=SIZE)(images=[image], do_pan_and_scan=pan_and_scan, return_tensors="np", **PAS)
    item = _ours(gemma_tok, pan_and_scan).process_image(image, "h")
    ours, theirs = item.inputs["pixel_values"].numpy(), ref["pixel_values"]
    assert ours.shape == theirs.shape and ours.dtype == np.float32
    assert np.abs(ours.astype(np.float64) - theirs).max() <= 1e-6
    assert item.extra["num_crops"] == int(ref["num_crops"][0])
    assert item.num_embeds == ours.shape[0] * TOKENS


def test_gemma3_pan_and_scan_crops():
    from mistralpy.multimodal.processors.gemma3 import pan_and_scan

    img = np.zeros((3, 37, 500), np.uint8)
    assert [c.shape for c in pan_and_scan(img, 32, 4, 1.2)] == [(3, 37, 125)] * 4   # capped at 4
    assert pan_and_scan(img, 256, 4, 1.2) == []            # crops would be under 256 px
    assert pan_and_scan(np.zeros((3, 60, 64), np.uint8), 8, 4, 1.2) == []   # not elongated enough


def test_gemma3_hash_and_defaults(gemma_tok):
    image = IMAGES["500x37"]()
    a = _ours(gemma_tok, False).process_image(image, "h")
    b = _ours(gemma_tok, True).process_image(image, "h")
    assert a.hash != b.hash and b.extra["num_crops"] > 0
    # The released configs leave pan-and-scan null: Gemma3Processor's defaults (off, 256, 4, 1.2).
    null = {"do_pan_and_scan": None, "pan_and_scan_min_crop_size": None, "pan_and_scan_max_num_crops": None,
            "pan_and_scan_min_ratio_to_activate": None}
    p = Gemma3Processor({"size": SIZE, **null}, {"mm_tokens_per_image": 7}, gemma_tok)
    assert p.pas == {"do_pan_and_scan": False, "pan_and_scan_min_crop_size": 256, "pan_and_scan_max_num_crops": 4,
                     "pan_and_scan_min_ratio_to_activate": 1.2}
    assert p.tokens_per_image == 7


# ------------------------------------------------------------------------------------- expansion
PROMPTS = [
    ("<start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n", []),
    ("<start_of_turn>user\n<start_of_image>Describe this.<end_of_turn>\n<start_of_turn>model\n", ["500x37"]),
    ("<start_of_image>", ["1x1"]),
    ("Hi:<start_of_image>there", ["wide"]),
    ("Compare\n\n<start_of_image> with <start_of_image>\n\nplease", ["1024x768", "37x500"]),
    ("<start_of_image><start_of_image>", ["wide", "1x1"]),
    ("a <start_of_image>\nb<start_of_image>c", ["grey", "4000x30"]),
]


@pytest.mark.parametrize("pan_and_scan", [False, True])
@pytest.mark.parametrize("prompt,names", PROMPTS)
def test_gemma3_expansion_matches_transformers(prompt, names, pan_and_scan, gemma_tok_dir):
    hf_tok = AutoTokenizer.from_pretrained(str(gemma_tok_dir))
    hf = HFGemma3Processor(image_processor=Gemma3ImageProcessorPil(size=SIZE), tokenizer=hf_tok,
                           image_seq_length=TOKENS)
    images = [IMAGES[n]() for n in names]
    kwargs = {"do_pan_and_scan": True, **PAS} if pan_and_scan else {}
    ref = hf(text=[prompt], images=[images] if images else None, **kwargs)
    expected = list(ref["input_ids"][0])

    tok = Tokenizer.from_dir(gemma_tok_dir)
    ours = _ours(tok, pan_and_scan)
    items = [ours.process_image(im, f"h{i}") for i, im in enumerate(images)]
    got = ours.expand(tok.encode(prompt), items)
    assert got == expected

    soft, boi, eoi = (tok.token_to_id(t) for t in ("<image_soft_token>", "<start_of_image>", "<end_of_image>"))
    positions = [p for it in items for p in it.placeholder.embed_positions()]
    assert positions == [i for i, t in enumerate(expected) if t == soft]
    for it in items:
        r = it.placeholder
        assert got[r.offset] == boi and got[r.offset + r.length - 1] == eoi
        assert r.num_embeds == it.num_embeds == (1 + it.extra["num_crops"]) * TOKENS
        assert got[r.offset:r.offset + r.length].count(boi) == 1 + it.extra["num_crops"]


def test_gemma3_newlines_merge_with_neighbouring_text(gemma_tok):
    # "\n\n" tokenizes differently beside "there" than alone: splicing its standalone ids would differ.
    assert gemma_tok.encode("\n\nthere", False) != gemma_tok.encode("\n\n", False) + gemma_tok.encode("there", False)
    ours = _ours(gemma_tok, False)
    item = ours.process_image(IMAGES["1x1"](), "h")
    got = ours.expand(gemma_tok.encode("<start_of_image>there"), [item])
    eoi = gemma_tok.token_to_id("<end_of_image>")
    assert got[got.index(eoi) + 1:] == gemma_tok.encode("\n\nthere", False)


def test_gemma3_count_mismatch(gemma_tok_dir):
    hf = HFGemma3Processor(image_processor=Gemma3ImageProcessorPil(size=SIZE),
                           tokenizer=AutoTokenizer.from_pretrained(str(gemma_tok_dir)), image_seq_length=TOKENS)
    image = IMAGES["1x1"]()
    with pytest.raises(ValueError):
        hf(text=["<start_of_image> and <start_of_image>"], images=[[image]])
    tok = Tokenizer.from_dir(gemma_tok_dir)
    ours = _ours(tok, False)
    item = ours.process_image(image, "h")
    with pytest.raises(MediaError, match="2 image placeholder"):
        ours.expand(tok.encode("<start_of_image> and <start_of_image>"), [item])
    with pytest.raises(MediaError, match="1 image placeholder"):
        ours.expand(tok.encode("<start_of_image>"), [])


def test_tokenizer_without_image_tokens_serves_text_only(tokenizer_dir):
    tok = Tokenizer.from_dir(tokenizer_dir)
    ours = Gemma3Processor({"size": SIZE}, {"boi_token_index": 255999, "mm_tokens_per_image": 4}, tok)
    ids = tok.encode("hello")
    assert ours.expand(ids, []) == ids
    with pytest.raises(MediaError, match="cannot take images"):
        ours.process_image(IMAGES["1x1"](), "h")
