"""Topology files: per-layer ISQ types (and devices), as mistral.rs's `--topology`.

A YAML mapping whose keys select linear layers and whose values say how to load them:

    0-8:                       # decoder layers 0..7 (end exclusive, as in mistral.rs)
      isq: Q3K
    8-24:
      isq: Q4K
    '/mlp\\.down_proj/':        # a regex (between slashes) searched in the layer's name,
      isq: Q6K                 #   e.g. model.layers.3.mlp.down_proj
    '/self_attn\\.o_proj/':
      isq: none                # keep these in the model dtype

Ranges apply first, then regexes in file order, so a regex refines a range. A layer no entry
selects takes the engine-wide `isq` (or stays in float without one). `device` may name the
engine's own device; placing layers on other devices is not supported yet and is refused.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import GGMLQuantizationType as Q

from mistralpy.errors import InvalidRequestError
from mistralpy.quant.isq import parse_isq

_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_KEEP = object()  # "isq: none": stay in float even under an engine-wide isq


@dataclass(slots=True)
class _Rule:
    start: int | None
    stop: int | None
    pattern: re.Pattern | None
    isq: Any  # a GGMLQuantizationType, _KEEP, or None (no opinion)
    device: str | None


class Topology:
    def __init__(self, rules: list[_Rule]) -> None:
        self.rules = sorted(rules, key=lambda r: r.pattern is not None)  # ranges before regexes (stable)

    @classmethod
    def from_file(cls, path: str | Path) -> Topology:
        import yaml

        try:
            data = yaml.safe_load(Path(path).read_text())
        except OSError as exc:
            raise InvalidRequestError(f"cannot read topology file {path}: {exc}", "topology") from exc
        except yaml.YAMLError as exc:
            raise InvalidRequestError(f"topology file {path} is not valid YAML: {exc}", "topology") from exc
        return cls.from_dict(data or {})

    @classmethod
    def from_dict(cls, data: dict) -> Topology:
        if not isinstance(data, dict):
            raise InvalidRequestError("a topology is a mapping of layer ranges or /regex/ to settings", "topology")
        return cls([_rule(str(key), value) for key, value in data.items()])

    def isq_for(self, module_name: str, default: Q | None) -> Q | None:
        """The ISQ type of the linear layer `module_name` (None: keep float)."""
        chosen: Any = None
        m = _LAYER.search(module_name)
        layer = int(m.group(1)) if m else None
        for rule in self.rules:
            if rule.pattern is not None:
                hit = rule.pattern.search(module_name) is not None
            else:
                hit = layer is not None and rule.start <= layer < rule.stop
            if hit and rule.isq is not None:
                chosen = rule.isq
        if chosen is None:
            return default
        return None if chosen is _KEEP else chosen

    def check_devices(self, device: str) -> None:
        for rule in self.rules:
            if rule.device is not None and rule.device.replace("[", ":").rstrip("]") not in (device, device + ":0"):
                raise InvalidRequestError(f"topology places layers on {rule.device!r}; per-layer devices other "
                                          f"than the engine's ({device}) are not supported yet", "topology")


def _rule(key: str, value: Any) -> _Rule:
    if not isinstance(value, dict):
        raise InvalidRequestError(f"topology entry {key!r} must be a mapping (isq:, device:)", "topology")
    unknown = set(value) - {"isq", "device"}
    if unknown:
        raise InvalidRequestError(f"topology entry {key!r} has unknown keys {sorted(unknown)}", "topology")
    isq: Any = None
    if "isq" in value:
        raw = value["isq"]
        isq = _KEEP if raw is None or str(raw).lower() in ("none", "f32", "bf16", "f16") else parse_isq(raw)
    device = str(value["device"]) if value.get("device") is not None else None
    if len(key) > 2 and key.startswith("/") and key.endswith("/"):
        try:
            return _Rule(None, None, re.compile(key[1:-1]), isq, device)
        except re.error as exc:
            raise InvalidRequestError(f"topology regex {key!r}: {exc}", "topology") from exc
    m = _RANGE.match(key)
    if not m or int(m.group(1)) >= int(m.group(2)):
        raise InvalidRequestError(f"topology key {key!r} is neither a layer range 'A-B' (A < B) nor a /regex/",
                                  "topology")
    return _Rule(int(m.group(1)), int(m.group(2)), None, isq, device)
