"""The stdlib GGUF header reader (builder/model/gguf/header.py) on files written by llama.cpp's gguf-py writer,
compared with gguf-py's own reader."""

from __future__ import annotations

import pytest
from _gguf_file import PARAMETERS, write_gguf

from builder.model.gguf.convert import _gguf_module
from builder.model.gguf.header import parameter_label, read_header


def test_header_matches_gguf_py(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", arch="qwen2", name="tiny-qwen")
    header = read_header(path)
    reader = _gguf_module().GGUFReader(path)
    assert header.version == 3
    assert header.architecture == "qwen2"
    assert header.parameters == PARAMETERS == sum(int(t.n_elements) for t in reader.tensors)
    assert header.metadata["general.name"] == "tiny-qwen"
    assert header.metadata["qwen2.block_count"] == 2 and header.metadata["qwen2.context_length"] == 128
    assert header.metadata["tiny.flag"] is True and header.metadata["tiny.rope_scale"] == 0.5
    # arrays are skipped (their bytes, not kept); every scalar and string key gguf-py reads is here
    assert "tokenizer.ggml.tokens" not in header.metadata and "tokenizer.ggml.scores" not in header.metadata
    scalar_keys = {k for k, f in reader.fields.items() if not k.startswith("GGUF.") and len(f.types) == 1}
    assert set(header.metadata) == scalar_keys


def test_lora_header(tmp_path):
    header = read_header(write_gguf(tmp_path / "l.gguf", lora=True))
    assert header.metadata["general.type"] == "adapter" and header.metadata["adapter.type"] == "lora"


def test_not_a_gguf_or_truncated(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"PK\x03\x04" + bytes(64))
    with pytest.raises(ValueError, match="not a GGUF"):
        read_header(bad)
    path = write_gguf(tmp_path / "m.gguf")
    data = path.read_bytes()
    for cut in (10, 30, 200, 500):  # in the counts, in a key, in the key-value pairs, in the tensor table
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="truncated|not a GGUF"):
            read_header(bad)
    bad.write_bytes(data[:24] + (2**40).to_bytes(8, "little") + data[32:])  # a first key of 1 TiB
    with pytest.raises(ValueError, match="longer than 16 MiB"):
        read_header(bad)


@pytest.mark.parametrize(
    "count, docker, modelpack",
    [(64, "64", "0.1k"), (1_500, "1.50 K", "1.5k"), (76_012_345, "76.01 M", "76.0m"),
     (7_241_732_096, "7.24 B", "7.2b"), (1_000_000_000_000, "1.00 T", "1.0t")],
)  # fmt: skip
def test_parameter_labels(count, docker, modelpack):
    assert parameter_label(count) == docker
    assert parameter_label(count, spaced=False) == modelpack
