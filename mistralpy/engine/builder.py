"""Resolve a model (hub id or folder), read its configs and build the EngineCore."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mistralpy.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
    cpu_supports_bf16,
    derive_max_model_len,
    read_json,
    resolve_device,
    resolve_dtype,
)
from mistralpy.engine.core import EngineCore
from mistralpy.errors import InvalidRequestError, ModelLoadError
from mistralpy.loading.gguf_loader import (
    apply_rope_freq_factors,
    hf_config_from_gguf,
    metadata,
    open_readers,
    split_files,
)
from mistralpy.loading.hub import METADATA_ALLOW_PATTERNS, resolve_file, resolve_model_dir
from mistralpy.loading.safetensors_reader import checkpoint_dtype
from mistralpy.models.registry import get_model_class, resolve_architecture
from mistralpy.quant.isq import parse_isq
from mistralpy.quant.topology import Topology
from mistralpy.tokenizer.tokenizer import Tokenizer

log = logging.getLogger(__name__)

SAMPLING_DEFAULT_KEYS = ("do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty")


@dataclass(slots=True)
class EngineOptions:
    """Every Engine(...) keyword. Defaults suit a laptop/server CPU or a single GPU."""

    dtype: str | torch.dtype = "auto"
    device: str | torch.device = "auto"
    max_seqs: int = 32
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_gb: float | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    revision: str | None = None
    token_source: str = "cache"
    tokenizer: str | None = None
    chat_template: str | None = None
    arch: str | None = None
    seed: int | None = None
    gguf_file: str | None = None  # a .gguf file inside `model` (a hub repo or folder), like `-f`
    isq: str | int | None = None  # in-situ quantization type (Q4K, Q8_0, ... or 2/3/4/5/6/8)
    topology: str | dict | None = None  # YAML file (or its dict): per-layer ISQ types
    isq_vision: bool = False  # vision models: ISQ quantizes the tower and projector too
    # Tool-call / reasoning output formats (mistralpy.tools names); None: detected from the chat template.
    tool_parser: str | None = None
    reasoning_parser: str | None = None
    max_num_images: int = 8  # images per request (vision models)
    max_edge: int | None = None  # vision models: images are first shrunk so their longest edge is at most this
    # GGUF models: llama.cpp's vision projector file (LLaVA 1.5). None: the one *mmproj*.gguf beside
    # the model file, if there is exactly one; "none": load the text model alone.
    mmproj: str | None = None
    compile: bool = False  # torch.compile decode steps (worker/compile.py), compiled by a warm-up at build time
    # Called as weights load: progress(tensors_done, tensors_total, bytes_done, bytes_total, what)
    # (loading/model_loader.ProgressFn; the CLI passes cli/progress.LoadProgress). None: silent.
    progress: Any = None
    # MCP client (mistralpy/mcp): a mistral.rs-format JSON file, its dict, or McpClientConfigPy.
    # None: $MCP_CONFIG_PATH if set; False: no MCP even then.
    mcp_config: Any = None
    # Server-side tools (engine/tool_rounds.py): calls POSTed as {"name", "arguments"} to this URL
    # (engine/tool_dispatch.py); their definitions: a JSON file / list of OpenAI tools, else GET on the URL.
    tool_dispatch_url: str | None = None
    tool_dispatch_tools: Any = None
    tool_dispatch_timeout_s: float = 30.0
    # web_search + fetch_url (mistralpy/search): backend "duckduckgo", "duckduckgo:URL", a SearxNG URL;
    # search_callback(query) -> [{"title", "url", "content"}] replaces the backend (and enables search).
    enable_search: bool = False
    search_backend: str = "duckduckgo"
    search_callback: Any = None

    def validate(self) -> None:
        for name in ("max_seqs", "max_num_batched_tokens", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InvalidRequestError(f"{name} must be a positive integer, got {value!r}", name)
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise InvalidRequestError("num_kv_blocks must be >= 1", "num_kv_blocks")
        if self.progress is not None and not callable(self.progress):
            raise InvalidRequestError("progress must be a callable", "progress")


def generation_defaults(gen_cfg: dict[str, Any]) -> dict[str, Any]:
    """The sampling fields of generation_config.json that apply when a request leaves them unset."""
    return {k: gen_cfg[k] for k in SAMPLING_DEFAULT_KEYS if gen_cfg.get(k) is not None}


def resolve_gguf(model: str, opts: EngineOptions) -> Path | None:
    """The GGUF file to load: `model` itself when it is a .gguf file, or `gguf_file` inside it."""
    if opts.gguf_file:
        return resolve_file(model, opts.gguf_file, revision=opts.revision, token_source=opts.token_source)
    if model.endswith(".gguf"):
        path = Path(model).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {model!r} not found")
        return path
    return None


def resolve_gguf_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """Block-quantized weights have no float dtype of their own. ``auto`` on CPU computes in bf16
    where the C++ kernels have a SIMD path (AVX512 or AVX2: every product is an int8 dot there and
    every other decode op widens bf16 to f32 in registers), else where bf16 is native, else f32."""
    if dtype == "auto" and device.type == "cpu":
        from mistralpy.quant.gguf import kernels_cpu as gguf_kernels_cpu

        chosen = torch.bfloat16 if gguf_kernels_cpu.fast() or cpu_supports_bf16() else torch.float32
        log.info("GGUF compute dtype: %s (CPU kernels: %s)", str(chosen).removeprefix("torch."),
                 cpu_ext_summary())
        return chosen
    return resolve_dtype(dtype, device, "bfloat16")


def resolve_checkpoint_dtype(dtype: str | torch.dtype, device: torch.device, ckpt_dtype: str | None) -> torch.dtype:
    """A float checkpoint's compute dtype. ``auto`` on CPU keeps a bf16 / f16 checkpoint in bf16
    where the C++ dense kernel has a SIMD path (AVX512-BF16, or AVX2 widening bf16 in registers:
    2.6x the f32 decode speed of SmolLM2-135M on a Zen 3, the same prefill) or bf16 is native;
    else f32 (torch's own bf16 products are emulated, ~30x slower than f32, on AVX2 CPUs)."""
    if dtype == "auto" and device.type == "cpu" and ckpt_dtype in ("bfloat16", "float16"):
        from mistralpy.layers import dense_cpu

        chosen = torch.bfloat16 if dense_cpu.available() or cpu_supports_bf16() else torch.float32
        log.info("compute dtype: %s (checkpoint %s; CPU kernels: %s, dense %s)", str(chosen).removeprefix("torch."),
                 ckpt_dtype, cpu_ext_summary(), "simd" if dense_cpu.available() else "none")
        return chosen
    return resolve_dtype(dtype, device, ckpt_dtype)


def cpu_ext_summary() -> str:
    from mistralpy.kernels import cpu as cpu_ext

    variant = cpu_ext.loaded_variant()
    return f"{variant} variant, qmm {cpu_ext.isa()}" if variant else "unavailable"


def build_gguf_model_config(path: Path, opts: EngineOptions,
                            model: str | None = None) -> tuple[ModelConfig, Tokenizer]:
    files = split_files(path)
    readers = open_readers(files)
    meta = metadata(readers[0])
    names = {t.name for r in readers for t in r.tensors}
    hf_config = hf_config_from_gguf(meta, names)
    apply_rope_freq_factors(hf_config, readers)
    if opts.tokenizer:
        tokenizer = _tokenizer_from_option(opts)
    else:
        from mistralpy.tokenizer.gguf_tokenizer import tokenizer_from_gguf

        tokenizer = tokenizer_from_gguf(readers[0], chat_template_override=opts.chat_template)
    text_cfg = hf_config
    mmproj = resolve_mmproj(path, opts, model)
    if mmproj is not None:
        try:
            hf_config = _llava_over_gguf(hf_config, mmproj, tokenizer)
        except ModelLoadError as exc:
            if opts.mmproj is not None:   # asked for: an error; found beside the model: text only
                raise
            log.warning("not using %s: %s", mmproj.name, exc)
    arch = resolve_architecture(hf_config, opts.arch)
    device = resolve_device(opts.device)
    dtype = resolve_gguf_dtype(opts.dtype, device)
    model_config = ModelConfig(path=path, hf_config=hf_config, architecture=arch, dtype=dtype,
                               max_model_len=derive_max_model_len(text_cfg, opts.max_model_len),
                               gguf_files=files, gguf_readers=readers)
    return model_config, tokenizer


def resolve_mmproj(model_path: Path, opts: EngineOptions, model: str | None = None) -> Path | None:
    """The projector file to load with a GGUF model: `mmproj` (a path, else a file of the repo or
    folder `model` when the GGUF came from one via `gguf_file`), else the one *mmproj*.gguf beside
    the model file; "none" turns it off."""
    from mistralpy.loading.gguf_mmproj import find_mmproj

    if opts.mmproj is None:
        found = find_mmproj(model_path)
        if found is not None:
            log.info("vision projector %s found beside %s (mmproj='none' skips it)", found.name, model_path.name)
        return found
    if opts.mmproj.lower() == "none":
        return None
    local = Path(opts.mmproj).expanduser()
    if local.is_file() or not (opts.gguf_file and model):
        return local   # (a missing file is reported by read_mmproj)
    return resolve_file(model, opts.mmproj, revision=opts.revision, token_source=opts.token_source)


def _llava_over_gguf(text_cfg: dict[str, Any], mmproj: Path, tokenizer: Tokenizer) -> dict[str, Any]:
    """A LLaVA config over the GGUF text model; how prompts mark images: loading/gguf_mmproj.py."""
    from mistralpy.loading import gguf_mmproj

    mm = gguf_mmproj.read_mmproj(mmproj)
    cfg = gguf_mmproj.llava_config(text_cfg, mm, gguf_mmproj.placeholder_token_id(tokenizer, text_cfg["vocab_size"]))
    gguf_mmproj.add_media_marker(tokenizer)   # (after every check: a refused file leaves it untouched)
    # read by the loader (tensors) and Engine._media_input (the processor)
    cfg["gguf_mmproj"] = {"path": str(mm.path), "preprocessor": mm.preprocessor,
                          "marker_ids": gguf_mmproj.marker_ids(tokenizer)}
    return cfg


def _tokenizer_from_option(opts: EngineOptions) -> Tokenizer:
    tok_dir = opts.tokenizer
    if not Path(tok_dir).exists():
        tok_dir = str(resolve_model_dir(tok_dir, revision=opts.revision, token_source=opts.token_source,
                                        allow_patterns=METADATA_ALLOW_PATTERNS))
    return Tokenizer.from_dir(tok_dir, chat_template_override=opts.chat_template)


def build_core(model: str, opts: EngineOptions) -> tuple[EngineCore, Tokenizer, ModelConfig]:
    opts.validate()
    isq = parse_isq(opts.isq)
    topology = None
    if opts.topology is not None:
        topology = (Topology.from_dict(opts.topology) if isinstance(opts.topology, dict)
                    else Topology.from_file(opts.topology))
        topology.check_devices(str(resolve_device(opts.device)))
    gguf_path = resolve_gguf(model, opts)
    if gguf_path is not None:
        model_config, tokenizer = build_gguf_model_config(gguf_path, opts, model)
        model_config.isq, model_config.topology, model_config.isq_vision = isq, topology, opts.isq_vision
        return _core(model_config, opts, tokenizer), tokenizer, model_config
    model_dir = resolve_model_dir(model, revision=opts.revision, token_source=opts.token_source)
    hf_config = read_json(Path(model_dir) / "config.json")
    if not hf_config:
        raise ModelLoadError(f"{model_dir} has no config.json")
    gen_cfg = read_json(Path(model_dir) / "generation_config.json")
    arch = resolve_architecture(hf_config, opts.arch)
    if opts.arch is None:   # Qwen3-Embedding says Qwen3ForCausalLM but holds a bare Qwen3Model
        from mistralpy.embed.st_config import embedding_architecture

        arch = embedding_architecture(Path(model_dir), hf_config, arch)
    # Families whose published configs leave keys at transformers' defaults fill them in (Gemma 3).
    hf_config = getattr(get_model_class(arch), "complete_config", lambda cfg: cfg)(hf_config)
    device = resolve_device(opts.device)
    if isq is not None and device.type == "cpu" and opts.dtype == "auto":
        dtype = resolve_gguf_dtype(opts.dtype, device)   # ISQ runs on the GGUF kernels
    else:
        dtype = resolve_checkpoint_dtype(opts.dtype, device, checkpoint_dtype(Path(model_dir), hf_config))
    text_cfg = hf_config.get("text_config") or hf_config
    model_config = ModelConfig(path=Path(model_dir), hf_config=hf_config, architecture=arch, dtype=dtype,
                               max_model_len=derive_max_model_len(text_cfg, opts.max_model_len),
                               generation_config=gen_cfg, isq=isq,
                               topology=topology, isq_vision=opts.isq_vision)
    if opts.tokenizer:
        tokenizer = _tokenizer_from_option(opts)
    else:
        tokenizer = Tokenizer.from_dir(model_dir, chat_template_override=opts.chat_template)
    return _core(model_config, opts, tokenizer), tokenizer, model_config


def _core(model_config: ModelConfig, opts: EngineOptions, tokenizer: Tokenizer) -> EngineCore:
    model_config.progress = opts.progress
    core = EngineCore(_engine_config(model_config, opts), tokenizer)
    if opts.compile and core.runner.enable_compile():
        core.warmup()
    return core


def _engine_config(model_config: ModelConfig, opts: EngineOptions) -> EngineConfig:
    return EngineConfig(
        model=model_config,
        cache=CacheConfig(block_size=opts.block_size, num_blocks=opts.num_kv_blocks,
                          kv_cache_memory_gb=opts.kv_cache_memory_gb,
                          enable_prefix_caching=opts.enable_prefix_caching),
        scheduler=SchedulerConfig(max_seqs=opts.max_seqs, max_num_batched_tokens=opts.max_num_batched_tokens,
                                  enable_chunked_prefill=opts.enable_chunked_prefill),
        device=resolve_device(opts.device), seed=opts.seed)
