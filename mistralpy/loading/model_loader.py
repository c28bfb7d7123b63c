"""Build a model on its device in its final dtype and stream the checkpoint into it."""
from __future__ import annotations

import json
import logging
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from mistralpy.attention.backend import AttentionBackend
from mistralpy.config import ModelConfig
from mistralpy.layers.embedding import LMHead
from mistralpy.layers.linear import Linear
from mistralpy.layers.matmul import prepack_linear_weights
from mistralpy.loading.gguf_loader import GGUF_ARCHITECTURES, hf_tensor_name, iter_gguf_tensors, open_readers
from mistralpy.loading.safetensors_reader import iter_safetensors, safetensors_files
from mistralpy.models.base import CausalLM
from mistralpy.models.registry import get_model_class
from mistralpy.quant.isq import head_type
from mistralpy.quant.topology import Topology

log = logging.getLogger(__name__)


def apply_isq(model: torch.nn.Module, qtype, topology: Topology | None = None, vision: bool = False) -> None:
    """Mark every decoder linear layer (and an untied LM head) to quantize its weight on load:
    the topology's choice for that layer, else `qtype`. Vision towers and projectors stay float
    (they are small and their errors reach every image row) unless `vision`."""
    skip = () if vision else getattr(model, "isq_skip_prefixes", ())
    for name, module in model.named_modules():
        if skip and name.startswith(skip):
            continue
        if isinstance(module, Linear):
            module.isq = topology.isq_for(name, qtype) if topology is not None else qtype
        elif isinstance(module, LMHead) and not module.tied and qtype is not None:
            module.isq = head_type(qtype)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes held by parameters, buffers and quantized kernels (the tied head counted once)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:  # prepacked (mkldnn) weights included: numel() is their logical size
            seen.add(id(t))
            total += t.numel() * t.element_size()
    for m in model.modules():
        kernel = getattr(m, "qkernel", None)
        if kernel is not None:
            total += kernel.nbytes()
        q = getattr(m, "qweight", None)
        if q is not None:
            total += q.raw.numel()
    return total


# progress(tensors_done, tensors_total, bytes_done, bytes_total, what): called after each tensor is
# loaded (and quantized, under ISQ); `what` says "loading" or "loading + ISQ Q4K".
ProgressFn = Callable[[int, int, int, int, str], None]


def safetensors_totals(files: list[Path]) -> tuple[int, int]:
    """(tensor count, data bytes) from the safetensors headers alone."""
    count = nbytes = 0
    for path in files:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for name, info in header.items():
            if name != "__metadata__":
                count += 1
                nbytes += info["data_offsets"][1] - info["data_offsets"][0]
    return count, nbytes


def _tensor_bytes(t) -> int:
    t = getattr(t, "raw", t)  # GGUFTensor: its bytes
    return t.numel() * t.element_size()


def with_progress(tensors: Iterable, total: int, total_bytes: int, what: str,
                  progress: ProgressFn) -> Iterator:
    """Pass the tensors through, reporting each once the consumer has taken the next (so after it
    has copied, and quantized, the previous one)."""
    done = nbytes = 0
    progress(0, total, 0, total_bytes, what)
    for name, t in tensors:
        size = _tensor_bytes(t)
        yield name, t
        done += 1
        nbytes += size
        progress(done, max(total, done), nbytes, max(total_bytes, nbytes), what)


def _with_mmproj(text: Iterator, path: str, totals: tuple[int, int] | None) -> tuple[Iterator, tuple[int, int] | None]:
    """The text GGUF's tensors under the multimodal model's `language_model.` prefix, then the
    projector file's (loading/gguf_mmproj.py gives them HF LLaVA names)."""
    import itertools

    from mistralpy.loading.gguf_mmproj import iter_mmproj_tensors, read_mmproj

    mm = read_mmproj(path)
    if totals is not None:
        totals = totals[0] + len(mm.reader.tensors), totals[1] + sum(int(t.n_bytes) for t in mm.reader.tensors)
    text = (("language_model." + name, t) for name, t in text)
    return itertools.chain(text, iter_mmproj_tensors(mm)), totals


def load_model(model_config: ModelConfig, device: torch.device, backend: AttentionBackend,
               progress: ProgressFn | None = None) -> CausalLM:
    """Allocate parameters uninitialised (torch.empty), then copy tensors in one by one.

    Peak memory stays near the model size: no float32 staging copy, no second model.
    """
    start = time.perf_counter()
    cls = get_model_class(model_config.architecture)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(model_config.dtype)
    try:
        with torch.device(device):
            # The engine's context length rides along in the config: rope scalings that depend on
            # it (dynamic, longrope) read it there.
            cfg = {**model_config.text_config, "max_model_len": model_config.max_model_len}
            if getattr(cls, "multimodal", False):  # the whole config: vision_config beside text_config
                cfg = {**model_config.hf_config, "text_config": cfg}
            model: CausalLM = cls(cfg, backend)
    finally:
        torch.set_default_dtype(previous)
    if model_config.isq is not None or model_config.topology is not None:
        apply_isq(model, model_config.isq, model_config.topology, model_config.isq_vision)
    progress = progress or model_config.progress
    if model_config.gguf_files:
        readers = model_config.gguf_readers or open_readers(model_config.gguf_files)
        model_config.gguf_readers = None  # loaded once; the file's pages need not stay mapped
        arch = GGUF_ARCHITECTURES[model_config.text_config["model_type"]]
        tensors = iter_gguf_tensors(readers, model_config.text_config, arch)
        if progress is not None:
            kept = [t for r in readers for t in r.tensors if hf_tensor_name(t.name, arch) is not None]
            totals = len(kept), sum(int(t.n_bytes) for t in kept)
        mmproj = model_config.hf_config.get("gguf_mmproj")
        if getattr(cls, "multimodal", False) and mmproj:   # LLaVA: text GGUF + llama.cpp's mmproj
            tensors, totals = _with_mmproj(tensors, mmproj["path"], totals if progress is not None else None)
    else:
        files = safetensors_files(Path(model_config.path))
        tensors = iter_safetensors(files)
        if progress is not None:
            totals = safetensors_totals(files)
    if progress is not None:
        isq = model_config.isq.name if model_config.isq is not None else "per-layer" if model_config.topology else None
        what = f"loading + ISQ {isq}" if isq else "loading"
        tensors = with_progress(tensors, *totals, what, progress)
    model.load_weights(tensors)
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    if device.type == "cpu":
        packed = prepack_linear_weights(model)
        log.debug("prepacked %d linear weights for oneDNN", packed)
    log.info("loaded %s (%.1fM float params, %.0f MiB of weights, %s%s) on %s in %.1fs",
             model_config.architecture, n_params / 1e6, weight_bytes(model) / 2**20, model_config.dtype,
             f", ISQ {model_config.isq.name}" if model_config.isq is not None else "", device,
             time.perf_counter() - start)
    return model
