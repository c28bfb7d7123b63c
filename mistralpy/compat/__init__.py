"""Compatibility layer for mistral.rs's Python package: ``from mistralpy import Runner, Which,
ChatCompletionRequest, CompletionRequest`` runs mistral.rs scripts unchanged (text models, plain
Hugging Face checkpoints and GGUF files)."""
from mistralpy.compat.embedding import EmbeddingArchitecture, EmbeddingRequest
from mistralpy.compat.mcp import McpClientConfigPy, McpServerConfigPy, McpServerSourcePy
from mistralpy.compat.requests import ChatCompletionRequest, CompletionRequest
from mistralpy.compat.runner import Runner
from mistralpy.compat.which import (Architecture, DiffusionArchitecture, IsqOrganization, ModelDType,
                                    SpeechLoaderType, UnsupportedModelKindError, VisionArchitecture, Which)

__all__ = ["Runner", "Which", "ChatCompletionRequest", "CompletionRequest", "Architecture", "VisionArchitecture",
           "DiffusionArchitecture", "SpeechLoaderType", "ModelDType", "IsqOrganization", "UnsupportedModelKindError",
           "McpClientConfigPy", "McpServerConfigPy", "McpServerSourcePy", "EmbeddingRequest", "EmbeddingArchitecture"]
