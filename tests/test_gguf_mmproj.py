"""LLaVA 1.5 as llama.cpp ships it: a `llama` text GGUF + an mmproj (clip) GGUF, written from a tiny
transformers LLaVA (tests/fixtures_gguf.write_llava_gguf) and checked three ways:

- against llama.cpp's own multimodal path (libmtmd through llama_cpp.mtmd_cpp): the image rows and,
  with llama.cpp's rows spliced in, the last position's logits;
- against our safetensors LLaVA of the same weights (and so transformers, tests/test_llava.py):
  image rows, logprobs and greedy tokens;
- the file conventions: feature layer with or without `clip.vision.feature_layer`, legacy ffn names,
  the marker, auto-detection, refusals.

llama.cpp's llava graph (this llama-cpp-python's vendor copy) appends the CLS row after the patches
while still numbering positions and picking rows as if it came first (ggml-org/llama.cpp#25814, fix
proposed in #25844): its rows are not transformers'. Image rows are therefore compared with a torch
replay of that graph over *our* loaded weights (which checks that both read the same tensors with
the same layer selection), or with ours directly once a llama.cpp without the bug is installed.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from fixtures_gguf import llama_cpp_mtmd, write_llava_gguf
from fixtures_vlm import build_llava
from PIL import Image

from mistralpy import Engine, SamplingParams
from mistralpy.errors import ModelLoadError

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
PROMPT = "Describe <__media__> briefly."


def _rgb(size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def llava(tmp_path_factory, tokenizer_dir):
    return build_llava(tmp_path_factory.mktemp("llava"), tokenizer_dir)


@pytest.fixture(scope="module")
def pair(llava, tmp_path_factory):
    return write_llava_gguf(llava, tmp_path_factory.mktemp("llava-gguf"))


@pytest.fixture(scope="module")
def legacy_pair(llava, tmp_path_factory):
    """Legacy ffn names and no feature-layer key (so one more layer stored, as that converter does)."""
    return write_llava_gguf(llava, tmp_path_factory.mktemp("llava-gguf-legacy"), legacy_ffn_names=True,
                            feature_layer_key=False)


@pytest.fixture(scope="module")
def engine(pair):
    with Engine(str(pair[0]), dtype="f32", num_kv_blocks=64, max_model_len=256) as eng:
        yield eng


@pytest.fixture(scope="module")
def oracle(pair):
    pytest.importorskip("llama_cpp.mtmd_cpp")
    return llama_cpp_mtmd(pair[0], pair[1], PROMPT, _rgb(56, 1))


def _llama_cpp_graph_rows(model, pixels: torch.Tensor) -> torch.Tensor:
    """clip.cpp's llava graph replayed on our modules: CLS concatenated after the patches, positions
    0..n in that order, rows 1..n taken (#25814); projector GELU as ggml's (tanh)."""
    vm = model.vision_tower.vision_model
    emb = vm.embeddings
    patches = emb.patch_embedding(pixels).flatten(2).transpose(1, 2)
    x = torch.cat([patches, emb.class_embedding.expand(1, 1, -1)], 1) + emb.position_embedding.weight[None]
    x = vm.pre_layrnorm(x)
    for layer in vm.encoder.layers[: model.feature_layers[0]]:
        x = layer(x)
    proj = model.multi_modal_projector
    return proj.linear_2(torch.nn.functional.gelu(proj.linear_1(x[0, 1:]), approximate="tanh"))


def _item(engine, image: Image.Image):
    return engine._prepare({"prompt": PROMPT, "images": [image]}, GREEDY)[1][0]


def test_mmproj_config_follows_clip_cpp(pair, legacy_pair, llava):
    import json

    from mistralpy.loading.gguf_mmproj import read_mmproj

    hf = json.loads((llava / "config.json").read_text())
    for path, stored in ((pair[1], 2), (legacy_pair[1], 3)):
        mm = read_mmproj(path)
        vc = mm.config["vision_config"]
        assert vc["num_hidden_layers"] == stored
        # HF's vision_feature_layer -2 of 3 layers = hidden state 2 (the output of the second layer)
        assert mm.config["vision_feature_layer"] == 2 == hf["vision_config"]["num_hidden_layers"] + 1 - 2
        assert vc["hidden_act"] == "quick_gelu" and vc["image_size"] == 56 and vc["patch_size"] == 14
        assert mm.projection_dim == hf["text_config"]["hidden_size"]
        assert mm.preprocessor["image_mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])


def test_legacy_ffn_names_load_the_same_weights(pair, legacy_pair):
    from mistralpy.loading.gguf_mmproj import iter_mmproj_tensors, read_mmproj

    a = dict(iter_mmproj_tensors(read_mmproj(pair[1])))
    b = dict(iter_mmproj_tensors(read_mmproj(legacy_pair[1])))
    assert set(a) < set(b)   # the legacy file keeps layer 2 (unused)
    for name, t in a.items():
        assert torch.equal(t, b[name]), name


def test_image_rows_match_llama_cpp_and_transformers(engine, oracle, llava):
    import transformers
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    model = engine.core.runner.model
    req = _item(engine, Image.fromarray(_rgb(56, 1)))
    item = req.mm_items[0]
    with torch.no_grad():
        ours = model.embed_multimodal(item)
        replay = _llama_cpp_graph_rows(model, item.inputs["pixel_values"])
    ref = oracle["image_embeds"]
    assert oracle["chunks"][1] == ("image", 16) and ours.shape == ref.shape
    # ggml's GELUs go through fp16 tables: ~2e-5 here, inside 1e-4
    if (ours - ref).abs().max() > 1e-4:   # llama.cpp still has the CLS-order bug (#25814)
        assert (replay - ref).abs().max().item() < 1e-4
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(llava, dtype=torch.float32).eval()
    pixels = LlavaImageProcessorPil.from_pretrained(llava)(Image.fromarray(_rgb(56, 1)), return_tensors="pt")["pixel_values"]
    assert (pixels - item.inputs["pixel_values"]).abs().max() < 1e-6
    with torch.no_grad():
        feats = hf.model.get_image_features(pixel_values=pixels)
    feats = getattr(feats, "pooler_output", feats)
    feats = torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats
    assert (ours - feats.reshape(ours.shape)).abs().max().item() < 1e-5


def test_last_logits_match_llama_cpp_with_its_image_rows(engine, oracle, monkeypatch):
    """The text side of libmtmd's path: llama.cpp's chunk ids (the same as ours), its image rows
    spliced at the marker, the logits of the last position. Within 5e-4 in logprobs (7e-5 seen):
    llama.cpp keeps K/V in f16 (its default cache type), the rest is f32."""
    model = engine.core.runner.model
    monkeypatch.setattr(model, "embed_multimodal", lambda item: oracle["image_embeds"].clone())
    (_, before), (_, n), (_, after) = oracle["chunks"]
    image_id = engine.tokenizer.token_to_id("<image>")   # this vocabulary has one: a token-id marker
    ids = before + [image_id] + after
    req = engine._prepare({"prompt": ids, "images": [Image.fromarray(_rgb(56, 1))]}, GREEDY)[1][0]
    assert len(req.prompt_token_ids) == oracle["n_past"] == len(before) + n + len(after)
    ours_ids = engine.tokenize(PROMPT, add_special_tokens=False)
    marker = engine.tokenizer.token_to_id("<__media__>")
    assert ours_ids == before + [marker] + after   # our tokenizer cuts the text as libmtmd does
    out = engine.generate({"prompt": ids, "images": [Image.fromarray(_rgb(57, 9))]},   # a new hash: no cache hit
                          SamplingParams(temperature=0, max_tokens=1, logprobs=True, top_logprobs=5))
    ref = torch.log_softmax(oracle["last_logits"].double(), -1)
    top = out[0].outputs[0].logprobs[0]
    for t in top.top_logprobs:
        assert abs(t.logprob - ref[t.token_id].item()) < 5e-4
    assert out[0].outputs[0].token_ids[0] == int(ref.argmax())


def test_greedy_and_logprobs_equal_the_safetensors_llava(engine, llava):
    images = [Image.fromarray(_rgb(56, 3)), Image.fromarray(_rgb(90, 4))]   # square: no padding difference
    lp = SamplingParams(temperature=0, max_tokens=1, logprobs=True, top_logprobs=5)
    with Engine(str(llava), dtype="f32", num_kv_blocks=64, max_model_len=256) as ref_eng:
        for img in images:
            ours = engine.generate({"prompt": PROMPT, "images": [img]}, GREEDY)[0].outputs[0].token_ids
            ref = ref_eng.generate({"prompt": PROMPT.replace("<__media__>", "<image>"), "images": [img]},
                                   GREEDY)[0].outputs[0].token_ids
            assert ours == ref
            a = engine.generate({"prompt": PROMPT, "images": [img]}, lp)[0].outputs[0].logprobs[0]
            b = ref_eng.generate({"prompt": PROMPT.replace("<__media__>", "<image>"), "images": [img]},
                                 lp)[0].outputs[0].logprobs[0]
            for x, y in zip(a.top_logprobs, b.top_logprobs):
                assert x.token_id == y.token_id and abs(x.logprob - y.logprob) < 1e-4
        # an HF-style <image> in the text works too, and a missing marker is a clear error
        both = engine.generate({"prompt": "Look: <image> and <__media__>.", "images": images}, GREEDY)
        assert len(both[0].outputs[0].token_ids) == GREEDY.max_tokens
        from mistralpy.multimodal.inputs import MediaError

        with pytest.raises(MediaError, match="placeholder"):
            engine.generate({"prompt": "no marker here", "images": images[:1]}, GREEDY)


def test_detection_option_and_refusals(pair, tmp_path):
    import shutil

    from mistralpy.engine.builder import EngineOptions, build_gguf_model_config

    text, mmproj = pair
    cfg, tok = build_gguf_model_config(text, EngineOptions(dtype="f32"))
    assert cfg.architecture == "LlavaForConditionalGeneration" and tok.token_to_id("<__media__>") is not None
    cfg, _ = build_gguf_model_config(text, EngineOptions(dtype="f32", mmproj="none"))
    assert cfg.architecture == "LlamaForCausalLM"
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(text, alone / "model.gguf")
    cfg, _ = build_gguf_model_config(alone / "model.gguf", EngineOptions(dtype="f32"))
    assert cfg.architecture == "LlamaForCausalLM"
    cfg, _ = build_gguf_model_config(alone / "model.gguf", EngineOptions(dtype="f32", mmproj=str(mmproj)))
    assert cfg.architecture == "LlavaForConditionalGeneration"
    shutil.copy(text, alone / "stray-mmproj.gguf")   # found beside it but no projector: text only
    cfg, tok = build_gguf_model_config(alone / "model.gguf", EngineOptions(dtype="f32"))
    assert cfg.architecture == "LlamaForCausalLM" and tok.token_to_id("<__media__>") is None
    (alone / "stray-mmproj.gguf").unlink()
    shutil.copy(mmproj, alone / "a-mmproj.gguf")
    shutil.copy(mmproj, alone / "b-mmproj.gguf")
    with pytest.raises(ModelLoadError, match="--mmproj"):
        build_gguf_model_config(alone / "model.gguf", EngineOptions(dtype="f32"))
    with pytest.raises(ModelLoadError, match="not a llama.cpp vision projector"):
        build_gguf_model_config(alone / "model.gguf", EngineOptions(dtype="f32", mmproj=str(alone / "model.gguf")))
    with pytest.raises(ModelLoadError, match="not found"):
        build_gguf_model_config(alone / "model.gguf", EngineOptions(dtype="f32", mmproj=str(alone / "nope.gguf")))


def test_cli_has_the_option():
    from mistralpy.cli.main import build_parser, engine_kwargs

    args = build_parser().parse_args(["run", "-m", "x.gguf", "--mmproj", "p.gguf"])
    assert engine_kwargs(args)["mmproj"] == "p.gguf"
