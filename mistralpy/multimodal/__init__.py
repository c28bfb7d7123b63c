"""Multimodal input: guarded media fetching, image decoding, per-family processors (pixels and
placeholder expansion on token ids), the encoder cache and media hashes (docs/ARCHITECTURE.md)."""
