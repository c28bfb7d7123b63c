from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(min(2, os.cpu_count() or 1))

from fixtures_tokenizer import train_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """Folder with tokenizer.json + tokenizer_config.json (ChatML), vocab 4096."""
    return train_tokenizer(tmp_path_factory.mktemp("tokenizer"))


PORTABLE_NAMESPACE = "mistralpy_cpu_portable"


@pytest.fixture(scope="session")
def portable_ops():
    """torch.ops namespace of the CPU kernel extension built for plain x86-64 (the scalar paths a CPU
    without AVX-512 gets), built and loaded once per test session; skips when it cannot be built."""
    from mistralpy.quant import cpu_ext

    if not cpu_ext.load():
        pytest.skip("CPU extension could not be built")
    if PORTABLE_NAMESPACE not in cpu_ext._loaded:
        try:
            cpu_ext.load_namespace(PORTABLE_NAMESPACE, "x86-64")
        except Exception as exc:  # noqa: BLE001
            pytest.skip(f"portable build failed: {exc}")
    return getattr(torch.ops, PORTABLE_NAMESPACE)
