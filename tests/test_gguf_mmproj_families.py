"""Gemma 3, Qwen2-VL, Qwen2.5-VL and SmolVLM as llama.cpp ships them: a text GGUF (`gemma3`,
`qwen2vl`, `llama`) + an mmproj (projector types gemma3, qwen2vl_merger, qwen2.5vl_merger,
idefics3), written from the tiny transformers checkpoints of fixtures_vlm (fixtures_gguf_mmproj),
checked against llama.cpp's libmtmd and against our safetensors path for the same weights:

- image rows: ours vs libmtmd's (mtmd_encode_chunk), each tile / image chunk in prompt order, for
  an image at the model's size and for one libmtmd resizes (letterbox, tiles);
- prompt layout: our expanded ids equal libmtmd's chunks (text ids + one slot per image row), and
  for Qwen the M-RoPE positions end where libmtmd's n_past does;
- the last logits with libmtmd's image rows spliced in (so only the text side differs);
- GGUF vs safetensors: the same image rows, logprobs and greedy tokens for the same token ids.

libmtmd runs with f32 K/V and without flash attention (which casts K / V to f16 on CPU). Rows:
ours agree with transformers' in float64 to ~1e-6 of their largest value, libmtmd's to 3e-4 ..
1.5e-3 (ggml's fp16 GELU tables, the Qwen2-VL merger GELU in tanh form where transformers has erf,
Gemma 3's F16 projection with its input rounded to f16; a torch replay of those alone does not
close the gap: it is ggml's arithmetic in general, on fixtures whose weights are scaled up).
Logprobs with libmtmd's rows spliced in: 2e-7 (SmolVLM), 3e-5 (Qwen: as for text-only prompts),
1.6e-4 (Gemma 3: ggml's GELU table in the text MLP). Qwen2.5-VL: the mmproj has no window size and
clip.cpp uses 112 px, as we do; the fixture's is 56, so the checks that also involve transformers
use one 56 px image (2x2 merged rows: one window either way) with libmtmd's --image-min-tokens 4
(default minimum 8 rows) and ours alike; the resized image checks the 112 px windows on libmtmd.
The fixture mmproj files are checked to be byte-equal to llama.cpp's own converter's output.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fixtures_gguf_mmproj import (
    LLAMA_CPP_SRC,
    f16_rounded_copy,
    gguf_contents,
    llama_cpp_convert_mmproj,
    mtmd_run,
    write_vlm_gguf,
)
from fixtures_vlm import build_gemma3_vlm, build_idefics3, build_qwen2_vl
from PIL import Image

from mistralpy import Engine, SamplingParams
from mistralpy.errors import ModelLoadError

PROMPT = "Describe <__media__> briefly."
# family -> (image H, W, libmtmd/our minimum image tokens (0: default), the HF prompt's placeholder)
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
CASES = {"gemma3": (64, 64, 0, "<start_of_image>"), "qwen2vl": (56, 112, 0, QWEN_IMAGE),
         "qwen2.5vl": (56, 56, 4, QWEN_IMAGE), "smolvlm": (128, 128, 0, "<image>")}
ROWS_REL_TOL = 2.5e-3
LOGPROB_TOL = {"gemma3": 5e-4, "qwen2vl": 1e-4, "qwen2.5vl": 1e-4, "smolvlm": 1e-5}
# images libmtmd resizes: letterboxed (Gemma 3; Qwen, into 28 px multiples rounded as clip.cpp does:
# 140 x 56 for 126 x 42, where transformers' smart_resize gives 112 x 56), tiled (SmolVLM); for
# Qwen2.5-VL 140 x 336 px, 5 x 12 merged rows in clip.cpp's 4 x 4 windows (partial ones included)
RESIZED = {"gemma3": (90, 130), "qwen2vl": (126, 42), "qwen2.5vl": (150, 330), "smolvlm": (100, 60)}
LP = SamplingParams(temperature=0, max_tokens=1, logprobs=True, top_logprobs=5)
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def _rgb(h: int, w: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _build(family: str, out, tokenizer_dir):
    if family == "gemma3":
        return build_gemma3_vlm(out, tokenizer_dir)
    if family == "smolvlm":
        return build_idefics3(out, tokenizer_dir)
    return build_qwen2_vl(out, tokenizer_dir, version="qwen2_vl" if family == "qwen2vl" else "qwen2_5_vl")


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory, tokenizer_dir):
    return {f: _build(f, tmp_path_factory.mktemp(f.replace(".", "")), tokenizer_dir) for f in CASES}


@pytest.fixture(scope="module")
def converted(hf_dirs, tmp_path_factory):
    """Every family's mmproj as llama.cpp's convert_hf_to_gguf.py writes it (one process for all)."""
    if not (LLAMA_CPP_SRC / "convert_hf_to_gguf.py").exists():
        pytest.skip(f"no llama.cpp source at {LLAMA_CPP_SRC} (set LLAMA_CPP_SRC)")
    work = tmp_path_factory.mktemp("converted")
    return llama_cpp_convert_mmproj({f: (d, work / f"mmproj-{f}.gguf") for f, d in hf_dirs.items()}, work)


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory, hf_dirs):
    """(family, HF folder, text GGUF, mmproj, libmtmd's result, GGUF engine)."""
    pytest.importorskip("llama_cpp.mtmd_cpp")
    family = request.param
    h, w, min_tokens, _ = CASES[family]
    hf = hf_dirs[family]
    text, mmproj = write_vlm_gguf(hf, tmp_path_factory.mktemp(family.replace(".", "") + "-gguf"), family)
    oracle = mtmd_run(text, mmproj, PROMPT, _rgb(h, w), image_min_tokens=min_tokens, exact=True)
    with pytest.MonkeyPatch.context() as mp:
        # libmtmd decodes Gemma 3's image rows without the causal mask: our bidirectional runs
        mp.setenv("MISTRALPY_GEMMA3_IMAGE_ATTENTION", "bidirectional")
        with Engine(str(text), dtype="f32", num_kv_blocks=64, max_model_len=512) as eng:
            if min_tokens:
                eng.media.processor.pp["min_pixels"] = min_tokens * 28 * 28
            yield family, hf, text, mmproj, oracle, eng


def _request(eng, prompt, image: np.ndarray):
    return eng._prepare({"prompt": prompt, "images": [Image.fromarray(image)]}, LP)[1][0]


def test_fixture_mmproj_is_what_llama_cpp_converts(case, converted):
    """Our mmproj writer's file equals the converter's, key for key and byte for byte."""
    family, _, _, mmproj, _, _ = case
    ours, theirs = gguf_contents(mmproj), gguf_contents(converted[family])
    assert ours[0] == theirs[0]
    assert ours[1].keys() == theirs[1].keys()
    for name, t in theirs[1].items():
        assert ours[1][name] == t, name


def test_image_rows_and_layout_match_libmtmd(case):
    family, _, _, _, oracle, eng = case
    h, w = CASES[family][:2]
    req = _request(eng, PROMPT, _rgb(h, w))
    with torch.no_grad():
        ours = eng.core.runner.model.embed_multimodal(req.mm_items[0])
    ref = oracle["image_embeds"]
    assert ours.shape == ref.shape
    rel = ((ours - ref).abs().max() / ref.abs().max()).item()
    assert rel < ROWS_REL_TOL, rel   # measured 2.7e-4 (SmolVLM) .. 7.3e-4 (Gemma 3)
    # libmtmd's chunks, an image chunk written as its rows' slots, are our expanded prompt
    slot = eng.core.runner.model.image_token_id if family == "gemma3" else eng.media.processor.image_token_id
    flat = [t for kind, v in oracle["chunks"] for t in (v if kind == "text" else [slot] * v)]
    assert req.prompt_token_ids == flat
    if family.startswith("qwen"):   # M-RoPE: the next position after the prompt is libmtmd's n_past
        assert int(req.mrope_positions.max()) + 1 == oracle["n_past"]
    else:
        assert len(flat) == oracle["n_past"]


def test_resized_image_rows_match_libmtmd(case):
    family, _, text, mmproj, _, eng = case
    image = _rgb(*RESIZED[family], seed=5)
    ref = mtmd_run(text, mmproj, PROMPT, image, exact=True)["image_embeds"]
    with torch.no_grad():
        ours = eng.core.runner.model.embed_multimodal(_request(eng, PROMPT, image).mm_items[0])
    assert ours.shape == ref.shape
    rel = ((ours - ref).abs().max() / ref.abs().max()).item()
    assert rel < ROWS_REL_TOL, rel   # measured 3e-4 (SmolVLM) .. 1.1e-3 (Gemma 3); Qwen2.5-VL 5e-4


def test_last_logits_match_libmtmd_with_its_rows(case, monkeypatch):
    """libmtmd's rows spliced in: the text models alone (tolerances: the module doc)."""
    family, _, _, _, oracle, eng = case
    h, w = CASES[family][:2]
    model = eng.core.runner.model
    monkeypatch.setattr(model, "embed_multimodal", lambda item: oracle["image_embeds"].clone())
    out = eng.generate({"prompt": PROMPT, "images": [Image.fromarray(_rgb(h, w, 2))]}, LP)   # a new image hash
    ref = torch.log_softmax(oracle["last_logits"].double(), -1)
    top = out[0].outputs[0].logprobs[0].top_logprobs
    diffs = [abs(t.logprob - ref[t.token_id].item()) for t in top]
    assert max(diffs) < LOGPROB_TOL[family], diffs
    assert out[0].outputs[0].token_ids[0] == int(ref.argmax())


def test_gguf_equals_safetensors(case, tmp_path):
    """Our two loaders of the same weights (Gemma 3's projection rounded to f16, as converted) on the
    same token ids: the HF processor's expansion, with the libmtmd layout inside it replaced by the
    marker (Gemma 3's HF expansion adds "\\n\\n" around it)."""
    family, hf, _, _, _, eng = case
    h, w, _, placeholder = CASES[family]
    if family == "gemma3":
        hf = f16_rounded_copy(hf, tmp_path / "hf16", ["multi_modal_projector.mm_input_projection_weight"])
    if family == "qwen2.5vl":   # the GGUF model's windows are clip.cpp's 112 px
        cfg = json.loads((hf / "config.json").read_text())
        assert cfg["vision_config"]["window_size"] == 56
    images = [_rgb(h, w, 3), _rgb(h, w, 4)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MISTRALPY_GEMMA3_IMAGE_ATTENTION", "bidirectional")
        with Engine(str(hf), dtype="f32", num_kv_blocks=64, max_model_len=512) as ref_eng:
            marker = eng.tokenize(placeholder, add_special_tokens=False)   # in the vocabulary, unlike <__media__>
            for img in images:
                ref_req = _request(ref_eng, PROMPT.replace("<__media__>", placeholder), img)   # its expansion
                req = _request(eng, PROMPT, img)
                with torch.no_grad():
                    a = eng.core.runner.model.embed_multimodal(req.mm_items[0])
                    b = ref_eng.core.runner.model.embed_multimodal(ref_req.mm_items[0])
                assert (a - b).abs().max().item() < 1e-5
                layout = eng.media.processor.layout(req.mm_items[0])[0]
                ref_ids = ref_req.prompt_token_ids
                at = next(i for i in range(len(ref_ids)) if ref_ids[i:i + len(layout)] == layout)
                ids = ref_ids[:at] + marker + ref_ids[at + len(layout):]
                assert _request(eng, ids, img).prompt_token_ids == ref_ids
                pil, ref_prompt = Image.fromarray(img), PROMPT.replace("<__media__>", placeholder)
                ours = eng.generate({"prompt": ids, "images": [pil]}, LP)[0].outputs[0].logprobs[0]
                theirs = ref_eng.generate({"prompt": ref_prompt, "images": [pil]}, LP)[0].outputs[0].logprobs[0]
                for x, y in zip(ours.top_logprobs, theirs.top_logprobs):
                    assert x.token_id == y.token_id and abs(x.logprob - y.logprob) < 1e-4
                g1 = eng.generate({"prompt": ids, "images": [pil]}, GREEDY)[0].outputs[0].token_ids
                g2 = ref_eng.generate({"prompt": ref_prompt, "images": [pil]}, GREEDY)[0].outputs[0].token_ids
                assert g1 == g2


def test_chat_with_an_image(case):
    """The GGUF's chat template writes the family's HF placeholder (<start_of_image>, <image>,
    <|vision_start|><|image_pad|><|vision_end|>): each becomes libmtmd's layout for the image."""
    import base64
    import io

    family, _, _, _, _, eng = case
    h, w = CASES[family][:2]
    buf = io.BytesIO()
    Image.fromarray(_rgb(h, w, 6)).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "What is it?"}]}]
    out = eng.chat(msgs, max_tokens=2, temperature=0)
    rows = _request(eng, PROMPT, _rgb(h, w, 6)).mm_items[0].num_embeds
    assert out.usage["prompt_tokens"] > rows + 2 and out.usage["completion_tokens"] == 2


