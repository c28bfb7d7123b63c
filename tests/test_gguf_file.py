"""Our fast GGUF header reader (loading/gguf_file.py) against gguf's GGUFReader: same metadata,
same tensor infos, the same bytes."""
from __future__ import annotations

import numpy as np
import pytest
from assets import smollm2_gguf_path
from fixtures_gguf import write_gguf
from fixtures_models import build_checkpoint
from gguf import GGUFReader

from mistralpy.errors import ModelLoadError
from mistralpy.loading.gguf_file import GGUFFile


def _same(path) -> None:
    ours, ref = GGUFFile(path), GGUFReader(str(path))
    keys = [k for k in ref.fields if not k.startswith("GGUF.")]
    assert list(ours.fields) == keys
    for k in keys:
        assert ours.fields[k].contents() == ref.fields[k].contents(), k
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(ours.tensors, ref.tensors):
        assert (a.tensor_type, a.shape.tolist(), a.n_elements, a.n_bytes) == (
            b.tensor_type, b.shape.tolist(), b.n_elements, b.n_bytes), a.name
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape, a.name
        assert np.array_equal(a.data.view(np.uint8), b.data.view(np.uint8)), a.name


@pytest.mark.parametrize("weight_type", ["F32", "F16", "Q8_0", "Q4_1"])
def test_matches_gguf_reader_on_written_files(tmp_path, tokenizer_dir, weight_type):
    hf = build_checkpoint(tmp_path / "hf", "llama", tokenizer_dir)
    _same(write_gguf(hf, tmp_path / f"m-{weight_type}.gguf", weight_type))


def test_matches_gguf_reader_on_real_file():
    _same(smollm2_gguf_path())


def test_bad_files_are_load_errors(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        GGUFFile(junk)
    real = smollm2_gguf_path().read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(real[: len(real) // 2])
    with pytest.raises(ModelLoadError, match="past the end"):
        GGUFFile(cut)
