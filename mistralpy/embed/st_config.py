"""What a model folder says about embedding with it: sentence-transformers' files, else defaults.

sentence-transformers folders list their modules in ``modules.json`` (Transformer, Pooling, Dense,
Normalize, in order), each with its own folder (``1_Pooling/config.json``, ``2_Dense/config.json``
+ weights); ``config_sentence_transformers.json`` holds named prompts; ``sentence_bert_config.json``
the longest input. Without them: an encoder pools as its class says (mean, CLS for classifiers)
and normalises; a decoder is a generation model unless its class is an embedder (last token).
Cross-encoders keep their score activation in config.json (``sentence_transformers.activation_fn``).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mistralpy.embed.pooling import DenseLayer, PoolingConfig, activation_by_name
from mistralpy.errors import ModelLoadError

log = logging.getLogger(__name__)

# model_type values whose published embedders are trained for Matryoshka truncation
MATRYOSHKA_FAMILIES = frozenset({"qwen3", "gemma3_text"})


@dataclass(slots=True)
class EmbedSpec:
    """Everything the engine needs to embed with a model."""

    pooling: PoolingConfig
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    max_seq_length: int | None = None          # sentence-transformers' limit (truncation length)
    matryoshka: bool = False                   # `dimensions` may truncate the vectors
    from_sentence_transformers: bool = False

    def prompt(self, name: str | None) -> str:
        """The instruction prefix of prompt ``name`` (None: the default one, if any)."""
        name = name if name is not None else self.default_prompt_name
        if name is None:
            return ""
        if name not in self.prompts:
            from mistralpy.errors import InvalidRequestError

            raise InvalidRequestError(f"unknown prompt name {name!r}; the model has: "
                                      f"{', '.join(sorted(self.prompts)) or 'none'}", "prompt_name")
        return self.prompts[name]


@dataclass(slots=True)
class ScoreSpec:
    """A cross-encoder: logits -> scores with ``activation`` (sigmoid for one label, else identity)."""

    num_labels: int
    activation: str


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _module_kind(entry: dict[str, Any]) -> str:
    return str(entry.get("type", "")).rsplit(".", 1)[-1]


def _pooling_modes(cfg: dict[str, Any]) -> tuple[str, ...]:
    """Modes of a 1_Pooling/config.json: `pooling_mode` (v6) or the legacy boolean flags."""
    mode = cfg.get("pooling_mode")
    if mode:
        return (mode,) if isinstance(mode, str) else tuple(mode)
    flags = (("pooling_mode_cls_token", "cls"), ("pooling_mode_max_tokens", "max"),
             ("pooling_mode_mean_tokens", "mean"), ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len_tokens"),
             ("pooling_mode_weightedmean_tokens", "weightedmean"), ("pooling_mode_lasttoken", "lasttoken"))
    return tuple(m for key, m in flags if cfg.get(key)) or ("mean",)


def _load_dense(folder: Path) -> DenseLayer:
    cfg = _read(folder / "config.json") or {}
    if cfg.get("use_residual"):
        raise ModelLoadError(f"{folder}: residual Dense modules are not supported")
    tensors: dict[str, torch.Tensor] = {}
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file

        tensors = load_file(str(folder / "model.safetensors"))
    elif (folder / "pytorch_model.bin").is_file():
        tensors = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    if "linear.weight" not in tensors:
        raise ModelLoadError(f"{folder}: no linear.weight in the Dense module's weights")
    try:
        act = activation_by_name(cfg.get("activation_function", "torch.nn.modules.activation.Tanh"))
    except ValueError as exc:
        raise ModelLoadError(f"{folder}: {exc}") from None
    bias = tensors.get("linear.bias")
    return DenseLayer(tensors["linear.weight"].float(), None if bias is None else bias.float(), act)


def embed_spec(model_dir: Path, model: Any, hf_config: dict[str, Any]) -> EmbedSpec | None:
    """The folder's embedding setup; None when the model is a generator with no embedding config."""
    model_dir = Path(model_dir)
    modules = _read(model_dir / "modules.json")
    st_cfg = _read(model_dir / "config_sentence_transformers.json") or {}
    bert_cfg = _read(model_dir / "sentence_bert_config.json") or {}
    matryoshka = _is_matryoshka(model_dir, hf_config)
    common = {"prompts": dict(st_cfg.get("prompts") or {}), "default_prompt_name": st_cfg.get("default_prompt_name"),
              "max_seq_length": bert_cfg.get("max_seq_length"), "matryoshka": matryoshka}
    if isinstance(modules, list) and modules:
        modes: tuple[str, ...] = ()
        include_prompt, dense, normalize = True, [], False
        for entry in sorted(modules, key=lambda e: e.get("idx", 0)):
            kind, sub = _module_kind(entry), model_dir / str(entry.get("path", ""))
            if kind == "Transformer":
                continue
            if kind == "Pooling":
                cfg = _read(sub / "config.json") or {}
                modes, include_prompt = _pooling_modes(cfg), bool(cfg.get("include_prompt", True))
            elif kind == "Dense":
                dense.append(_load_dense(sub))
            elif kind == "Normalize":
                normalize = True
            else:
                raise ModelLoadError(f"sentence-transformers module {entry.get('type')!r} is not supported")
        if not modes:   # a Transformer alone (CrossEncoder folders list theirs): not an embedder
            return None if not getattr(model, "encoder_only", False) else _default(model, common)
        try:
            pooling = PoolingConfig(modes, include_prompt, dense, normalize)
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from None
        return EmbedSpec(pooling, from_sentence_transformers=True, **common)
    return _default(model, common)


