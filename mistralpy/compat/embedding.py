"""mistral.rs's embedding API: ``EmbeddingRequest``, ``EmbeddingArchitecture`` (for
``Which.Embedding(model_id=..., arch=...)``) and what ``Runner.send_embedding_request`` does.

    from mistralpy import EmbeddingArchitecture, EmbeddingRequest, Runner, Which
    runner = Runner(which=Which.Embedding(model_id="Qwen/Qwen3-Embedding-0.6B",
                                          arch=EmbeddingArchitecture.Qwen3Embedding))
    vectors = runner.send_embedding_request(EmbeddingRequest(input=["a", "b"], truncate_sequence=True))
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any


class EmbeddingArchitecture(Enum):
    """mistral.rs's embedding architectures; ``hf_class`` is the Hugging Face class each selects."""

    EmbeddingGemma = "embeddinggemma"
    Qwen3Embedding = "qwen3embedding"

    @property
    def hf_class(self) -> str:
        return {"embeddinggemma": "Gemma3TextModel", "qwen3embedding": "Qwen3Model"}[self.value]


def embedding_class_name(arch: EmbeddingArchitecture | str | None) -> str | None:
    """An EmbeddingArchitecture, its name or value, or an HF class name -> HF class name (None: from config.json)."""
    if arch is None or isinstance(arch, EmbeddingArchitecture):
        return None if arch is None else arch.hf_class
    for member in EmbeddingArchitecture:
        if str(arch).lower() in (member.value, member.name.lower()):
            return member.hf_class
    return str(arch)


@dataclass
class EmbeddingRequest:
    """Inputs to embed: a string, token ids, or a list of either; ``truncate_sequence`` cuts inputs
    longer than the model takes instead of refusing them."""

    input: str | list[str] | list[int] | list[list[int]]
    truncate_sequence: bool = False


def send_embedding_request(engine: Any, request: EmbeddingRequest) -> list[list[float]]:
    """One embedding vector (a list of floats) per input, in order."""
    vectors = engine.embed(request.input, truncate=bool(request.truncate_sequence))
    return vectors.tolist()