def test_config_from_the_mmproj_keys(case):
    from mistralpy.engine.builder import EngineOptions, build_gguf_model_config
    from mistralpy.loading.gguf_mmproj import read_mmproj

    family, hf, text, mmproj, _, eng = case
    hf_cfg = json.loads((hf / "config.json").read_text())
    mm = read_mmproj(mmproj)
    assert mm.family == {"smolvlm": "idefics3"}.get(family, family)
    cfg, tok = build_gguf_model_config(text, EngineOptions(dtype="f32"))
    assert tok.token_to_id("<__media__>") is not None
    vc = cfg.hf_config["vision_config"]
    if family == "gemma3":
        assert cfg.architecture == "Gemma3ForConditionalGeneration"
        assert cfg.hf_config["mm_tokens_per_image"] == hf_cfg["mm_tokens_per_image"] == 16
        assert mm.preprocessor["image_mean"] == pytest.approx([0.5] * 3)
        from mistralpy.loading.gguf_mmproj_families import family_config

        mm.family = "qwen2vl"   # a Qwen projector over a text model without M-RoPE sections: refused
        with pytest.raises(ModelLoadError, match="M-RoPE"):
            family_config({"hidden_size": 64}, mm, 0)
    elif family == "smolvlm":
        assert cfg.architecture == "Idefics3ForConditionalGeneration" and cfg.hf_config["scale_factor"] == 2
        assert mm.preprocessor["longest_edge"] == 128 and mm.preprocessor["image_size"] == 64
    else:
        assert cfg.text_config["rope_parameters"]["mrope_section"] == [2, 3, 3]
        assert mm.preprocessor["min_pixels"] == 8 * 28 * 28 and mm.preprocessor["max_pixels"] == 4096 * 28 * 28
        if family == "qwen2.5vl":
            assert vc["fullatt_block_indexes"] == [1] and vc["window_size"] == 112
        else:
            assert vc["mlp_ratio"] == 2 and vc["embed_dim"] == 32
        text_only, _ = build_gguf_model_config(text, EngineOptions(dtype="f32", mmproj="none"))
        assert text_only.architecture == "Qwen2ForCausalLM"
        # without its mmproj a qwen2vl file is plain Qwen2: for text, M-RoPE's equal axes are RoPE
        with Engine(str(text), dtype="f32", num_kv_blocks=32, max_model_len=256, mmproj="none") as plain:
            a = plain.generate("a plain text prompt", LP)[0].outputs[0].logprobs[0].top_logprobs
        b = eng.generate("a plain text prompt", LP)[0].outputs[0].logprobs[0].top_logprobs
        assert [x.token_id for x in a] == [y.token_id for y in b]
        assert max(abs(x.logprob - y.logprob) for x, y in zip(a, b)) < 1e-5
