"""Lazy checkpoint readers and the adapters chatglm.cpp's converter classes read from.

chatglm.cpp's `ChatGLM{2,3,4}Converter.convert(f, model, tokenizer, ggml_type)` only touches
`model.config.<attr>`, `model.state_dict()[name]` (one name at a time, in write order) and a little
tokenizer data. So instead of instantiating a model we hand it:

* `ConfigAdapter`  - the attributes it reads, built from config.json (no remote code),
* `LazyTensors`    - a name -> tensor mapping that reads one tensor from disk on access,
* `GlmToChatGLM`   - the same for transformers-native GLM, renaming and fusing q/k/v on the fly.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from types import SimpleNamespace

import torch

from builder.errors import BuilderError
from builder.model.tensors import load_bin, read_safetensors_header, read_tensor


class SafetensorsFile:
    """Single tensors of a .safetensors file, read on access (no mmap, so RSS stays one tensor)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.shard = read_safetensors_header(self.path, remedy="re-save or re-download it")

    def keys(self) -> list[str]:
        return list(self.shard.tensors)

    def get(self, name: str) -> torch.Tensor:
        with open(self.path, "rb", buffering=0) as f:
            return read_tensor(f, self.shard, self.shard.tensors[name])


class TorchBinFile:
    """A PyTorch .bin shard, memory-mapped and read with weights_only (no pickle code runs)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._sd: dict | None = None

    def _load(self) -> dict:
        if self._sd is None:
            self._sd = load_bin(self.path, remedy="convert it to safetensors or re-download it")
        return self._sd

    def keys(self) -> list[str]:
        return list(self._load())

    def get(self, name: str) -> torch.Tensor:
        return self._load()[name]


def _weight_files(model: Path) -> list[Path]:
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = model / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({model / v for v in weight_map.values()})
            missing = [p.name for p in files if not p.is_file()]
            if missing:
                raise BuilderError(f"{model}: shards listed in {index_name} are missing: {', '.join(missing[:5])}.")
            return files
        if (model / single).is_file():
            return [model / single]
    found = sorted(model.glob("*.safetensors")) or sorted(model.glob("pytorch_model*.bin"))
    if found:
        return found
    raise BuilderError(
        f"{model} has no weights (model.safetensors, pytorch_model.bin or their sharded index); "
        "point --model at a complete Hugging Face model folder."
    )


class LazyTensors(MutableMapping):
    """name -> tensor over all shards of a folder; each access reads that one tensor from disk."""

    def __init__(self, model: Path, upcast: bool = False):
        self.files = []
        self.where: dict[str, object] = {}
        for path in _weight_files(Path(model)):
            reader = SafetensorsFile(path) if path.suffix == ".safetensors" else TorchBinFile(path)
            self.files.append(reader)
            for name in reader.keys():
                self.where[name] = reader
        self.extra: dict[str, torch.Tensor] = {}
        self.upcast = upcast

    def raw(self, name: str) -> torch.Tensor:
        if name in self.extra:
            return self.extra[name]
        if name not in self.where:
            raise KeyError(name)
        return self.where[name].get(name)

    def __getitem__(self, name: str) -> torch.Tensor:
        t = self.raw(name)
        # Tensors stay in their stored dtype (half the memory of bf16 -> f32); the quantizers upcast
        # row chunks to float32, so results equal chatglm.cpp's float32 model load.
        if self.upcast and t.is_floating_point() and t.dtype != torch.float32:
            t = t.float()
        return t

    def __setitem__(self, name, value):
        self.extra[name] = value

    def __delitem__(self, name):
        self.extra.pop(name)

    def __contains__(self, name) -> bool:
        return name in self.extra or name in self.where

    def __iter__(self) -> Iterator[str]:
        yield from self.where
        yield from (k for k in self.extra if k not in self.where)

    def __len__(self) -> int:
        return len(set(self.where) | set(self.extra))


class GlmToChatGLM(MutableMapping):
    """chatglm.cpp GLM-4 names over a transformers-native GLM checkpoint (GlmForCausalLM), lazily."""

    def __init__(self, tensors: LazyTensors, num_layers: int, tied: bool, hidden_size: int, kv_dim: int):
        self.t = tensors
        self.num_layers = num_layers
        self.tied = tied
        self.hidden_size = hidden_size
        self.kv_dim = kv_dim
        self.extra: dict[str, torch.Tensor] = {}

    def names(self) -> list[str]:
        return chatglm_tensor_names(self.num_layers)

    def _src(self, name: str) -> str:
        simple = {
            "transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
            "transformer.encoder.final_layernorm.weight": "model.norm.weight",
            "transformer.output_layer.weight": "model.embed_tokens.weight" if self.tied else "lm_head.weight",
        }
        if name in simple:
            return simple[name]
        if not name.startswith("transformer.encoder.layers."):
            raise KeyError(name)
        rest = name[len("transformer.encoder.layers.") :]
        i, _, leaf = rest.partition(".")
        layer = f"model.layers.{i}."
        mapping = {
            "input_layernorm.weight": "input_layernorm.weight",
            "post_attention_layernorm.weight": "post_attention_layernorm.weight",
            "self_attention.dense.weight": "self_attn.o_proj.weight",
            "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",
            "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
        }
        if leaf in mapping:
            return layer + mapping[leaf]
        raise KeyError(name)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self.extra:
            return self.extra[name]
        if ".self_attention.query_key_value." in name:
            i = name.split(".")[3]
            kind = name.rsplit(".", 1)[1]  # weight | bias
            parts = []
            for proj in ("q_proj", "k_proj", "v_proj"):
                src = f"model.layers.{i}.self_attn.{proj}.{kind}"
                if src in self.t:
                    parts.append(self.t[src])
                elif kind == "bias":  # attention_bias=False: chatglm.cpp always adds a qkv bias, so feed zeros
                    rows = self.hidden_size if proj == "q_proj" else self.kv_dim
                    parts.append(torch.zeros(rows, dtype=torch.float32))
                else:
                    raise KeyError(f"{name}: checkpoint lacks {src}")
            out = torch.cat(parts, dim=0)
            del parts
            return out
        return self.t[self._src(name)]

    def __setitem__(self, name, value):
        self.extra[name] = value

    def __delitem__(self, name):
        self.extra.pop(name)

    def __iter__(self):
        yield from self.names()

    def __len__(self):
        return len(self.names())

    def missing(self) -> list[str]:
        """Source tensors the layout needs that the checkpoint lacks (checked before writing anything)."""
        need = []
        for name in self.names():
            if ".self_attention.query_key_value." in name:
                i = name.split(".")[3]
                kind = name.rsplit(".", 1)[1]
                if kind == "weight":
                    need += [f"model.layers.{i}.self_attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj")]
            else:
                need.append(self._src(name))
        return [n for n in need if n not in self.t]


def chatglm_tensor_names(num_layers: int) -> list[str]:
    """The tensors of chatglm.cpp's ChatGLM2/3 and GLM-4 layout, in writing order."""
    names = ["transformer.embedding.word_embeddings.weight"]
    for i in range(num_layers):
        p = f"transformer.encoder.layers.{i}."
        names += [
            p + "input_layernorm.weight",
            p + "self_attention.query_key_value.weight",
            p + "self_attention.query_key_value.bias",
            p + "self_attention.dense.weight",
            p + "post_attention_layernorm.weight",
            p + "mlp.dense_h_to_4h.weight",
            p + "mlp.dense_4h_to_h.weight",
        ]
    return names + ["transformer.encoder.final_layernorm.weight", "transformer.output_layer.weight"]


def chatglm_missing(tensors: LazyTensors, num_layers: int, pre_seq_len: int) -> list[str]:
    """Tensors an original ChatGLM2/3/GLM-4 checkpoint must hold for chatglm.cpp's layout."""
    need = chatglm_tensor_names(num_layers)
    if pre_seq_len:
        need.append("transformer.prefix_encoder.embedding.weight")
    return [n for n in need if n not in tensors]


class ModelAdapter:
    """What chatglm.cpp's converters read from a model: `.config`, `.state_dict()`, `.transformer.prefix_encoder`."""

    def __init__(self, config: SimpleNamespace, state_dict: MutableMapping):
        self.config = config
        self._state_dict = state_dict
        self.transformer = SimpleNamespace(prefix_encoder=self._prefix_encoder)

    def state_dict(self) -> MutableMapping:
        return self._state_dict

    def _prefix_encoder(self, tokens: torch.Tensor) -> torch.Tensor:
        # P-tuning v2 without projection: the prefix encoder is a plain embedding lookup.
        return self._state_dict["transformer.prefix_encoder.embedding.weight"][tokens]
