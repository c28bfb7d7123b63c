"""Imports every family's processor module so that ``register_processor`` runs."""
from mistralpy.multimodal.processors import llava  # noqa: F401
from mistralpy.multimodal.processors import qwen2_vl  # noqa: F401
