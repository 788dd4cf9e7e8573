"""What the registration reads from a GGUF's own metadata when the model folder holds the GGUF alone (the
engine image serving a mounted weights image): the chat template, the stop token and the context length that
llama.cpp's converter wrote from the Hugging Face folder's tokenizer and config. Stdlib only: it ships in the
image.

Layout (GGUF version 2 and 3, little-endian): magic "GGUF", u32 version, u64 tensor count, u64 key-value count,
then the key-value pairs (u64-length string key, u32 type, value)."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
TOKENS = "tokenizer.ggml.tokens"  # the vocabulary: the one array kept (the stop token's string is looked up in it)


def read_scalar(f: BinaryIO, fmt: str):
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise ValueError("truncated GGUF header")
    return struct.unpack(fmt, data)[0]


def read_string(f: BinaryIO) -> str:
    n = read_scalar(f, "<Q")
    if n > 1 << 24:
        raise ValueError("GGUF string longer than 16 MiB: not a GGUF header")
    return f.read(n).decode("utf-8", errors="replace")


def read_value(f: BinaryIO, kind: int, keep: bool):
    """One metadata value of type `kind`; arrays are read (`keep`) or skipped (None), fixed-size ones at once."""
    if kind in _SCALARS:
        return read_scalar(f, _SCALARS[kind])
    if kind == _STRING:
        return read_string(f)
    if kind == _ARRAY:
        item, n = read_scalar(f, "<I"), read_scalar(f, "<Q")
        if item in _SCALARS and not keep:  # fixed-size items: skip them at once
            f.seek(n * struct.calcsize(_SCALARS[item]), 1)
            return None
        values = [read_value(f, item, keep) for _ in range(n)]
        return values if keep else None
    raise ValueError(f"unknown GGUF value type {kind}")


def read_metadata(path: Path) -> dict[str, object]:
    """The GGUF's metadata: scalars, strings and the vocabulary (other arrays are skipped)."""
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        read_scalar(f, "<I"), read_scalar(f, "<Q")
        pairs = read_scalar(f, "<Q")
        metadata: dict[str, object] = {}
        for _ in range(pairs):
            key = read_string(f)
            value = read_value(f, read_scalar(f, "<I"), keep=key == TOKENS)
            if value is not None:
                metadata[key] = value
    return metadata


def registration_facts(path: Path) -> dict:
    """{chat_template, stop_token_ids, stop, context_length} as the GGUF at `path` records them (None / [] where
    it has none; context_length 2048 like a config.json without one)."""
    meta = read_metadata(path)
    arch = meta.get("general.architecture")
    ids = [
        int(meta[key])
        for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
        if isinstance(meta.get(key), int)
    ]
    ids = list(dict.fromkeys(ids))
    tokens = meta.get(TOKENS) or []
    context = meta.get(f"{arch}.context_length")
    return {
        "chat_template": meta.get("tokenizer.chat_template") or None,
        "stop_token_ids": ids,
        "stop": [tokens[i] for i in ids if isinstance(tokens, list) and i < len(tokens)],
        "context_length": context if isinstance(context, int) and context > 0 else 2048,
    }
