"""The one reader (and writer) of checkpoint tensor files: safetensors and PyTorch .bin.

Merge and both converters read through here. safetensors headers are parsed and checked up front
(a truncated or garbled file fails before anything is written) and tensors are read one at a time
with plain reads into a buffer of their own (no mmap, so memory stays one tensor); `.bin` state
dicts are memory-mapped with `weights_only=True` (no pickled code runs).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder.errors import BuilderError

ST_DTYPES: dict[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "U16": "uint16", "U32": "uint32", "U64": "uint64",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}  # fmt: skip


@dataclass
class TensorInfo:
    name: str
    dtype: str  # torch dtype name, e.g. "bfloat16"
    shape: tuple[int, ...]
    begin: int = 0  # byte offsets into the data section (safetensors) ...
    end: int = 0


@dataclass
class Shard:
    path: Path
    fmt: str  # "safetensors" | "bin"
    tensors: dict[str, TensorInfo]
    data_start: int = 0  # safetensors: 8 + header length
    size: int = 0


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def st_code(dtype_name: str) -> str:
    for code, name in ST_DTYPES.items():
        if name == dtype_name:
            return code
    raise BuilderError(f"dtype {dtype_name} cannot be stored in safetensors")


def itemsize(dtype_name: str) -> int:
    import torch

    return torch.empty((), dtype=torch_dtype(dtype_name)).element_size()


def read_safetensors_header(path: Path, remedy: str = "re-download or re-save the model") -> Shard:
    """Parse and sanity-check a safetensors header; a truncated or garbled file raises BuilderError
    ending in `remedy`."""
    what = f"{path} is not a valid safetensors file"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("shorter than 8 bytes")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100 << 20):
                raise ValueError("header length out of range")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise BuilderError(f"{what} ({e}); {remedy}") from None
    tensors: dict[str, TensorInfo] = {}
    data_len = size - 8 - n
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = ST_DTYPES[meta["dtype"]]
            shape = tuple(int(s) for s in meta["shape"])
            begin, end = (int(x) for x in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise BuilderError(f"{what} (bad entry for {name!r}); {remedy}") from None
        numel = math.prod(shape)
        if end - begin != numel * itemsize(dtype) or begin < 0 or end > data_len:
            raise BuilderError(
                f"{what}: tensor {name!r} lies outside the file (truncated or corrupt download?); {remedy}"
            )
        tensors[name] = TensorInfo(name, dtype, shape, begin, end)
    return Shard(path, "safetensors", tensors, data_start=8 + n, size=size)


def read_tensor(f, shard: Shard, info: TensorInfo):
    """Read one tensor of a safetensors file (open unbuffered as `f`) into a fresh buffer of its own."""
    import torch

    f.seek(shard.data_start + info.begin)
    nbytes = info.end - info.begin
    buf = torch.empty(nbytes, dtype=torch.uint8)
    view = memoryview(buf.numpy())
    got = 0
    while got < nbytes:
        n = f.readinto(view[got:])
        if not n:
            raise BuilderError(f"{shard.path} ended early while reading {info.name}; re-download it")
        got += n
    return buf.view(torch_dtype(info.dtype)).reshape(info.shape)


def load_bin(path: Path, remedy: str | None = None) -> dict:
    """A .bin state dict, memory-mapped (pages are read when a tensor is used), weights only.
    Old non-zip pickles cannot be memory-mapped: those are read whole."""
    import torch

    try:
        try:
            sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad zip/pickle
        remedy = remedy or "re-download it, or re-save it as safetensors"
        raise BuilderError(f"{path} could not be loaded ({type(e).__name__}: {e}); {remedy}") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise BuilderError(
            f"{path} is not a state dict of tensors; {remedy or 'pass a model saved with save_pretrained'}"
        )
    return sd


def read_bin_header(path: Path) -> Shard:
    sd = load_bin(path)
    tensors = {k: TensorInfo(k, str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in sd.items()}
    return Shard(path, "bin", tensors, size=path.stat().st_size)


class SafetensorsWriter:
    """Writes a safetensors file whose header is fixed up front, then each tensor's bytes in order."""

    def __init__(self, path: Path, entries: list[tuple[str, str, tuple[int, ...]]]):
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        self.expected: list[tuple[str, str, tuple[int, ...], int]] = []
        for name, dtype, shape in entries:
            nbytes = math.prod(shape) * itemsize(dtype)
            header[name] = {"dtype": st_code(dtype), "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self.expected.append((name, dtype, shape, nbytes))
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self.path = path
        self.f = open(path, "wb")
        self.f.write(struct.pack("<Q", len(blob)) + blob)
        self.i = 0

    def write(self, name: str, tensor) -> None:
        exp_name, dtype, shape, nbytes = self.expected[self.i]
        if name != exp_name or str(tensor.dtype) != f"torch.{dtype}" or tuple(tensor.shape) != shape:
            raise RuntimeError(f"internal: wrote {name} {tensor.dtype} {tuple(tensor.shape)}, header says {exp_name}")
        if nbytes:
            self.f.write(memoryview(as_bytes(tensor).numpy()))
        self.i += 1

    def close(self) -> None:
        self.f.close()
        if self.i != len(self.expected):
            raise RuntimeError(f"internal: {self.path} got {self.i} of {len(self.expected)} tensors")


def as_bytes(tensor):
    """A flat uint8 view of a CPU tensor (a copy only if it is not contiguous)."""
    import torch

    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)
