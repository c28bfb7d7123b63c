"""Imports every family's processor module so that ``register_processor`` runs."""
from mistralpy.multimodal.processors import llava  # noqa: F401
from mistralpy.multimodal.processors import qwen2_vl  # noqa: F401
from mistralpy.multimodal.processors import gemma3  # noqa: F401
from mistralpy.multimodal.processors import idefics2  # noqa: F401
from mistralpy.multimodal.processors import idefics3  # noqa: F401
from mistralpy.multimodal.processors import llava_next  # noqa: F401
from mistralpy.multimodal.processors import llama4  # noqa: F401
from mistralpy.multimodal.processors import mllama  # noqa: F401
from mistralpy.multimodal.processors import pixtral  # noqa: F401
