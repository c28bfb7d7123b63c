"""A fast GGUF reader: metadata and tensor infos parsed straight from the memory-mapped file.

`gguf.GGUFReader` builds a numpy view per string of every array field, which takes seconds for a
large vocabulary (~10 s of CPU for Gemma 3's 262,144 tokens); this reader decodes the same header
in a fraction of that and exposes the subset of GGUFReader's interface the loader uses:
``fields[key].contents()`` and ``tensors`` (``name``, ``shape`` fastest dimension first,
``tensor_type``, ``n_elements``, ``n_bytes``, ``data`` as a read-only view of the mapped bytes).
Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md (little-endian files).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from mistralpy.errors import ModelLoadError

_MAGIC = b"GGUF"
# GGUF value type -> (struct format, numpy dtype) for fixed-size scalars.
_SCALARS: dict[int, tuple[str, str]] = {
    0: ("<B", "<u1"), 1: ("<b", "<i1"), 2: ("<H", "<u2"), 3: ("<h", "<i2"), 4: ("<I", "<u4"), 5: ("<i", "<i4"),
    6: ("<f", "<f4"), 7: ("<?", "?"), 10: ("<Q", "<u8"), 11: ("<q", "<i8"), 12: ("<d", "<f8"),
}
_STRING, _ARRAY = 8, 9
# Tensor data views with a numpy dtype (what GGUFReader gives); block types stay bytes.
_FLOAT_DTYPES = {Q.F32: np.float32, Q.F16: np.float16, Q.F64: np.float64, Q.I8: np.int8, Q.I16: np.int16,
                 Q.I32: np.int32, Q.I64: np.int64}


@dataclass(slots=True)
class Field:
    """One metadata key-value; ``contents()`` is the Python value (lists for arrays)."""

    name: str
    value: Any

    def contents(self) -> Any:
        return self.value


@dataclass(slots=True)
class TensorInfo:
    name: str
    shape: np.ndarray  # GGUF order: fastest-varying dimension first
    tensor_type: Q
    n_elements: int
    n_bytes: int
    data: np.ndarray  # read-only view into the mapped file


class GGUFFile:
    """Header of one .gguf file (metadata + tensor infos) over a read-only memory map."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        try:
            self._mm = np.memmap(self.path, mode="r")
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot open GGUF file {path}: {exc}") from exc
        self._buf = memoryview(self._mm)
        self._pos = 0
        if bytes(self._buf[:4]) != _MAGIC:
            raise ModelLoadError(f"{path} is not a GGUF file (bad magic)")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", self._buf, 4)
        if version not in (2, 3):
            raise ModelLoadError(f"{path}: GGUF version {version} is not supported (2, 3)")
        self._pos = 4 + 4 + 16
        self.fields: dict[str, Field] = {}
        for _ in range(n_kv):
            key = self._string()
            (vtype,) = self._unpack("<I")
            self.fields[key] = Field(key, self._value(vtype))
        infos = [self._tensor_info() for _ in range(n_tensors)]
        alignment = int(self.fields["general.alignment"].value) if "general.alignment" in self.fields else 32
        start = -(-self._pos // alignment) * alignment
        self.tensors: list[TensorInfo] = [self._tensor(start, *info) for info in infos]

    # ---- primitive readers ------------------------------------------------------------------
    def _unpack(self, fmt: str) -> tuple:
        out = struct.unpack_from(fmt, self._buf, self._pos)
        self._pos += struct.calcsize(fmt)
        return out

    def _string(self) -> str:
        (n,) = struct.unpack_from("<Q", self._buf, self._pos)
        start = self._pos + 8
        self._pos = start + n
        # A token that is not valid UTF-8 must not stop loading (llama.cpp keeps such bytes too).
        return bytes(self._buf[start:self._pos]).decode("utf-8", errors="replace")

    def _value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self._string()
        if vtype in _SCALARS:
            return self._unpack(_SCALARS[vtype][0])[0]
        if vtype == _ARRAY:
            itype, count = self._unpack("<IQ")
            if itype in _SCALARS:  # one numpy read for the whole array
                dtype = np.dtype(_SCALARS[itype][1])
                arr = np.frombuffer(self._buf, dtype=dtype, count=count, offset=self._pos)
                self._pos += count * dtype.itemsize
                return arr.tolist()
            if itype == _STRING:
                return self._strings(count)
            return [self._value(itype) for _ in range(count)]
        raise ModelLoadError(f"{self.path}: unknown GGUF value type {vtype}")

    def _strings(self, count: int) -> list[str]:
        buf, pos, out = self._buf, self._pos, []
        unpack = struct.Struct("<Q").unpack_from
        for _ in range(count):
            (n,) = unpack(buf, pos)
            pos += 8
            out.append(bytes(buf[pos:pos + n]).decode("utf-8", errors="replace"))
            pos += n
        self._pos = pos
        return out

    def _tensor_info(self) -> tuple[str, list[int], int, int]:
        name = self._string()
        (n_dims,) = self._unpack("<I")
        dims = list(self._unpack(f"<{n_dims}Q"))
        ttype, offset = self._unpack("<IQ")
        return name, dims, ttype, offset

    def _tensor(self, start: int, name: str, dims: list[int], ttype: int, offset: int) -> TensorInfo:
        try:
            qtype = Q(ttype)
        except ValueError:
            raise ModelLoadError(f"{self.path}: tensor {name} has unknown ggml type {ttype}") from None
        n_elements = int(np.prod(dims)) if dims else 1
        block, type_size = GGML_QUANT_SIZES[qtype]
        n_bytes = n_elements // block * type_size
        begin = start + offset
        if begin + n_bytes > len(self._mm):
            raise ModelLoadError(f"{self.path}: tensor {name} runs past the end of the file (truncated?)")
        raw = self._mm[begin:begin + n_bytes]
        rows = list(reversed(dims))  # slowest dimension first, like GGUFReader
        if qtype in _FLOAT_DTYPES:
            data = raw.view(_FLOAT_DTYPES[qtype]).reshape(rows)
        else:
            data = raw.reshape(*rows[:-1], rows[-1] // block * type_size)
        return TensorInfo(name, np.array(dims, dtype=np.uint64), qtype, n_elements, n_bytes, data)