def _default(model: Any, common: dict[str, Any]) -> EmbedSpec | None:
    mode = getattr(model, "default_pooling", None)
    if mode is None:
        return None  # a generation model: it has to say how it embeds
    return EmbedSpec(PoolingConfig((mode,), True, [], True), **common)


def _is_matryoshka(model_dir: Path, hf_config: dict[str, Any]) -> bool:
    """Trained for truncation: the model card says so (sentence-transformers writes MatryoshkaLoss
    into it), or a family whose embedders all are (Qwen3-Embedding, EmbeddingGemma)."""
    text = hf_config.get("text_config") or hf_config
    if text.get("model_type") in MATRYOSHKA_FAMILIES:
        return True
    try:
        card = (model_dir / "README.md").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return "MatryoshkaLoss" in card   # (every generated card links the Matryoshka blog post)


def score_spec(model_dir: Path, model: Any, hf_config: dict[str, Any]) -> ScoreSpec | None:
    """A cross-encoder's scoring (the model has ``score``); None for anything else. The activation:
    config_sentence_transformers.json (v6), config.json's ``sentence_transformers`` (v4-v5) or
    ``sbert_ce_default_activation_function`` (older); default sigmoid for one label, else identity."""
    if not hasattr(model, "score"):
        return None
    st_file = _read(Path(model_dir) / "config_sentence_transformers.json") or {}
    st = hf_config.get("sentence_transformers") or {}
    path = (st_file.get("activation_fn") or st.get("activation_fn")
            or hf_config.get("sbert_ce_default_activation_function"))
    labels = int(getattr(model, "num_labels", 1))
    try:
        act = activation_by_name(path) if path else ("sigmoid" if labels == 1 else "identity")
    except ValueError:
        log.warning("cross-encoder activation %r is not supported; using the default", path)
        act = "sigmoid" if labels == 1 else "identity"
    return ScoreSpec(labels, act)


def embedding_architecture(model_dir: Path, hf_config: dict[str, Any], arch: str) -> str:
    """Qwen3-Embedding's config names Qwen3ForCausalLM while its weights are a bare Qwen3Model
    (no ``model.`` prefix, no LM head): load it as the embedding class then."""
    if arch != "Qwen3ForCausalLM" or not (Path(model_dir) / "modules.json").is_file():
        return arch
    from mistralpy.loading.safetensors_reader import safetensors_files

    try:
        files = safetensors_files(Path(model_dir))
        with open(files[0], "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            names = json.loads(f.read(size))
    except Exception:  # noqa: BLE001 - the loader reports unreadable files properly later
        return arch
    return "Qwen3Model" if not any(n.startswith("model.") for n in names) else arch
