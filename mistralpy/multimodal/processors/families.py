"""Imports every family's processor module so that ``register_processor`` runs."""
from mistralpy.multimodal.processors import (
    gemma3,  # noqa: F401
    idefics2,  # noqa: F401
    idefics3,  # noqa: F401
    llama4,  # noqa: F401
    llava,  # noqa: F401
    llava_next,  # noqa: F401
    mllama,  # noqa: F401
    pixtral,  # noqa: F401
    qwen2_vl,  # noqa: F401
)
