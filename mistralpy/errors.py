"""Typed exceptions. The server maps them to OpenAI error JSON (400/404/422/500)."""
from __future__ import annotations


class MistralPyError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidRequestError(MistralPyError, ValueError):
    """A request field has a bad value. `field` names it (e.g. "top_p")."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class PromptTooLongError(InvalidRequestError):
    """The prompt (plus max_tokens) does not fit in the model's context."""


class ModelLoadError(MistralPyError):
    """A model could not be resolved, read or built."""


class UnsupportedArchitectureError(ModelLoadError):
    """`architectures` names a model family we do not implement."""


class ChatTemplateError(InvalidRequestError):
    """The chat template is missing or raised (raise_exception) while rendering."""


class EngineDeadError(MistralPyError):
    """The engine's step loop failed; no request can be served any more."""
