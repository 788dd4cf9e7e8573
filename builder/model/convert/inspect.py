"""Read and validate a chatglm.cpp GGML file: header, config record, tokenizer, every tensor record."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

from builder.errors import BuilderError

MODEL_TYPES = {1: "ChatGLM", 2: "ChatGLM2", 3: "ChatGLM3", 4: "ChatGLM4", 1004: "ChatGLM4V"}
GGML_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0"}
# bytes per block of `block` values
_TYPE_SIZE = {0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34)}
CONFIG_FIELDS = [
    "dtype",
    "vocab_size",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "num_hidden_layers",
    "intermediate_size",
    "norm_eps",
    "num_virtual_tokens",
    "rope_theta",
    "max_length",
    "eos_token_id",
    "pad_token_id",
]
VISION_FIELDS = [
    "dtype",
    "hidden_size",
    "image_size",
    "in_channels",
    "intermediate_size",
    "norm_eps",
    "num_attention_heads",
    "num_hidden_layers",
    "num_positions",
    "patch_size",
    "scaling_factor",
]
ALIGN = 16


@dataclass
class TensorRecord:
    name: str
    shape: tuple[int, ...]
    ggml_type: str
    offset: int
    nbytes: int


@dataclass
class GGMLInfo:
    path: Path
    size: int
    model_type: str
    config_version: int
    config: dict
    vision_config: dict | None
    tokenizer_kind: str
    tokenizer_bytes: int
    tokenizer_size: int | None
    tensors: list[TensorRecord] = field(default_factory=list)


class _Reader:
    def __init__(self, f, path: Path, size: int):
        self.f, self.path, self.size = f, path, size

    def bad(self, what: str) -> BuilderError:
        return BuilderError(
            f"{self.path} is truncated or not a chatglm.cpp GGML file ({what} at byte {self.f.tell()} of "
            f"{self.size}); re-run `python -m builder convert` to rebuild it."
        )

    def read(self, n: int, what: str) -> bytes:
        if n < 0 or self.f.tell() + n > self.size:
            raise self.bad(f"{what} runs past the end")
        data = self.f.read(n)
        if len(data) != n:
            raise self.bad(f"short read in {what}")
        return data

    def unpack(self, fmt: str, what: str):
        return struct.unpack("<" + fmt, self.read(struct.calcsize("<" + fmt), what))


def _tokenizer_size(kind: str, data: bytes) -> int | None:
    if kind == "tiktoken":
        return sum(1 for ln in data.split(b"\n") if ln.strip()) + 14
    try:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        sp.LoadFromSerializedProto(data)
        return sp.get_piece_size()
    except Exception:  # noqa: BLE001 - informational only
        return None


def read_ggml(path: Path) -> GGMLInfo:
    """Parse every record of a chatglm.cpp GGML file; raise BuilderError unless they end exactly at EOF."""
    path = Path(path)
    if not path.is_file():
        raise BuilderError(f"{path} does not exist or is not a file.")
    size = path.stat().st_size
    with open(path, "rb") as f:
        r = _Reader(f, path, size)
        if size < 8 or f.read(4) != b"ggml":
            raise BuilderError(
                f"{path} is not a chatglm.cpp GGML file (no 'ggml' magic); GGUF/llama.cpp files and "
                "Hugging Face weights are not GGML - convert with `python -m builder convert`."
            )
        (mt,) = r.unpack("i", "model type")
        if mt not in MODEL_TYPES:
            raise r.bad(f"unknown model type {mt}")
        if mt == 1:
            raise BuilderError(f"{path} is a ChatGLM-6B (v1) file; inspect only reads ChatGLM2/3/4 files.")
        (version,) = r.unpack("i", "config version")
        if version != 2:
            raise r.bad(f"unknown config version {version}")
        values = r.unpack("iiiiiiififiii", "config record")
        config = dict(zip(CONFIG_FIELDS, values, strict=True))
        if config["dtype"] not in GGML_TYPES:
            raise r.bad(f"unknown dtype {config['dtype']}")
        config["dtype"] = GGML_TYPES[config["dtype"]]
        for k in ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers"):
            if config[k] <= 0:
                raise r.bad(f"config {k}={config[k]}")
        vision = None
        if mt == 1004:
            vision = dict(zip(VISION_FIELDS, r.unpack("iiiiifiiiif", "vision config"), strict=True))
        (tok_len,) = r.unpack("i", "tokenizer length")
        tok = r.read(tok_len, "tokenizer")
        kind = "tiktoken" if mt in (4, 1004) else "sentencepiece"
        info = GGMLInfo(path, size, MODEL_TYPES[mt], version, config, vision, kind, tok_len, _tokenizer_size(kind, tok))

        while f.tell() < size:
            (name_len,) = r.unpack("i", "tensor name length")
            if not 0 < name_len < 1024:
                raise r.bad(f"tensor name length {name_len}")
            try:
                name = r.read(name_len, "tensor name").decode()
            except UnicodeDecodeError:
                raise r.bad("tensor name is not UTF-8") from None
            (ndim,) = r.unpack("i", "tensor rank")
            if not 1 <= ndim <= 4:
                raise r.bad(f"tensor {name} has rank {ndim}")
            shape = r.unpack("i" * ndim, "tensor shape")
            (gt,) = r.unpack("i", "tensor type")
            if gt not in _TYPE_SIZE or any(d <= 0 for d in shape):
                raise r.bad(f"tensor {name} has type {gt} / shape {shape}")
            block, per = _TYPE_SIZE[gt]
            if shape[-1] % block:
                raise r.bad(f"tensor {name} row of {shape[-1]} is not a multiple of {block}")
            n = 1
            for d in shape:
                n *= d
            nbytes = n // block * per
            start = (f.tell() + ALIGN - 1) // ALIGN * ALIGN
            if start + nbytes > size:
                raise r.bad(f"tensor {name} data ({nbytes} bytes) runs past the end")
            info.tensors.append(TensorRecord(name, tuple(shape), GGML_TYPES[gt], start, nbytes))
            f.seek(start + nbytes)
        if f.tell() != size:
            raise r.bad("records do not end at the end of the file")
        if not info.tensors:
            raise r.bad("no tensors")
    return info


def main(file: Path) -> None:
    """Print a GGML file's header, config, tokenizer and tensor table; BuilderError if it is malformed."""
    from rich.console import Console
    from rich.table import Table

    info = read_ggml(Path(file))
    console = Console(soft_wrap=True)
    console.print(f"file          {info.path} ({info.size:,} bytes)")
    console.print("magic         ggml")
    console.print(f"model type    {info.model_type}")
    console.print(f"config v{info.config_version}     " + ", ".join(f"{k}={v}" for k, v in info.config.items()))
    if info.vision_config:
        console.print("vision        " + ", ".join(f"{k}={v}" for k, v in info.vision_config.items()))
    tok_size = f"{info.tokenizer_size:,} tokens" if info.tokenizer_size is not None else "size unknown"
    console.print(f"tokenizer     {info.tokenizer_kind}, {info.tokenizer_bytes:,} bytes, {tok_size}")
    table = Table(title=f"{len(info.tensors)} tensors")
    for col in ("name", "shape", "type", "bytes"):
        table.add_column(col, justify="right" if col == "bytes" else "left")
    for t in info.tensors:
        table.add_row(t.name, " x ".join(map(str, t.shape)), t.ggml_type, f"{t.nbytes:,}")
    console.print(table)
    console.print(f"ok: {len(info.tensors)} tensor records end exactly at byte {info.size:,}")
