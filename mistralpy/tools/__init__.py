"""Tool calls and reasoning in model output: pure text components (no engine state).

- :class:`ToolParser` subclasses, one per call syntax (:data:`TOOL_PARSERS`): ``parse`` a whole
  output into content + :class:`ToolCall` s, or ``feed`` / ``finish`` a stream into OpenAI chat-chunk
  deltas; ``grammar`` gives the llguidance lark grammar that forces calls (``tool_choice``
  "required" or a named function). :func:`detect_tool_parser` picks one from a chat template.
- :class:`ReasoningParser` splits ``<think>...</think>`` style reasoning into ``reasoning_content``;
  :func:`detect_reasoning_parser` picks the markers from a chat template.

Markers that are special tokens (``[TOOL_CALLS]``, ``[THINK]``, ``<|python_tag|>``) only reach
the parsers if the output is decoded with special tokens kept.
"""
from mistralpy.tools.base import ToolCall, ToolParser, new_call_id, new_mistral_call_id
from mistralpy.tools.deepseek import DeepSeekV3ToolParser, DeepSeekV31ToolParser
from mistralpy.tools.grammar import marker_token_ids
from mistralpy.tools.hermes import HermesToolParser
from mistralpy.tools.llama3 import Llama3JsonToolParser
from mistralpy.tools.mistral import MistralToolParser, MistralV11ToolParser
from mistralpy.tools.reasoning import ReasoningParser
from mistralpy.tools.registry import (
                                      REASONING_PARSERS,
                                      TOOL_PARSERS,
                                      detect_reasoning_parser,
                                      detect_tool_parser,
                                      get_reasoning_parser,
                                      get_tool_parser,
)

__all__ = [
                                      "REASONING_PARSERS",
                                      "TOOL_PARSERS",
                                      "DeepSeekV3ToolParser",
                                      "DeepSeekV31ToolParser",
                                      "HermesToolParser",
                                      "Llama3JsonToolParser",
                                      "MistralToolParser",
                                      "MistralV11ToolParser",
                                      "ReasoningParser",
                                      "ToolCall",
                                      "ToolParser",
                                      "detect_reasoning_parser",
                                      "detect_tool_parser",
                                      "get_reasoning_parser",
                                      "get_tool_parser",
                                      "marker_token_ids",
                                      "new_call_id",
                                      "new_mistral_call_id",
]
