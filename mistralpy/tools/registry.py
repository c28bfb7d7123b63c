"""Parsers by name, and picking them from a model's chat template (or model_type)."""
from __future__ import annotations

from mistralpy.errors import InvalidRequestError
from mistralpy.tools.base import ToolParser
from mistralpy.tools.deepseek import CALLS_BEGIN, DeepSeekV3ToolParser, DeepSeekV31ToolParser
from mistralpy.tools.hermes import HermesToolParser
from mistralpy.tools.llama3 import Llama3JsonToolParser
from mistralpy.tools.mistral import MistralToolParser, MistralV11ToolParser
from mistralpy.tools.reasoning import ReasoningParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesToolParser,  # Qwen 2.5 / 3, Hermes 2/3, SmolLM3: <tool_call>{json}</tool_call>
    "qwen": HermesToolParser,
    "llama3_json": Llama3JsonToolParser,  # Llama 3.1 / 3.2 / 3.3
    "mistral": MistralToolParser,  # [TOOL_CALLS][{...}] (v3) and [TOOL_CALLS]name[ARGS]{...} (v11)
    "mistral_v11": MistralV11ToolParser,
    "deepseek_v3": DeepSeekV3ToolParser,  # DeepSeek V3 / R1 (and reads V3.1)
    "deepseek_v31": DeepSeekV31ToolParser,
}

# name -> (start marker, end marker)
REASONING_PARSERS: dict[str, tuple[str, str]] = {
    "think": ("<think>", "</think>"),  # Qwen3, DeepSeek-R1, SmolLM3, QwQ
    "qwen3": ("<think>", "</think>"),
    "deepseek_r1": ("<think>", "</think>"),
    "mistral": ("[THINK]", "[/THINK]"),  # Magistral
}


def get_tool_parser(name: str) -> ToolParser:
    """A new parser instance (one per request choice)."""
    cls = TOOL_PARSERS.get(name)
    if cls is None:
        raise InvalidRequestError(f"unknown tool parser {name!r}; have {', '.join(sorted(TOOL_PARSERS))}",
                                  "tool_parser")
    return cls()


def get_reasoning_parser(name: str, starts_in_reasoning: bool = False) -> ReasoningParser:
    markers = REASONING_PARSERS.get(name)
    if markers is None:
        raise InvalidRequestError(
            f"unknown reasoning parser {name!r}; have {', '.join(sorted(REASONING_PARSERS))}", "reasoning_parser")
    return ReasoningParser(*markers, starts_in_reasoning=starts_in_reasoning)


_TOOL_MODEL_TYPES = {"qwen2": "hermes", "qwen2_moe": "hermes", "qwen3": "hermes", "qwen3_moe": "hermes",
                     "smollm3": "hermes", "mistral": "mistral", "mixtral": "mistral", "mistral3": "mistral_v11",
                     "deepseek_v3": "deepseek_v3"}


def detect_tool_parser(chat_template: str | None, model_type: str | None = None) -> str | None:
    """The tool parser a model's chat template implies (None: the template has no tool calls).

    Only when there is no template at all does ``model_type`` decide.
    """
    if chat_template:
        t = chat_template
        if "<tool_call>" in t:
            # Qwen3-Coder / GLM write XML calls (<function=name><parameter=...>) inside the tags: a
            # format we do not read, so none rather than a parser that would never find a call.
            return None if "<function=" in t or "<arg_key>" in t else "hermes"
        if "[TOOL_CALLS]" in t:
            return "mistral_v11" if "[ARGS]" in t else "mistral"
        if CALLS_BEGIN in t:
            # V3.1 renders name<｜tool▁sep｜>arguments; V3 renders type<｜tool▁sep｜>name + a json fence.
            return "deepseek_v3" if "```json" in t else "deepseek_v31"
        if "<|python_tag|>" in t or ("<|start_header_id|>" in t and "parameters" in t and "tools" in t):
            return "llama3_json"
        return None
    return _TOOL_MODEL_TYPES.get(model_type or "")


def detect_reasoning_parser(chat_template: str | None, model_type: str | None = None) -> str | None:
    """The reasoning parser a model's chat template implies (None: no reasoning markers)."""
    if chat_template:
        if "[THINK]" in chat_template:
            return "mistral"
        if "<think>" in chat_template or "</think>" in chat_template:
            return "think"
        return None
    return {"qwen3": "think", "qwen3_moe": "think", "smollm3": "think"}.get(model_type or "")
