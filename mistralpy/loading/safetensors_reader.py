"""Stream tensors out of (sharded) safetensors files one at a time."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from mistralpy.errors import ModelLoadError

INDEX_NAME = "model.safetensors.index.json"


def safetensors_files(model_dir: Path) -> list[Path]:
    """The shards named by the index, else every *.safetensors in the folder."""
    index = model_dir / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, KeyError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"bad safetensors index {index}: {exc}") from exc
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise ModelLoadError(f"safetensors shards named by the index are missing: {missing}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors weights in {model_dir} (pytorch .bin checkpoints are not supported)")
    return files


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor); files are memory-mapped, so only one tensor is resident at a time."""
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except (OSError, RuntimeError) as exc:
            if isinstance(exc, ModelLoadError):
                raise
            raise ModelLoadError(f"cannot read {path}: {exc}") from exc


def checkpoint_dtype(model_dir: Path, hf_config: dict) -> str | None:
    """The dtype the checkpoint declares (torch_dtype / dtype in config.json)."""
    cfg = hf_config.get("text_config") or hf_config
    value = cfg.get("dtype") or cfg.get("torch_dtype") or hf_config.get("dtype") or hf_config.get("torch_dtype")
    return str(value) if value else None
