"""Quantized weight formats: GGUF block formats and their dequantization (`gguf.dequant`)."""
