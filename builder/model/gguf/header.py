"""A GGUF file's header (stdlib only): its metadata key-value pairs and its parameter count, read without
loading a tensor. What a model artifact's config describes (architecture, size, quantization).

Layout (GGUF version 2 and 3, little-endian): magic "GGUF", u32 version, u64 tensor count, u64 key-value
count, the key-value pairs (u64-length string key, u32 type, value), then per tensor its name, u32 rank,
u64 dimensions, u32 type and u64 offset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

# the same stdlib reader the Xinference image uses to register a GGUF alone
from builder.runtime.xinference.gguf_meta import read_scalar, read_string, read_value


@dataclass(frozen=True)
class GgufHeader:
    version: int
    metadata: dict[str, object]  # arrays (the vocabulary, merges) are left out: only their length is skipped
    parameters: int  # sum over the tensors of their element counts

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))


def read_header(path: Path) -> GgufHeader:
    """The metadata (scalars and strings) and the parameter count of the GGUF at `path`."""
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        version, tensors, pairs = read_scalar(f, "<I"), read_scalar(f, "<Q"), read_scalar(f, "<Q")
        metadata: dict[str, object] = {}
        for _ in range(pairs):
            key = read_string(f)
            value = read_value(f, read_scalar(f, "<I"), keep=False)
            if value is not None:
                metadata[key] = value
        parameters = 0
        for _ in range(tensors):
            read_string(f)
            dims = [read_scalar(f, "<Q") for _ in range(read_scalar(f, "<I"))]
            read_scalar(f, "<I"), read_scalar(f, "<Q")
            parameters += math.prod(dims)
    return GgufHeader(version, metadata, parameters)


def parameter_label(count: int, spaced: bool = True) -> str:
    """76012345 -> "76.01 M" (Docker's model config style), or with spaced=False "76.0m" (ModelPack's
    paramSize: one decimal and a scale letter)."""
    for scale, letter in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.2f} {letter}" if spaced else f"{count / scale:.1f}{letter.lower()}"
    return f"{count}" if spaced else f"{count / 1e3:.1f}k"
