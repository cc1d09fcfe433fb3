"""The header of a GGUF model file — scalar metadata and tensor infos — read quickly.

``gguf.GGUFReader`` builds numpy views for every element of every metadata array; on the embedded
SmolLM2 file (49k tokens, 49k merges) that took 3.0 s per open here (6 s on a busy machine), only
to learn the architecture and the tensor shapes. This reader steps over arrays by their lengths
and keeps scalar values only: 0.02 s on the same file, same tensor infos and data (checked in
tests/test_export.py). Tensor data is read through a numpy
memmap and decoded with gguf's own ``dequantize``. Files that need every field copied (the
merged-gguf export) still use GGUFReader.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_MAGIC = b"GGUF"
# GGUFValueType → struct format of a scalar (8: string, 9: array are handled apart)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    """ggml order (ne): the row length first, as GGUFReader's ``shape``."""
    ggml_type: int
    offset: int
    """Byte offset of the tensor's data in the file."""


@dataclass
class GgufHeader:
    path: Path
    metadata: dict[str, Any]
    """Scalar and string values; arrays are recorded as their length only."""
    tensors: dict[str, TensorInfo]

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def tensor_data(self, name: str) -> Any:
        """The tensor as float32, numpy order (rows, row length), dequantized by gguf."""
        import numpy as np
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, dequantize

        info = self.tensors[name]
        kind = GGMLQuantizationType(info.ggml_type)
        block, size = GGML_QUANT_SIZES[kind]
        rows = 1
        for dim in info.shape[1:]:
            rows *= dim
        row_bytes = info.shape[0] // block * size
        raw = np.memmap(self.path, dtype=np.uint8, mode="r", offset=info.offset, shape=(rows, row_bytes))
        return dequantize(np.array(raw), kind).reshape(tuple(reversed(info.shape)))


def read_header(path: str | Path) -> GgufHeader:
    path = Path(path)
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        try:
            return _parse(path, data)
        except (struct.error, IndexError, KeyError) as exc:
            raise ValueError(f"{path}: damaged GGUF header ({type(exc).__name__}: {exc})") from None


def _parse(path: Path, data: Any) -> GgufHeader:
    if data[:4] != _MAGIC:
        raise ValueError(f"{path} is not a GGUF file")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", data, 4)
    if version not in (2, 3):
        raise ValueError(f"{path}: unsupported GGUF version {version}")
    pos = 24

    def string() -> str:
        nonlocal pos
        (length,) = struct.unpack_from("<Q", data, pos)
        text = data[pos + 8:pos + 8 + length].decode("utf-8", errors="replace")
        pos += 8 + length
        return text

    def skip(kind: int, count: int) -> None:
        nonlocal pos
        if kind == 8:
            for _ in range(count):
                (length,) = struct.unpack_from("<Q", data, pos)
                pos += 8 + length
        elif kind == 9:
            for _ in range(count):
                sub, n = struct.unpack_from("<IQ", data, pos)
                pos += 12
                skip(sub, n)
        else:
            pos += struct.calcsize("<" + _SCALARS[kind]) * count

    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = string()
        (kind,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if kind == 8:
            metadata[key] = string()
        elif kind == 9:
            sub, n = struct.unpack_from("<IQ", data, pos)
            pos += 12
            skip(sub, n)
            metadata[key] = n
        else:
            fmt = "<" + _SCALARS[kind]
            (metadata[key],) = struct.unpack_from(fmt, data, pos)
            pos += struct.calcsize(fmt)
    infos = []
    for _ in range(n_tensors):
        name = string()
        (n_dims,) = struct.unpack_from("<I", data, pos)
        shape = struct.unpack_from(f"<{n_dims}Q", data, pos + 4)
        ggml_type, offset = struct.unpack_from("<IQ", data, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        infos.append((name, tuple(int(d) for d in shape), int(ggml_type), int(offset)))
    alignment = int(metadata.get("general.alignment", 32))
    start = pos + (-pos) % alignment
    tensors = {name: TensorInfo(name, shape, kind, start + offset) for name, shape, kind, offset in infos}
    return GgufHeader(path=path, metadata=metadata, tensors=tensors)
