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


CPU_VARIANTS = ("avx512", "avx2", "scalar")


def _variant_ns(variant: str) -> str:
    from mistralpy.kernels import cpu as cpu_ext

    if not cpu_ext.load():
        pytest.skip("CPU extension could not be built")
    if variant not in cpu_ext.runnable_variants():
        pytest.skip(f"this CPU cannot run the {variant} build")
    try:
        return cpu_ext.load_variant(variant)
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"{variant} build failed: {exc}")


@pytest.fixture(scope="session", params=CPU_VARIANTS)
def variant_ops(request):
    """(variant, torch.ops namespace) of each ISA build of the CPU kernel extension this CPU can run,
    built and loaded once per test session (the chosen one is shared with the engine): the tests that
    take it run on every code path the machine can execute, so a Zen 4 also checks AVX2 and scalar."""
    return request.param, getattr(torch.ops, _variant_ns(request.param))


@pytest.fixture(scope="session")
def portable_ops():
    """The scalar build's torch.ops namespace (the code path that defines behaviour everywhere)."""
    return getattr(torch.ops, _variant_ns("scalar"))
