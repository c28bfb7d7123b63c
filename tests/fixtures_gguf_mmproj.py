"""Text GGUF + llama.cpp mmproj pairs written from the tiny transformers VLMs of fixtures_vlm
(Gemma 3, Qwen2-VL / Qwen2.5-VL, SmolVLM), laid out as llama.cpp's convert_hf_to_gguf.py does
(conversion/gemma.py, qwenvl.py, smolvlm.py and the MmprojModel base), and libmtmd run on them.

The mmproj writer follows the converter's names and keys: SigLIP `v.*` (post_ln kept), Gemma 3's
`mm.soft_emb_norm` (+1) and `mm.input_projection` (F16, as the converter forces), Qwen's Conv3D
patch kernel split into `v.patch_embd.weight` / `.weight.1`, its qkv split into q / k / v, the
merger's ln_q as `v.post_ln`; SmolVLM's connector as `mm.model.fc`. (The converter itself trips on
these tiny checkpoints: transformers 5's Gemma 3 layout, a Qwen merger index past a 2-block tower.)
Text: fixtures_gguf.write_gguf, with the arch and keys llama.cpp's converter adds (`qwen2vl` with
`rope.dimension_sections`; Gemma 3's layer pattern, which its loader would otherwise fix at 6).
"""
from __future__ import annotations

import ctypes
import json
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch

_TEXT_PREFIXES = {"gemma3": ("language_model.model.", "model.language_model."),
                  "qwen2vl": ("model.",), "qwen2.5vl": ("model.",), "smolvlm": ("model.text_model.",)}
_TEXT_ARCH = {"gemma3": "Gemma3ForCausalLM", "qwen2vl": "Qwen2ForCausalLM", "qwen2.5vl": "Qwen2ForCausalLM",
              "smolvlm": "LlamaForCausalLM"}


