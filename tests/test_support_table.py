"""The README's architecture table is the generated one, and every registry entry is real."""
from __future__ import annotations

from pathlib import Path

from mistralpy.loading.gguf_loader import GGUF_ARCHITECTURES
from mistralpy.models.registry import _REGISTRY, get_model_class
from mistralpy.models.support import markdown_table

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_holds_the_generated_table():
    assert markdown_table() in README.read_text(), (
        "README's architecture table is stale: paste the output of `python -m mistralpy.models.support`")


def test_every_registered_class_exists_and_gguf_targets_are_registered():
    for arch in _REGISTRY:
        assert isinstance(get_model_class(arch), type), arch
    for name, info in GGUF_ARCHITECTURES.items():
        for target in (info.hf_architecture, *info.also_builds):
            assert target in _REGISTRY, (name, target)
