"""GGUF block formats: dequantization (the reference, ``dequant``), matmul kernels over blocks kept
quantized (``kernels``, ``kernels_cpu``, ``kernels_encode``, ``int4pack_layout``), the encoders ISQ and
``mistralpy quantize`` use (``quantize``, ``quantize_kquants``), and the file writer (``writer``,
``writer_tokenizer``, ``tensor``)."""
