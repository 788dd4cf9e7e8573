"""Small real GGUF files, written by llama.cpp's own gguf-py writer (the package, or the pinned source's copy)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from builder.model.gguf.convert import _gguf_module

# tensor name -> shape (numpy order) of the tiny model: 3*8 + 4*8 + 8 = 64 parameters
TENSORS = {"token_embd.weight": (3, 8), "output.weight": (4, 8), "output_norm.weight": (8,)}
PARAMETERS = 64


def write_gguf(path: Path, arch: str = "llama", name: str = "tiny", lora: bool = False) -> Path:
    """A GGUF with scalar, string and array metadata (a vocabulary, scores, a nested merges-like list) and
    three tensors (f32 and f16)."""
    gguf = _gguf_module()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_block_count(2)
    w.add_context_length(128)
    w.add_file_type(1)
    w.add_token_list(["<s>", "a", "b"])
    w.add_token_scores([0.0, -1.0, -2.0])
    w.add_array("tokenizer.ggml.token_type", [1, 1, 1])
    w.add_bool("tiny.flag", True)
    w.add_float32("tiny.rope_scale", 0.5)
    if lora:
        w.add_string("general.type", "adapter")
        w.add_string("adapter.type", "lora")
        w.add_float32("adapter.lora.alpha", 16.0)
    for i, (tensor, shape) in enumerate(TENSORS.items()):
        dtype = np.float16 if i == 1 else np.float32
        w.add_tensor(tensor, np.arange(int(np.prod(shape)), dtype=dtype).reshape(shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
