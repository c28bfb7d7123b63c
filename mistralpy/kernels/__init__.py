"""Hand-written kernels, by device: ``kernels.cpu`` is the C++ CPU extension (one source per op family,
built per ISA variant; its Python wrappers live beside the layers that call them)."""