def load_state(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


def _text_state(state: dict, family: str) -> dict:
    out = {}
    for name, t in state.items():
        if name.startswith(("model.visual.", "visual.")):
            continue
        if name.startswith("lm_head."):
            out[name] = t
            continue
        for p in _TEXT_PREFIXES[family]:
            if name.startswith(p) and not name.startswith(("model.vision_model.", "model.connector.")):
                out["model." + name[len(p):]] = t
                break
    return out


@contextmanager
def _writer_with(extra: dict[str, Any]):
    """gguf.GGUFWriter that adds `extra` keys (uint32 or uint32 arrays) before writing its header."""
    import gguf

    base = gguf.GGUFWriter

    class Writer(base):   # type: ignore[misc, valid-type]
        def write_header_to_file(self, *args: Any, **kw: Any) -> None:
            for key, value in extra.items():
                if isinstance(value, list):
                    self.add_array(key, value)
                else:
                    self.add_uint32(key, value)
            super().write_header_to_file(*args, **kw)

    with mock.patch.object(gguf, "GGUFWriter", Writer):
        yield


def write_text_gguf(hf_dir: Path, out_dir: Path, family: str) -> Path:
    from fixtures_gguf import _ARCH, write_gguf
    from safetensors.torch import save_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    text_dir = out_dir / "text-hf"
    text_dir.mkdir(parents=True, exist_ok=True)
    tcfg = {**cfg["text_config"], "architectures": [_TEXT_ARCH[family]]}
    tcfg["tie_word_embeddings"] = bool(cfg.get("tie_word_embeddings", tcfg.get("tie_word_embeddings")))
    (text_dir / "config.json").write_text(json.dumps(tcfg))
    save_file({k: v.contiguous() for k, v in _text_state(load_state(hf_dir), family).items()},
              str(text_dir / "model.safetensors"))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (hf_dir / name).exists():
            shutil.copy(hf_dir / name, text_dir / name)
    if (hf_dir / "chat_template.jinja").exists():   # transformers 5 saves it apart; the converter embeds it
        tok_cfg = json.loads((text_dir / "tokenizer_config.json").read_text())
        tok_cfg["chat_template"] = (hf_dir / "chat_template.jinja").read_text()
        (text_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    arch, extra = {}, {}
    if family.startswith("qwen"):
        sections = tcfg["rope_parameters"]["mrope_section"]
        arch, extra = {"Qwen2ForCausalLM": "qwen2vl"}, {"qwen2vl.rope.dimension_sections": [*sections, 0]}
    elif family == "gemma3":   # our fixture alternates local / global layers (llama.cpp's default: 5 of 6 local)
        period = tcfg["layer_types"].index("full_attention") + 1
        assert tcfg["layer_types"] == [("full_attention" if (i + 1) % period == 0 else "sliding_attention")
                                       for i in range(tcfg["num_hidden_layers"])]
        extra = {"gemma3.attention.sliding_window_pattern": period}
    with mock.patch.dict(_ARCH, arch), _writer_with(extra):
        return write_gguf(text_dir, out_dir / f"{family}-text.gguf")


# ---- the mmproj ----------------------------------------------------------------------------------------
_SIGLIP = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.out_proj": "attn_out", "layer_norm1": "ln1", "layer_norm2": "ln2",
           "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down"}
_QWEN = {"norm1": "ln1", "norm2": "ln2", "attn.proj": "attn_out", "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _siglip_tensors(state: dict, tower: str) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in state.items():
        if not name.startswith(tower):
            continue
        n = name[len(tower):].removeprefix("vision_model.")
        fixed = {"embeddings.patch_embedding.weight": "v.patch_embd.weight",
                 "embeddings.patch_embedding.bias": "v.patch_embd.bias",
                 "embeddings.position_embedding.weight": "v.position_embd.weight",
                 "post_layernorm.weight": "v.post_ln.weight", "post_layernorm.bias": "v.post_ln.bias"}
        if n in fixed:
            out[fixed[n]] = t
            continue
        m = re.match(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", n)
        assert m, name
        out[f"v.blk.{m.group(1)}.{_SIGLIP[m.group(2)]}.{m.group(3)}"] = t
    return out


def _qwen_tensors(state: dict) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in state.items():
        n = name.removeprefix("model.")
        if not n.startswith("visual."):
            continue
        n = n[len("visual."):]
        if n == "patch_embed.proj.weight":   # Conv3D [E, C, 2, P, P] -> two Conv2D kernels
            out["v.patch_embd.weight"], out["v.patch_embd.weight.1"] = t[:, :, 0], t[:, :, 1]
            continue
        fixed = {"merger.ln_q.weight": "v.post_ln.weight", "merger.ln_q.bias": "v.post_ln.bias",
                 "merger.mlp.0.weight": "mm.0.weight", "merger.mlp.0.bias": "mm.0.bias",
                 "merger.mlp.2.weight": "mm.2.weight", "merger.mlp.2.bias": "mm.2.bias"}
        if n in fixed:
            out[fixed[n]] = t
            continue
        m = re.match(r"blocks\.(\d+)\.(.+)\.(weight|bias)$", n)
        assert m, name
        if m.group(2) == "attn.qkv":
            for part, chunk in zip("qkv", t.chunk(3, 0)):
                out[f"v.blk.{m.group(1)}.attn_{part}.{m.group(3)}"] = chunk
        else:
            out[f"v.blk.{m.group(1)}.{_QWEN[m.group(2)]}.{m.group(3)}"] = t
    return out


def write_mmproj(hf_dir: Path, out: Path, family: str) -> Path:
    import gguf

    cfg = json.loads((hf_dir / "config.json").read_text())
    vc, tc = cfg["vision_config"], cfg["text_config"]
    pp_path = hf_dir / "preprocessor_config.json"
    pp = json.loads(pp_path.read_text()) if pp_path.exists() else \
        json.loads((hf_dir / "processor_config.json").read_text())["image_processor"]
    state = load_state(hf_dir)
    w = gguf.GGUFWriter(str(out), "clip")
    w.add_type(gguf.GGUFType.MMPROJ)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_clip_has_vision_encoder(True)
    w.add_vision_projection_dim(tc["hidden_size"])
    f16: set[str] = set()
    if family in ("gemma3", "smolvlm"):
        w.add_vision_image_size(vc["image_size"])
        w.add_vision_patch_size(vc["patch_size"])
        w.add_vision_embedding_length(vc["hidden_size"])
        w.add_vision_feed_forward_length(vc["intermediate_size"])
        w.add_vision_block_count(vc["num_hidden_layers"])
        w.add_vision_head_count(vc["num_attention_heads"])
        tensors = _siglip_tensors(state, "vision_tower." if family == "gemma3" else "model.vision_model.")
    else:
        w.add_vision_image_size(vc.get("image_size", 560))
        w.add_vision_patch_size(vc.get("patch_size", 14))
        w.add_vision_embedding_length(vc.get("embed_dim", vc["hidden_size"]))
        w.add_vision_feed_forward_length(vc["hidden_size"] if "embed_dim" in vc else vc["intermediate_size"])
        w.add_vision_block_count(vc["depth"])
        w.add_vision_head_count(vc["num_heads"])
        tensors = _qwen_tensors(state)
    w.add_vision_image_mean(list(pp["image_mean"]))
    w.add_vision_image_std(list(pp["image_std"]))
    if family == "gemma3":
        w.add_clip_projector_type(gguf.VisionProjectorType.GEMMA3)
        w.add_vision_attention_layernorm_eps(vc.get("layer_norm_eps", 1e-6))
        w.add_vision_use_gelu(True)
        scale = (vc["image_size"] // vc["patch_size"]) // int(cfg["mm_tokens_per_image"] ** 0.5)
        if scale != 4:
            w.add_vision_projector_scale_factor(scale)
        tensors["mm.input_projection.weight"] = state["multi_modal_projector.mm_input_projection_weight"]
        tensors["mm.soft_emb_norm.weight"] = state["multi_modal_projector.mm_soft_emb_norm.weight"] + 1
        f16.add("mm.input_projection.weight")
    elif family == "smolvlm":
        w.add_clip_projector_type(gguf.VisionProjectorType.IDEFICS3)
        w.add_vision_attention_layernorm_eps(vc.get("layer_norm_eps", 1e-5))
        w.add_vision_projector_scale_factor(cfg.get("scale_factor", 2))
        w.add_vision_use_gelu(True)
        w.add_vision_preproc_image_size(pp.get("size", {}).get("longest_edge", vc["image_size"]))
        tensors["mm.model.fc.weight"] = state["model.connector.modality_projection.proj.weight"]
    else:
        if family == "qwen2vl":
            w.add_clip_projector_type(gguf.VisionProjectorType.QWEN2VL)
        else:
            w.add_clip_projector_type(gguf.VisionProjectorType.QWEN25VL)
            w.add_vision_use_silu(True)
            w.add_vision_n_wa_pattern(vc["fullatt_block_indexes"][0] + 1)
        w.add_vision_attention_layernorm_eps(cfg.get("rms_norm_eps", 1e-6))
    for name, t in tensors.items():
        data = t.to(torch.float32).numpy()
        w.add_tensor(name, data.astype(np.float16) if name in f16 else np.ascontiguousarray(data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def write_vlm_gguf(hf_dir: Path, out_dir: Path, family: str) -> tuple[Path, Path]:
    """(text GGUF, mmproj) in out_dir for a fixtures_vlm folder; family: gemma3 | qwen2vl | qwen2.5vl | smolvlm."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return write_text_gguf(hf_dir, out_dir, family), write_mmproj(hf_dir, out_dir / f"mmproj-{family}.gguf", family)


def f16_rounded_copy(hf_dir: Path, out_dir: Path, names: list[str]) -> Path:
    """hf_dir with the named tensors rounded through float16 (what a converted mmproj stores)."""
    from safetensors.torch import save_file

    shutil.copytree(hf_dir, out_dir, dirs_exist_ok=True)
    state = load_state(hf_dir)
    for n in names:
        state[n] = state[n].half().float()
    for f in out_dir.glob("*.safetensors"):
        f.unlink()
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / "model.safetensors"))
    return out_dir


# ---- libmtmd -------------------------------------------------------------------------------------------

def mtmd_run(text_path: Path, mmproj_path: Path, prompt: str, image: np.ndarray, image_min_tokens: int = 0,
             exact: bool = False) -> dict:
    """libmtmd on one prompt with the default marker and one RGB uint8 image [H, W, 3]: every chunk
    ("text", ids) / ("image", n_tokens), the image chunks' rows concatenated in prompt order
    ("image_embeds"), and after evaluating all chunks the last logits and n_past. image_min_tokens:
    libmtmd's --image-min-tokens (0: the model's default). exact: f32 attention everywhere (what
    llama.cpp does by default is f16 K / V)."""
    import llama_cpp
    from llama_cpp import mtmd_cpp as mtmd

    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(str(text_path).encode(), llama_cpp.llama_model_default_params())
    assert model, "llama.cpp could not load the text GGUF"
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx, cparams.n_batch, cparams.n_ubatch = 512, 512, 512
    cparams.n_threads = cparams.n_threads_batch = 2
    if exact:   # f32 K/V and no flash attention (which casts K / V to f16 on CPU), text and vision
        cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cparams.type_k = cparams.type_v = llama_cpp.GGML_TYPE_F32
    lctx = llama_cpp.llama_init_from_model(model, cparams)
    params = mtmd.mtmd_context_params_default()
    params.use_gpu, params.n_threads, params.warmup, params.print_timings = False, 2, False, False
    params.image_min_tokens = image_min_tokens
    if exact:
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    ctx = mtmd.mtmd_init_from_file(str(mmproj_path).encode(), model, params)
    assert ctx, "libmtmd refused the mmproj file"
    h, w, _ = image.shape
    buf = np.ascontiguousarray(image, dtype=np.uint8)
    bitmap = mtmd.mtmd_bitmap_init(w, h, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
    chunks = mtmd.mtmd_input_chunks_init()
    try:
        raw = prompt.encode()
        text = mtmd.mtmd_input_text(raw, len(raw), False, True)
        bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
        assert mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(text), bitmaps, 1) == 0
        n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
        n_embd = llama_cpp.llama_model_n_embd(model)
        out: dict = {"chunks": []}
        rows = []
        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                n = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                assert mtmd.mtmd_encode_chunk(ctx, chunk) == 0
                ptr = mtmd.mtmd_get_output_embd(ctx)
                rows.append(torch.tensor(np.ctypeslib.as_array(ptr, shape=(n * n_embd,)).copy()).view(n, n_embd))
                out["chunks"].append(("image", n))
            else:
                n_tok = ctypes.c_size_t(0)
                ids = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n_tok))
                out["chunks"].append(("text", [ids[j] for j in range(n_tok.value)]))
        out["image_embeds"] = torch.cat(rows)
        new_n_past = llama_cpp.llama_pos(0)
        assert mtmd.mtmd_helper_eval_chunks(ctx, lctx, chunks, 0, 0, 512, True, ctypes.byref(new_n_past)) == 0
        logits = llama_cpp.llama_get_logits_ith(lctx, -1)
        out["last_logits"] = torch.tensor(np.ctypeslib.as_array(logits, shape=(n_vocab,)).copy())
        out["n_past"] = new_n_past.value
        return out
    finally:
        mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_bitmap_free(bitmap)
        mtmd.mtmd_free(ctx)
        llama_cpp.llama_free(lctx)
        llama_cpp.llama_model_free(model)


# ---- llama.cpp's own converter -------------------------------------------------------------------------
LLAMA_CPP_SRC = Path(__import__("os").environ.get(
    "LLAMA_CPP_SRC", "/work/llama/llama_cpp_python-0.3.36/vendor/llama.cpp"))
_CONVERT = """
import runpy, sys
src, pairs = sys.argv[1], sys.argv[2:]
sys.path[:0] = [src, src + "/gguf-py"]
import gguf
names = gguf.get_tensor_name_map
# the tensor map covers block indices below the tower's depth; Qwen's merger.mlp.2 needs 2 on 2 blocks
gguf.get_tensor_name_map = lambda arch, n: names(arch, max(n, 4))
for hf, out in zip(pairs[::2], pairs[1::2]):
    sys.argv = ["convert_hf_to_gguf.py", hf, "--outfile", out, "--outtype", "f32", "--mmproj"]
    runpy.run_path(src + "/convert_hf_to_gguf.py", run_name="__main__")
"""


def _old_layout(hf_dir: Path, out_dir: Path) -> Path:
    """transformers 5 saves Gemma 3's tower as `vision_tower.*`; the converter maps `vision_tower.vision_model.*`."""
    from safetensors.torch import save_file

    shutil.copytree(hf_dir, out_dir, dirs_exist_ok=True)
    state = {("vision_tower.vision_model." + k[len("vision_tower."):] if k.startswith("vision_tower.") else k): v
             for k, v in load_state(hf_dir).items()}
    for f in out_dir.glob("*.safetensors"):
        f.unlink()
    save_file(state, str(out_dir / "model.safetensors"))
    return out_dir


def llama_cpp_convert_mmproj(jobs: dict[str, tuple[Path, Path]], work: Path) -> dict[str, Path]:
    """family -> (HF folder, output) converted by the sdist's convert_hf_to_gguf.py --mmproj (one process)."""
    import subprocess
    import sys

    args = []
    for family, (hf, out) in jobs.items():
        if family == "gemma3":
            hf = _old_layout(hf, work / "gemma3-old-layout")
        args += [str(hf), str(out)]
    subprocess.run([sys.executable, "-c", _CONVERT, str(LLAMA_CPP_SRC), *args], check=True, capture_output=True,
                   timeout=300)
    return {family: out for family, (_, out) in jobs.items()}


def gguf_contents(path: Path) -> tuple[dict[str, Any], dict[str, tuple[str, list[int], bytes]]]:
    """(keys but the descriptive general.* ones, name -> (type, shape, bytes)) of a GGUF file."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    keep = ("general.architecture", "general.type", "general.file_type")
    keys = {k: f.contents() for k, f in r.fields.items()
            if not k.startswith("GGUF.") and (not k.startswith("general.") or k in keep)}
    tensors = {t.name: (t.tensor_type.name, [int(d) for d in t.shape], np.array(t.data).tobytes()) for t in r.tensors}
    return keys, tensors
