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
