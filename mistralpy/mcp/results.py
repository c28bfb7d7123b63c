"""A tool call's result, kept whole: ``isError``, text, images (base64 + MIME type), embedded
resources and structured content, as plain data that outlives the SDK objects.

What the model sees (``message_content``): text parts joined by newlines; images as image parts
for vision models (data: URLs, which the media pipeline decodes) or a short text note otherwise;
structured content as JSON when the tool gave no text (tools usually send both, the text being
the JSON already); an error result starts with ``error:`` as the Python tool callbacks' do.
"""
from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class McpToolResult:
    is_error: bool = False
    # {"type": "text", "text"} | {"type": "image" or "audio", "data" (base64), "mime_type"}
    # | {"type": "resource", "uri", "mime_type", "text" or "blob"} | {"type": "resource_link", "uri", "name"}
    content: list[dict[str, Any]] = field(default_factory=list)
    structured: Any = None

    @classmethod
    def error(cls, message: str) -> McpToolResult:
        """A result made here (unknown tool, timeout, server down), not by the server."""
        return cls(is_error=True, content=[{"type": "text", "text": message}])

    @classmethod
    def from_sdk(cls, result: Any) -> McpToolResult:
        """From the SDK's ``CallToolResult``."""
        parts: list[dict[str, Any]] = []
        for item in result.content or []:
            kind = getattr(item, "type", None)
            if kind == "text":
                parts.append({"type": "text", "text": item.text})
            elif kind in ("image", "audio"):
                parts.append({"type": kind, "data": item.data, "mime_type": item.mimeType})
            elif kind == "resource":
                res = item.resource
                part = {"type": "resource", "uri": str(res.uri), "mime_type": res.mimeType}
                if getattr(res, "text", None) is not None:
                    part["text"] = res.text
                else:
                    part["blob"] = getattr(res, "blob", "")
                parts.append(part)
            elif kind == "resource_link":
                parts.append({"type": "resource_link", "uri": str(item.uri), "name": item.name})
        return cls(is_error=bool(result.isError), content=parts, structured=result.structuredContent)

    # ---- views ---------------------------------------------------------------------------------
    @property
    def images(self) -> list[dict[str, Any]]:
        return [p for p in self.content if p["type"] == "image"]

    def text(self, vision: bool = False) -> str:
        """The result as one text (images noted, or left out when ``vision`` shows them as parts)."""
        pieces: list[str] = []
        for part in self.content:
            kind = part["type"]
            if kind == "text":
                pieces.append(part["text"])
            elif kind == "image" and not vision:
                pieces.append(f"[image: {part['mime_type']}, {_decoded_size(part['data'])} bytes; "
                              "this model cannot view images]")
            elif kind == "audio":
                pieces.append(f"[audio: {part['mime_type']}, {_decoded_size(part['data'])} bytes]")
            elif kind == "resource":
                pieces.append(part["text"] if "text" in part else f"[resource: {part['uri']} ({part['mime_type']})]")
            elif kind == "resource_link":
                pieces.append(f"[resource link: {part['name']} {part['uri']}]")
        if self.structured is not None and not any(p["type"] == "text" for p in self.content):
            pieces.append(json.dumps(self.structured, ensure_ascii=False, default=str))
        text = "\n".join(pieces)
        return f"error: {text}" if self.is_error else text

    def message_content(self, vision: bool = False) -> str | list[dict[str, Any]]:
        """The ``tool`` message content: a string, or for a vision model and an image result, a
        part list (text, then one image_url part per image)."""
        if not (vision and self.images):
            return self.text(vision=False)
        parts: list[dict[str, Any]] = [{"type": "text", "text": self.text(vision=True)}]
        for img in self.images:
            parts.append({"type": "image_url", "image_url": {"url": f"data:{img['mime_type']};base64,{img['data']}"}})
        return parts

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (for responses and logs): isError, content parts and structuredContent."""
        return {"isError": self.is_error, "content": [dict(p) for p in self.content],
                "structuredContent": self.structured}


def _decoded_size(data: str) -> int:
    try:
        return len(base64.b64decode(data, validate=False))
    except (binascii.Error, ValueError):
        return len(data)
