"""MCP tools as OpenAI function tools: ``<prefix>_<tool name>``, the server's whole input schema
(``required``, nested objects and arrays, enums, ``$defs``, ...) as ``parameters``, and
``strict: true`` so the engine constrains a call's arguments by that schema (tools/strict.py,
tools/grammar.py) and a call always validates. As in OpenAI's strict mode, an object schema that
lists its ``properties`` but says nothing of others gets ``additionalProperties: false`` in the
model's copy: otherwise the grammar lets a model invent keys forever (the server ignores them
anyway). Arguments are validated again, against the server's own schema, before a call
(jsonschema), because the caller may be a client that wrote them by hand."""
from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from mistralpy.mcp.config import sanitize_name

log = logging.getLogger(__name__)

MAX_NAME_LEN = 64  # OpenAI's limit on function names


@dataclass(frozen=True)
class McpTool:
    name: str          # registered: <prefix>_<tool_name>
    tool_name: str     # the server's own name, used in tools/call
    server: str        # the server's key (id, else name)
    description: str | None
    input_schema: dict[str, Any]
    output_schema: dict[str, Any] | None = None
    annotations: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_sdk(cls, tool: Any, prefix: str, server: str) -> McpTool:
        """From the SDK's ``types.Tool``."""
        schema = copy.deepcopy(tool.inputSchema) if isinstance(tool.inputSchema, dict) else {}
        schema.setdefault("type", "object")  # the spec requires an object schema; be lenient
        annotations = tool.annotations.model_dump(exclude_none=True) if tool.annotations is not None else {}
        return cls(name=registered_name(prefix, tool.name), tool_name=tool.name, server=server,
                   description=tool.description, input_schema=schema, output_schema=tool.outputSchema,
                   annotations=annotations)

    def definition(self) -> dict[str, Any]:
        """The OpenAI tool definition (``{"type": "function", "function": {...}}``)."""
        fn: dict[str, Any] = {"name": self.name, "parameters": strict_schema(self.input_schema), "strict": True}
        if self.description:
            fn["description"] = self.description
        return {"type": "function", "function": fn}

    def validate_arguments(self, arguments: Any) -> dict[str, Any]:
        """The arguments as a dict, or ValueError saying what is wrong with them."""
        if arguments is None or arguments == "":
            arguments = {}
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError as exc:
                raise ValueError(f"arguments are not valid JSON: {exc}") from exc
        if not isinstance(arguments, dict):
            raise ValueError("arguments must be a JSON object")  # noqa: TRY004 - the caller's data, one error type
        import jsonschema  # a dependency of the mcp SDK

        try:
            jsonschema.validate(arguments, self.input_schema)
        except jsonschema.ValidationError as exc:
            where = "/".join(str(p) for p in exc.absolute_path) or "arguments"
            raise ValueError(f"{where}: {exc.message}") from None
        except jsonschema.SchemaError as exc:  # the server's schema: not the caller's fault
            log.debug("MCP tool %s has an invalid schema (%s); arguments not validated", self.name, exc.message)
        return arguments


def strict_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy where every object schema with ``properties`` and no word on other keys is closed."""
    def close(node: Any) -> None:
        if isinstance(node, list):
            for item in node:
                close(item)
            return
        if not isinstance(node, dict):
            return
        if isinstance(node.get("properties"), dict) and not {"additionalProperties", "patternProperties",
                                                               "unevaluatedProperties"} & node.keys():
            node["additionalProperties"] = False
        for key in ("properties", "$defs", "definitions", "patternProperties"):
            if isinstance(node.get(key), dict):
                close(list(node[key].values()))
        for key in ("items", "prefixItems", "anyOf", "oneOf", "allOf", "not", "additionalProperties",
                    "if", "then", "else"):
            if key in node:
                close(node[key])

    out = copy.deepcopy(schema)
    close(out)
    return out


def registered_name(prefix: str, tool_name: str) -> str:
    """``<prefix>_<tool name>``, as a valid OpenAI function name (at most 64 characters)."""
    name = f"{sanitize_name(prefix)}_{sanitize_name(tool_name)}"
    if len(name) > MAX_NAME_LEN:
        log.warning("MCP tool name %s is longer than %d characters: cut", name, MAX_NAME_LEN)
        name = name[:MAX_NAME_LEN]
    return name
