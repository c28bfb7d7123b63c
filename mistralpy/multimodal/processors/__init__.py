"""Per-family multimodal processors: pixels (ours, on pillow + numpy, equal to transformers' PIL
processors) and placeholder expansion on token ids. ``processor_for`` picks one by architecture."""
from mistralpy.multimodal.processors.base import MultimodalProcessor, processor_for, register_processor

__all__ = ["MultimodalProcessor", "processor_for", "register_processor"]
