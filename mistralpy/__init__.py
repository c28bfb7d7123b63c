"""mistral.py: a fast, multimodal LLM inference engine on PyTorch.

    from mistralpy import Engine, SamplingParams
    engine = Engine("path/or/hub-id")
    print(engine.generate("Hello", SamplingParams(max_tokens=16))[0].outputs[0].text)
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from mistralpy.errors import (ChatTemplateError, EngineDeadError, InvalidRequestError, MistralPyError,
                              ModelLoadError, PromptTooLongError, UnsupportedArchitectureError)
from mistralpy.sampling_params import SamplingParams

__version__ = "0.1.0"

if TYPE_CHECKING:
    from mistralpy.engine.async_engine import AsyncEngine
    from mistralpy.engine.llm_engine import Engine
    from mistralpy.compat import (Architecture, ChatCompletionRequest, CompletionRequest, DiffusionArchitecture,
                                  IsqOrganization, ModelDType, Runner, UnsupportedModelKindError,
                                  VisionArchitecture, Which, McpClientConfigPy, McpServerConfigPy,
                                  McpServerSourcePy, EmbeddingRequest, EmbeddingArchitecture)
    from mistralpy.engine.outputs import CompletionOutput, LogprobEntry, RequestOutput

_LAZY = {
    "Engine": "mistralpy.engine.llm_engine",
    "AsyncEngine": "mistralpy.engine.async_engine",
    "RequestOutput": "mistralpy.engine.outputs",
    "CompletionOutput": "mistralpy.engine.outputs",
    "LogprobEntry": "mistralpy.engine.outputs",
    # mistral.rs's Python API (mistralpy/compat/)
    **{name: "mistralpy.compat" for name in ("Runner", "Which", "ChatCompletionRequest", "CompletionRequest",
                                             "Architecture", "VisionArchitecture", "DiffusionArchitecture",
                                             "ModelDType", "IsqOrganization", "UnsupportedModelKindError",
                                             "McpClientConfigPy", "McpServerConfigPy", "McpServerSourcePy",
                                             "EmbeddingRequest", "EmbeddingArchitecture")},
}


def __getattr__(name: str):
    # Heavy modules (torch model code) load on first use, so `import mistralpy` stays cheap.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mistralpy' has no attribute {name!r}")


__all__ = ["Engine", "AsyncEngine", "SamplingParams", "RequestOutput", "CompletionOutput", "LogprobEntry",
           "MistralPyError", "InvalidRequestError", "PromptTooLongError", "ModelLoadError",
           "UnsupportedArchitectureError", "ChatTemplateError", "EngineDeadError",
           "Runner", "Which", "ChatCompletionRequest", "CompletionRequest", "Architecture", "VisionArchitecture",
           "DiffusionArchitecture", "ModelDType", "IsqOrganization", "UnsupportedModelKindError",
           "McpClientConfigPy", "McpServerConfigPy", "McpServerSourcePy"]
