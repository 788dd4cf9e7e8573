"""A GGUF file's header (stdlib only): its metadata key-value pairs and its parameter count, read without
loading a tensor. What a model artifact's config describes (architecture, size, quantization).

Layout (GGUF version 2 and 3, little-endian): magic "GGUF", u32 version, u64 tensor count, u64 key-value
count, the key-value pairs (u64-length string key, u32 type, value), then per tensor its name, u32 rank,
u64 dimensions, u32 type and u64 offset.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

# value type -> struct format of the scalar types
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GgufHeader:
    version: int
    metadata: dict[str, object]  # arrays (the vocabulary, merges) are left out: only their length is skipped
    parameters: int  # sum over the tensors of their element counts

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))


def _read(f: BinaryIO, fmt: str):
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise ValueError("truncated GGUF header")
    return struct.unpack(fmt, data)[0]


def _string(f: BinaryIO) -> str:
    n = _read(f, "<Q")
    if n > 1 << 24:
        raise ValueError("GGUF string longer than 16 MiB: not a GGUF header")
    return f.read(n).decode("utf-8", errors="replace")


def _value(f: BinaryIO, kind: int, keep: bool = True):
    if kind in _SCALARS:
        return _read(f, _SCALARS[kind])
    if kind == _STRING:
        return _string(f)
    if kind == _ARRAY:
        item, n = _read(f, "<I"), _read(f, "<Q")
        if item in _SCALARS:  # fixed-size items: skip them at once
            f.seek(n * struct.calcsize(_SCALARS[item]), 1)
        else:
            for _ in range(n):
                _value(f, item, keep=False)
        return None
    raise ValueError(f"unknown GGUF value type {kind}")


def read_header(path: Path) -> GgufHeader:
    """The metadata (scalars and strings) and the parameter count of the GGUF at `path`."""
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        version, tensors, pairs = _read(f, "<I"), _read(f, "<Q"), _read(f, "<Q")
        metadata: dict[str, object] = {}
        for _ in range(pairs):
            key = _string(f)
            value = _value(f, _read(f, "<I"))
            if value is not None:
                metadata[key] = value
        parameters = 0
        for _ in range(tensors):
            _string(f)
            dims = [_read(f, "<Q") for _ in range(_read(f, "<I"))]
            _read(f, "<I"), _read(f, "<Q")
            parameters += math.prod(dims)
    return GgufHeader(version, metadata, parameters)


def parameter_label(count: int, spaced: bool = True) -> str:
    """76012345 -> "76.01 M" (Docker's model config style), or with spaced=False "76.0m" (ModelPack's
    paramSize: one decimal and a scale letter)."""
    for scale, letter in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.2f} {letter}" if spaced else f"{count / scale:.1f}{letter.lower()}"
    return f"{count}" if spaced else f"{count / 1e3:.1f}k"
