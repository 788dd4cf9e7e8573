"""Merge a LoRA adapter into its base, one shard at a time, bit-equal to peft's `merge_and_unload`.

The model is never instantiated. Each base shard is read tensor by tensor in file order (another thread
hashes the file for the provenance record), every LoRA delta is applied to the tensor it targets, and
the tensor is streamed straight into the output shard, whose safetensors header is known up front
(merging changes no shape). Adapter tensors are read when their module comes up. Memory stays at
about the largest tensor plus its fp32 LoRA delta and a write-ahead queue, whatever the model size.

Bit-equality: the math is peft's. Plain LoRA / rsLoRA on a Linear or Conv1D repeats peft's
`get_delta_weight` + `merge` op for op: the adapter in the dtype `PeftModel.from_pretrained` gives it
(half types autocast to fp32), the same whole-matrix `B @ A`, then `* scaling` and `+=` (elementwise,
so doing them a block of rows at a time gives the same bits); fan_in_fan_out, rank/alpha patterns
included. DoRA and embedding LoRA run peft's own code: a single `peft.tuners.lora.Linear` / `Embedding`
built around a bare base layer that holds only that tensor, whose `merge()` runs. LoRA biases
(`lora_bias`) repeat peft's one-line `bias += lora_B.bias * scaling` because the bias may sit in another
shard than its weight. Full tensors saved with the adapter (`modules_to_save`, embedding `base_layer`
weights, `bias="all"`) replace the base tensor.

Everything that can be checked is checked before anything is written; output goes to a hidden temp
folder beside --out and is renamed into place at the end.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import re
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder import __version__
from builder.errors import BuilderError
from builder.model.tensors import (
    SafetensorsWriter,
    Shard,
    TensorInfo,
    itemsize,
    load_bin,
    read_bin_header,
    read_safetensors_header,
    read_tensor,
    torch_dtype,
)

PROVENANCE = "merge_provenance.json"
ADAPTER_PREFIX = "base_model.model."
DTYPES = ("auto", "bfloat16", "float16", "float32")

# Files that are training state, not part of a model: never copied.
TRAINING_STATE = re.compile(
    r"^(optimizer\.pt|optimizer\.bin|scheduler\.pt|scaler\.pt|rng_state.*\.pth|trainer_state\.json|"
    r"training_args\.bin|latest|zero_to_fp32\.py|global_step\d+)$"
)
# Weight files of any framework: the merged folder gets fresh safetensors shards instead.
WEIGHT_FILE = re.compile(
    r"(\.safetensors|\.safetensors\.index\.json|\.bin|\.bin\.index\.json|\.pt|\.pth|\.ckpt|\.h5|\.msgpack|"
    r"\.gguf|\.ggml|\.onnx|\.onnx_data|\.npz)$"
)
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"}
# Files the adapter folder may carry that must win over the base's (added tokens, new chat template).
TOKENIZER_FILE = re.compile(
    r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab.*|merges\.txt|spiece\.model|"
    r"sentencepiece.*\.model|.*\.tiktoken|qwen\.tiktoken|chat_template.*|preprocessor_config\.json)$"
)
# Names of vocab-shaped matrices: when an adapter resizes one, it has to resize all of them.
VOCAB_MATRIX = re.compile(r"(embed_tokens|lm_head|output_layer|word_embeddings|wte|embed_out)\.weight$")
SWIFT_BASE_KEYS = ("model_dir", "model_id_or_path", "model", "model_name_or_path", "model_type_or_path")
PEFT_TYPES_MERGED = {"LORA"}

# --------------------------------------------------------------------------------------------
# input resolution
# --------------------------------------------------------------------------------------------


def _load_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BuilderError(f"could not read {path} ({e}); fix or replace the file") from None
    if not isinstance(data, dict):
        raise BuilderError(f"{path} is not a JSON object; fix or replace the file")
    return data


def _has_weights(folder: Path) -> bool:
    return any(
        (folder / n).is_file()
        for n in (
            "model.safetensors",
            "model.safetensors.index.json",
            "pytorch_model.bin",
            "pytorch_model.bin.index.json",
        )
    )


def _adapter_weights_file(adapter: Path) -> Path:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (adapter / name).is_file():
            return adapter / name
    raise BuilderError(
        f"{adapter} has adapter_config.json but no adapter_model.safetensors or adapter_model.bin; "
        "point --adapter at the folder save_pretrained wrote (or a complete SWIFT checkpoint-N)"
    )


def _swift_args(adapter: Path) -> tuple[Path, dict] | None:
    for folder in (adapter, adapter.parent):
        for name in ("args.json", "sft_args.json"):
            if (folder / name).is_file():
                return folder / name, _load_json(folder / name)
    return None


def _candidate_paths(value: str, adapter: Path) -> Iterator[Path]:
    p = Path(value).expanduser()
    yield p
    if not p.is_absolute():
        yield adapter / p
        yield adapter.parent / p


def _resolve_base(adapter: Path, adapter_cfg: dict) -> Path:
    tried: list[str] = []
    value = adapter_cfg.get("base_model_name_or_path")
    if isinstance(value, str) and value:
        tried.append(f"adapter_config.json base_model_name_or_path={value!r}")
        for p in _candidate_paths(value, adapter):
            if p.is_dir():
                return p
    args = _swift_args(adapter)
    if args:
        args_path, data = args
        for key in SWIFT_BASE_KEYS:
            v = data.get(key)
            if isinstance(v, str) and v:
                tried.append(f"{args_path.name} {key}={v!r}")
                for p in _candidate_paths(v, adapter):
                    if p.is_dir() and (p / "config.json").is_file():
                        return p
    hint = f" (tried {', '.join(tried)}; none is a local folder)" if tried else ""
    raise BuilderError(f"could not tell which base model {adapter} was trained on{hint}; pass --base DIR")


def _base_files(base: Path) -> list[Shard]:
    """The base's weight shards, headers read and checked (raises on anything missing or corrupt)."""
    for index_name, fmt in (("model.safetensors.index.json", "safetensors"), ("pytorch_model.bin.index.json", "bin")):
        index_path = base / index_name
        if index_path.is_file():
            weight_map = _load_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise BuilderError(f"{index_path} has no weight_map; re-download or re-save the model")
            names = list(dict.fromkeys(weight_map.values()))
            missing = [n for n in names if not (base / n).is_file()]
            if missing:
                raise BuilderError(
                    f"{base} is missing shard(s) {', '.join(missing)} listed in {index_name}; "
                    "finish the download (e.g. huggingface-cli download) and retry"
                )
            shards = [
                read_safetensors_header(base / n) if fmt == "safetensors" else read_bin_header(base / n) for n in names
            ]
            for shard in shards:
                expected = [k for k, v in weight_map.items() if v == shard.path.name]
                lost = [k for k in expected if k not in shard.tensors]
                if lost:
                    raise BuilderError(
                        f"{shard.path} lacks {len(lost)} tensor(s) its index promises (e.g. {lost[0]}); "
                        "the shard is corrupt or from another download: re-download it"
                    )
            return shards
    if (base / "model.safetensors").is_file():
        return [read_safetensors_header(base / "model.safetensors")]
    if (base / "pytorch_model.bin").is_file():
        return [read_bin_header(base / "pytorch_model.bin")]
    raise BuilderError(
        f"{base} has no model.safetensors, pytorch_model.bin or shard index; "
        "pass the folder that from_pretrained would load"
    )


# --------------------------------------------------------------------------------------------
# the plan: what happens to each base tensor
# --------------------------------------------------------------------------------------------


@dataclass
class LoraModule:
    name: str  # module path in the base, e.g. model.layers.0.self_attn.q_proj
    kind: str  # "linear" | "embedding"
    tensors: dict[str, AdapterTensor]  # keyed like the layer's state dict
    r: int
    alpha: float
    scale: float = 0.0
    bias: AdapterTensor | None = None  # lora_B bias (lora_bias=True)


@dataclass
class Plan:
    dtype: str  # "auto" or a torch dtype name
    config_dtype: str | None
    modules: dict[str, LoraModule] = field(default_factory=dict)  # by weight key
    bias_of: dict[str, LoraModule] = field(default_factory=dict)  # by bias key
    replace: dict[str, AdapterTensor] = field(default_factory=dict)  # base key -> full tensor from the adapter
    new_vocab: int | None = None
    lora_config: Any = None


# LoraConfig fields that select a LoRA variant other than DoRA (peft's `is_lora_variant` metadata, plus
# init_lora_weights="mica"), or features a per-tensor merge cannot reproduce.
UNSUPPORTED_LORA_OPTIONS = (
    "velora_config", "alora_invocation_tokens", "monteclora_config", "use_bdlora", "arrow_config", "kasa_config",
    "target_parameters", "layer_replication", "trainable_token_indices", "megatron_config",
)  # fmt: skip


@dataclass
class LoraSpec:
    """What the merge needs from adapter_config.json (LoraConfig's defaults), read without importing peft."""

    raw: dict
    r: int = 8
    lora_alpha: Any = 8
    use_rslora: bool = False
    use_dora: bool = False
    fan_in_fan_out: bool = False
    lora_bias: bool = False
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    _peft_config: Any = None

    def peft_config(self):
        """The real peft LoraConfig (for the DoRA / embedding layers), with no init work, dropout or bias."""
        if self._peft_config is None:
            from peft import LoraConfig

            known = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
            cfg = LoraConfig(**{k: v for k, v in self.raw.items() if k in known})
            self._peft_config = dataclasses.replace(cfg, init_lora_weights=False, lora_dropout=0.0, lora_bias=False)
        return self._peft_config


def get_pattern_key(pattern_keys, key_to_match: str) -> str:
    """peft.utils.other.get_pattern_key: the rank/alpha pattern a module name matches."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", key_to_match):
            return key
    return key_to_match


def _load_lora_config(adapter: Path, raw: dict) -> LoraSpec:
    peft_type = str(raw.get("peft_type", "LORA")).upper()
    if peft_type not in PEFT_TYPES_MERGED:
        raise BuilderError(
            f"{adapter} is a {peft_type} adapter; only LoRA adapters (incl. rsLoRA and DoRA) are merged. "
            "AdaLoRA, VeRA, IA3, LoHa/LoKr, OFT/BOFT and prompt/prefix/p-tuning adapters are not supported: "
            "serve them with peft, or retrain as LoRA"
        )
    problems = [k for k in UNSUPPORTED_LORA_OPTIONS if raw.get(k) not in (None, False, {}, [], "")]
    if raw.get("init_lora_weights") == "mica":
        problems.append("init_lora_weights='mica'")
    if problems:
        raise BuilderError(
            f"{adapter} uses {', '.join(problems)}, which this merge does not support; serve it with peft"
        )
    spec = LoraSpec(raw=raw)
    for f in dataclasses.fields(LoraSpec):
        if f.name in raw and f.name not in ("raw", "_peft_config") and raw[f.name] is not None:
            setattr(spec, f.name, raw[f.name])
    if not isinstance(spec.r, int) or spec.r <= 0 or not isinstance(spec.lora_alpha, (int, float)):
        raise BuilderError(
            f"{adapter}/adapter_config.json has r={spec.r!r}, lora_alpha={spec.lora_alpha!r}; re-save the adapter"
        )
    if spec.use_dora and spec.lora_bias:
        raise BuilderError(f"{adapter}: DoRA with lora_bias is not valid LoRA (peft rejects it too)")
    return spec


@dataclass
class AdapterTensor:
    """An adapter tensor known by its shape, read only when its module is merged: an adapter for a big model
    (or the embeddings it saved) can run to GBs, and the merge holds one module's worth at a time."""

    shape: tuple[int, ...]
    load: Callable[[], Any]


def _load_adapter_tensors(path: Path) -> dict[str, AdapterTensor]:
    if path.suffix == ".safetensors":
        shard = read_safetensors_header(path, remedy="re-save the adapter")

        def reader(info: TensorInfo):
            def load():
                with open(path, "rb", buffering=0) as f:
                    return read_tensor(f, shard, info)

            return load

        return {name: AdapterTensor(info.shape, reader(info)) for name, info in shard.tensors.items()}
    sd = load_bin(path, remedy="re-save the adapter")
    return {name: AdapterTensor(tuple(t.shape), lambda t=t: t) for name, t in sd.items()}


_LORA_SUFFIX = re.compile(
    r"^(?P<mod>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|lora_embedding_B|"
    r"lora_magnitude_vector(?:\.weight)?)$"
)


def _build_plan(base_tensors: dict[str, TensorInfo], config: dict, adapter: Path | None, dtype: str) -> Plan:
    config_dtype = config.get("dtype") or config.get("torch_dtype")
    config_dtype = config_dtype if config_dtype in ("bfloat16", "float16", "float32") else None
    plan = Plan(dtype=dtype, config_dtype=config_dtype)
    if adapter is None:
        return plan
    raw_cfg = _load_json(adapter / "adapter_config.json")
    cfg = _load_lora_config(adapter, raw_cfg)
    plan.lora_config = cfg
    sd = _load_adapter_tensors(_adapter_weights_file(adapter))
    lora: dict[str, dict[str, Any]] = {}
    for key, t in sd.items():
        name = key[len(ADAPTER_PREFIX) :] if key.startswith(ADAPTER_PREFIX) else key
        m = _LORA_SUFFIX.match(name)
        if m:
            part = m["part"]
            if part.startswith("lora_magnitude_vector"):
                part = "lora_magnitude_vector.weight"
            lora.setdefault(m["mod"], {})[part] = t
        elif ".lora_" in name:
            raise BuilderError(f"{adapter} holds a tensor this merge does not understand: {key}")
        else:  # a full tensor: modules_to_save, the base_layer of a saved embedding, or bias="all"
            plan.replace[name.replace(".base_layer.", ".").replace(".modules_to_save.", ".")] = t

    missing = sorted({k for k in plan.replace if k not in base_tensors})
    for mod in lora:
        if f"{mod}.weight" not in base_tensors:
            missing.append(mod)
    if missing:
        raise BuilderError(
            f"the adapter targets {len(missing)} module(s) the base does not have (e.g. {', '.join(missing[:3])}); "
            "it was trained on a different model: pass the right --base"
        )

    # full-tensor replacements: same shape, except that vocab matrices may have grown (added tokens)
    vocab_keys = [k for k in base_tensors if VOCAB_MATRIX.search(k) and len(base_tensors[k].shape) == 2]
    old_vocab = {base_tensors[k].shape[0] for k in vocab_keys}
    resized: dict[str, int] = {}
    for k, t in plan.replace.items():
        want = base_tensors[k].shape
        if tuple(t.shape) == want:
            continue
        if k in vocab_keys and len(t.shape) == 2 and t.shape[1] == want[1]:
            resized[k] = t.shape[0]
            continue
        raise BuilderError(
            f"shape mismatch for {k}: adapter has {tuple(t.shape)}, base has {want}; "
            "the adapter was made for another base model: pass the right --base"
        )
    if resized:
        sizes = set(resized.values())
        stale = [k for k in vocab_keys if k not in resized and base_tensors[k].shape[0] in old_vocab]
        if len(sizes) > 1 or stale:
            raise BuilderError(
                f"the adapter resizes the vocabulary ({', '.join(f'{k}: {v}' for k, v in resized.items())}) "
                f"but not consistently{' (' + ', '.join(stale) + ' keeps the old size)' if stale else ''}; "
                "train with both the input embedding and lm_head in modules_to_save"
            )
        plan.new_vocab = sizes.pop()

    for mod, parts in lora.items():
        w = base_tensors[f"{mod}.weight"]
        shape = plan.replace[f"{mod}.weight"].shape if f"{mod}.weight" in plan.replace else w.shape
        r_key = get_pattern_key(cfg.rank_pattern.keys(), mod)
        alpha_key = get_pattern_key(cfg.alpha_pattern.keys(), mod)
        r = cfg.rank_pattern.get(r_key, cfg.r)
        alpha = cfg.alpha_pattern.get(alpha_key, cfg.lora_alpha)
        if "lora_embedding_A" in parts or "lora_embedding_B" in parts:
            kind, a_key, b_key = "embedding", "lora_embedding_A", "lora_embedding_B"
        else:
            kind, a_key, b_key = "linear", "lora_A.weight", "lora_B.weight"
        if a_key not in parts or b_key not in parts:
            raise BuilderError(
                f"{adapter}: module {mod} has only part of its LoRA weights ({', '.join(parts)}); re-save the adapter"
            )
        a, b = parts[a_key], parts[b_key]
        if len(shape) != 2:
            raise BuilderError(f"{mod}: LoRA on a {len(shape)}-d weight is not supported (only Linear and Embedding)")
        if kind == "linear":
            out_f, in_f = (shape[1], shape[0]) if cfg.fan_in_fan_out else (shape[0], shape[1])
            ok = a.shape == (r, in_f) and b.shape == (out_f, r)
        else:
            ok = a.shape == (r, shape[0]) and b.shape == (shape[1], r)
        if "lora_magnitude_vector.weight" in parts:
            if not cfg.use_dora:
                raise BuilderError(
                    f"{adapter}: {mod} has a DoRA magnitude but use_dora is false in adapter_config.json"
                )
            out_features = out_f if kind == "linear" else shape[1]
            ok = ok and tuple(parts["lora_magnitude_vector.weight"].shape) == (out_features,)
        elif cfg.use_dora:
            raise BuilderError(
                f"{adapter}: use_dora is set but {mod} has no lora_magnitude_vector; re-save the adapter"
            )
        if not ok:
            raise BuilderError(
                f"shape mismatch for {mod}: base weight {tuple(shape)}, LoRA A {tuple(a.shape)} / B {tuple(b.shape)} "
                f"(r={r} per adapter_config.json); the adapter was made for another base model: pass the right --base"
            )
        lm = LoraModule(mod, kind, {k: v for k, v in parts.items() if k != "lora_B.bias"}, r, alpha)
        lm.scale = alpha / math.sqrt(r) if cfg.use_rslora else alpha / r
        plan.modules[f"{mod}.weight"] = lm
        if "lora_B.bias" in parts:
            bias_key = f"{mod}.bias"
            if bias_key not in base_tensors:
                raise BuilderError(
                    f"the adapter has a LoRA bias for {mod} but the base layer has no bias; pass the right --base"
                )
            if tuple(parts["lora_B.bias"].shape) != base_tensors[bias_key].shape:
                raise BuilderError(f"shape mismatch for {bias_key}; the adapter was made for another base model")
            lm.bias = parts["lora_B.bias"]
            plan.bias_of[bias_key] = lm
    return plan


# --------------------------------------------------------------------------------------------
# the math: peft's own layers, one at a time
# --------------------------------------------------------------------------------------------


def _peft_layer(lm: LoraModule, weight, cfg):
    """A peft LoRA layer around a bare base layer that holds `weight`, adapter loaded as from_pretrained does."""
    import torch
    from peft.tuners.lora import layer as lora_layer
    from torch import nn

    try:
        from peft.tuners.tuners_utils import cast_adapter_dtype
    except ImportError:  # older peft: same logic lives on the tuner
        cast_adapter_dtype = None

    # no init work (pissa/olora/... would touch the weight; from_pretrained resets it to True, which only
    # initialises A/B we overwrite anyway), no dropout module, bias handled on its own (see module doc)
    layer_cfg = cfg.peft_config()
    with torch.device("meta"):
        if lm.kind == "embedding":
            base = nn.Embedding(weight.shape[0], weight.shape[1])
        elif cfg.fan_in_fan_out:
            from transformers.pytorch_utils import Conv1D

            base = Conv1D(weight.shape[1], weight.shape[0])
        else:
            base = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    base.weight = nn.Parameter(weight, requires_grad=False)
    cls = lora_layer.Embedding if lm.kind == "embedding" else lora_layer.Linear
    layer = cls(base, "default", config=layer_cfg, r=lm.r, lora_alpha=lm.alpha)
    if cast_adapter_dtype is not None:
        cast_adapter_dtype(layer, adapter_name="default", autocast_adapter_dtype=True)
    else:
        for p_name, p in list(layer.named_parameters()):
            if "base_layer" not in p_name and p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()
    state = {}
    for part, t in lm.tensors.items():
        if part in ("lora_embedding_A", "lora_embedding_B"):
            state[f"{part}.default"] = t.load()
        else:
            head, tail = part.split(".", 1)
            state[f"{head}.default.{tail}"] = t.load()
    result = layer.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"internal: peft layer rejected {result.unexpected_keys}")
    return layer


_MERGE_BLOCK_BYTES = 1 << 20  # rows of the delta per elementwise step: fits in L2
_WRITE_AHEAD_BYTES = 64 << 20  # merged tensors queued for the writer thread (beyond the one being written)


def _adapter_param_dtype(base_dtype):
    """The dtype PeftModel.from_pretrained gives LoRA parameters: created in the base layer's dtype, then
    half (and fp8) types upcast to fp32 by autocast_adapter_dtype=True."""
    import torch

    if base_dtype in (torch.float16, torch.bfloat16) or base_dtype.itemsize == 1:
        return torch.float32
    return base_dtype


def _merge_linear(lm: LoraModule, weight, cfg: LoraSpec, device: str, scratch: dict):
    """Plain LoRA / rsLoRA on a Linear (or Conv1D): peft's `lora.Linear.merge(safe_merge=False)` with
    `get_delta_weight`, op for op, without importing peft (whose import costs more CPU than the merge).

    B @ A is the same whole-matrix call as peft's (a row block of it can take another BLAS kernel and
    differ in the last bit), written into a reused buffer; the elementwise `* scaling` and `+=` then go a
    cache-sized block of rows at a time, which is several times faster than whole-matrix passes and
    gives the same bits. The tests hold it torch.equal to peft across dtypes, rsLoRA, rank/alpha
    patterns and fan_in_fan_out."""
    import torch

    dev = weight.device if device == "cpu" else torch.device("cuda")
    pdtype = _adapter_param_dtype(weight.dtype)
    weight = weight.to(dev)
    a = lm.tensors["lora_A.weight"].load().to(dev, pdtype).contiguous()
    b = lm.tensors["lora_B.weight"].load().to(dev, pdtype).contiguous()
    cast_to_fp32 = dev.type == "cpu" and pdtype in (torch.float16, torch.bfloat16)  # never true after autocast
    if cast_to_fp32:
        a, b = a.float(), b.float()
    buf = scratch.get((a.dtype, dev))
    if buf is None or buf.numel() < b.shape[0] * a.shape[1]:
        buf = scratch[(a.dtype, dev)] = torch.empty(b.shape[0] * a.shape[1], dtype=a.dtype, device=dev)
    delta = torch.mm(b, a, out=buf[: b.shape[0] * a.shape[1]].view(b.shape[0], a.shape[1]))
    if cfg.fan_in_fan_out:  # Conv1D keeps its weight as (in, out)
        delta = delta.T
    rows, cols = weight.shape
    step = max(1, _MERGE_BLOCK_BYTES // max(1, cols * delta.element_size())) if dev.type == "cpu" else max(1, rows)
    for r0 in range(0, rows, step):
        block = delta[r0 : r0 + step].mul_(lm.scale)  # same bits as peft's `* scaling`
        weight[r0 : r0 + step] += block.to(dtype=pdtype) if cast_to_fp32 else block
    return weight.cpu() if device == "cuda" else weight


def _merge_weight(lm: LoraModule, weight, cfg: LoraSpec, device: str, scratch: dict):
    if lm.kind == "linear" and not cfg.use_dora:
        return _merge_linear(lm, weight, cfg, device, scratch)
    import torch

    if device == "cuda":
        weight = weight.to("cuda")
    layer = _peft_layer(lm, weight, cfg)
    lm.scale = float(layer.scaling["default"])
    with torch.no_grad():
        layer.merge(safe_merge=False)
    merged = layer.get_base_layer().weight.data
    return merged.cpu() if device == "cuda" else merged


def _merge_bias(lm: LoraModule, bias, cfg):
    """peft's Linear.merge: `base_layer.bias.data += lora_B.bias * scaling`, lora_B in its from_pretrained dtype."""

    lora_bias = lm.bias.load().to(_adapter_param_dtype(bias.dtype))
    bias += lora_bias * lm.scale  # our own buffer (or a copy-on-write mmap for .bin shards)
    return bias


# --------------------------------------------------------------------------------------------
# the stream
# --------------------------------------------------------------------------------------------


def _out_dtype(info: TensorInfo, plan: Plan) -> str:
    want = plan.dtype if plan.dtype != "auto" else plan.config_dtype
    if want and info.dtype in ("float16", "bfloat16", "float32", "float64"):
        return want
    return info.dtype


def _out_shape(info: TensorInfo, plan: Plan) -> tuple[int, ...]:
    t = plan.replace.get(info.name)
    return tuple(t.shape) if t is not None else info.shape


def _iter_safetensors(shard: Shard) -> Iterator[tuple[str, Any]]:
    """Yield (name, tensor) in file order, each tensor read into its own buffer."""
    with open(shard.path, "rb", buffering=0) as f:
        for info in sorted(shard.tensors.values(), key=lambda t: t.begin):
            yield info.name, read_tensor(f, shard, info)


def _iter_bin(shard: Shard) -> Iterator[tuple[str, Any]]:
    sd = load_bin(shard.path)
    for name in list(sd):
        yield name, sd.pop(name)


def _sha256(path: Path, stop: threading.Event | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while (chunk := f.read(1 << 24)) and not (stop and stop.is_set()):
            h.update(chunk)
    return h.hexdigest()


def _progress(quiet: bool):
    if quiet:
        return nullcontext(None)
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )


def _process_shard(shard: Shard, writer: SafetensorsWriter, plan: Plan, device: str, progress, task) -> str:
    """Read, merge and write one shard: reading and merging here, writing on a helper thread, and the
    input's sha256 (returned, for the provenance file) on another that reads the file by itself, so
    hashing never holds up the merge. Both helpers spend their time in calls that drop the GIL.

    The math runs on this thread alone (torch intra-op threads off): a rank-r product and elementwise
    steps on cache-sized blocks, where OpenMP workers spin-waiting between calls would only take the
    cores that hashing and writing need."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    stop = threading.Event()
    try:
        with ThreadPoolExecutor(1, "merge-hash") as hash_pool, ThreadPoolExecutor(1, "merge-write") as write_pool:
            digest = hash_pool.submit(_sha256, shard.path, stop)
            try:
                _stream(shard, writer, plan, device, progress, task, write_pool)
            except BaseException:
                stop.set()  # an interrupt should not wait for a multi-GB shard to be hashed
                raise
            digest = digest.result()
    except BaseException:
        writer.f.close()
        raise
    finally:
        torch.set_num_threads(threads)
    writer.close()
    return digest


def _stream(shard, writer, plan, device, progress, task, write_pool) -> None:
    from collections import deque

    import torch

    order = [e[0] for e in writer.expected]
    pending: dict[str, Any] = {}  # only used when the file order differs from the header order (bin)
    nxt = 0
    in_flight: deque = deque()  # (write future, bytes) in submission order
    queued = 0
    scratch: dict = {}  # one fp32 delta buffer, reused: no fresh pages per tensor
    it = _iter_safetensors(shard) if shard.fmt == "safetensors" else _iter_bin(shard)
    try:
        with torch.no_grad():
            for name, t in it:
                info = shard.tensors[name]
                lm = plan.modules.get(name)
                lmb = plan.bias_of.get(name)
                replacement = plan.replace.get(name)
                if replacement is not None:
                    t = replacement.load()
                t = t.to(torch_dtype(_out_dtype(info, plan)))
                if lm is not None:
                    t = _merge_weight(lm, t, plan.lora_config, device, scratch)
                if lmb is not None:
                    t = _merge_bias(lmb, t, plan.lora_config)
                pending[name] = t
                while nxt < len(order) and order[nxt] in pending:
                    out = pending.pop(order[nxt])
                    in_flight.append((write_pool.submit(writer.write, order[nxt], out), out.nbytes))
                    queued += out.nbytes
                    nxt += 1
                while len(in_flight) > 1 and queued > _WRITE_AHEAD_BYTES:  # bounded memory, whatever the tensor sizes
                    fut, nbytes = in_flight.popleft()
                    fut.result()
                    queued -= nbytes
                if progress is not None:
                    progress.advance(task, _nbytes(info))
        while in_flight:
            in_flight.popleft()[0].result()
    finally:
        for fut, _ in in_flight:
            fut.cancel()
        it.close()


# --------------------------------------------------------------------------------------------
# folder handling
# --------------------------------------------------------------------------------------------


def _copy_tree(src: Path, dst: Path, keep) -> list[str]:
    copied = []
    for root, dirs, files in os.walk(src):
        rel = Path(root).relative_to(src)
        dirs[:] = sorted(
            d for d in dirs if not d.startswith(".") and not TRAINING_STATE.match(d) and keep(rel / d, True)
        )
        for name in sorted(files):
            if keep(rel / name, False):
                (dst / rel).mkdir(parents=True, exist_ok=True)
                shutil.copy2(Path(root) / name, dst / rel / name)
                copied.append(str(rel / name))
    return copied


def _keep_base_file(rel: Path, is_dir: bool) -> bool:
    if is_dir:
        return not re.match(r"^checkpoint-\d+$", rel.name)
    name = rel.name
    return not (
        WEIGHT_FILE.search(name)
        or TRAINING_STATE.match(name)
        or name in ADAPTER_FILES
        or name == PROVENANCE
        or name.startswith(".")
    )


@contextmanager
def _sigterm_as_interrupt():
    """Turn SIGTERM into KeyboardInterrupt so the temp folder is cleaned up (main thread only)."""
    try:
        prev = signal.signal(signal.SIGTERM, signal.default_int_handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, prev)


def _inside(p: Path, folder: Path) -> bool:
    p, folder = p.resolve(), folder.resolve()
    return p == folder or folder in p.parents


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------


def merge_model(
    base: Path | None = None,
    adapter: Path | None = None,
    out: Path | None = None,
    dtype: str = "auto",
    device: str = "cpu",
    force: bool = False,
    quiet: bool = False,
) -> Path:
    """Merge `adapter` into `base` (or pass a full-weight checkpoint through) and return the output folder."""
    if dtype not in DTYPES:
        raise BuilderError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if device not in ("cpu", "cuda"):
        raise BuilderError(f"--device must be cpu or cuda, not {device!r}")
    if adapter is None and base is None:
        raise BuilderError("pass --adapter DIR (LoRA adapter or checkpoint) and/or --base DIR")
    base = Path(base) if base is not None else None
    adapter = Path(adapter) if adapter is not None else None

    # ---- what are we merging?
    lora_dir: Path | None = None
    if adapter is not None:
        if not adapter.is_dir():
            raise BuilderError(f"--adapter {adapter} is not a folder")
        if (adapter / "adapter_config.json").is_file():
            lora_dir = adapter
            raw_cfg = _load_json(adapter / "adapter_config.json")
            if base is None:
                base = _resolve_base(adapter, raw_cfg)
        elif _has_weights(adapter):  # a full-parameter checkpoint: the adapter folder *is* the model
            if base is not None and base.resolve() != adapter.resolve():
                raise BuilderError(
                    f"{adapter} is a full-weight checkpoint (no adapter_config.json), so --base is not used; "
                    "drop --base, or point --adapter at a LoRA adapter folder"
                )
            base = adapter
        else:
            ckpts = sorted(
                adapter.glob("checkpoint-*"),
                key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1,
            )
            if ckpts:
                raise BuilderError(
                    f"{adapter} is a training run folder; pass one of its checkpoints, e.g. --adapter {ckpts[-1]}"
                )
            raise BuilderError(
                f"{adapter} has neither adapter_config.json nor model weights; pass a peft adapter or checkpoint folder"
            )
    assert base is not None
    if not base.is_dir():
        raise BuilderError(f"base model folder {base} does not exist; pass --base DIR")
    if not (base / "config.json").is_file():
        raise BuilderError(f"{base} has no config.json; pass the folder that from_pretrained would load")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise BuilderError("--device cuda, but no CUDA GPU is visible; use --device cpu")

    source = lora_dir or (adapter if adapter is not None else base)
    out = Path(out) if out is not None else source.parent / f"{source.name}-merged"
    for folder in {base, source}:
        if _inside(out, folder) or _inside(folder, out):
            raise BuilderError(f"--out {out} overlaps the input folder {folder}; pick another --out")
    if out.exists() and not force:
        raise BuilderError(f"{out} already exists; pass --force to replace it, or choose another --out")

    # ---- validate everything before writing anything
    config = _load_json(base / "config.json")
    quant = config.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "unknown") if isinstance(quant, dict) else "unknown"
        raise BuilderError(
            f"{base} is a quantized model ({method}); LoRA can only be merged into full-precision weights: "
            "pass the original (unquantized) base with --base"
        )
    shards = _base_files(base)
    base_tensors: dict[str, TensorInfo] = {}
    for shard in shards:
        base_tensors.update(shard.tensors)
    plan = _build_plan(base_tensors, config, lora_dir, dtype)

    # ---- write into a temp folder beside the target, rename at the end
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        with _sigterm_as_interrupt():
            provenance = _write(tmp, base, shards, plan, config, lora_dir, dtype, device, quiet)
            (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
            if out.exists():
                trash = out.parent / f".{out.name}.old-{os.getpid()}"
                out.rename(trash)
                tmp.rename(out)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write(tmp: Path, base: Path, shards: list[Shard], plan: Plan, config: dict, lora_dir: Path | None,
           dtype: str, device: str, quiet: bool) -> dict:  # fmt: skip
    # non-weight files: the base's, then the adapter's tokenizer files on top
    copied = _copy_tree(base, tmp, _keep_base_file)
    if lora_dir is not None:
        _copy_tree(lora_dir, tmp, lambda rel, is_dir: not is_dir and bool(TOKENIZER_FILE.match(rel.name)))
    new_config = dict(config)
    if plan.dtype != "auto":
        for key in ("dtype", "torch_dtype"):
            if key in new_config or (key == "dtype" and "torch_dtype" not in new_config):
                new_config[key] = plan.dtype
    if plan.new_vocab is not None:
        for key in ("vocab_size", "padded_vocab_size"):
            if key in new_config:
                new_config[key] = plan.new_vocab
        new_config.setdefault("vocab_size", plan.new_vocab)
    if new_config != config:
        (tmp / "config.json").write_text(json.dumps(new_config, indent=2, sort_keys=False) + "\n")

    n = len(shards)
    weight_map: dict[str, str] = {}
    total_size = 0
    base_hashes: dict[str, str] = {}
    with _progress(quiet) as progress:
        for i, shard in enumerate(shards, 1):
            out_name = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
            infos = list(shard.tensors.values())
            if shard.fmt == "safetensors":
                infos.sort(key=lambda t: t.begin)
            entries = [(t.name, _out_dtype(t, plan), _out_shape(t, plan)) for t in infos]
            task = None
            if progress is not None:
                task = progress.add_task(f"[{i}/{n}] {shard.path.name}", total=sum(_nbytes(t) for t in infos))
            part = tmp / f".{out_name}.partial"
            writer = SafetensorsWriter(part, entries)
            base_hashes[shard.path.name] = _process_shard(shard, writer, plan, device, progress, task)
            part.rename(tmp / out_name)
            for name, dt, shape in entries:
                weight_map[name] = out_name
                total_size += math.prod(shape) * itemsize(dt)
            if n > 1:  # the index grows with every finished shard
                index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
                (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    prov: dict[str, Any] = {
        "builder_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "dtype": dtype if dtype != "auto" else (plan.config_dtype or "auto"),
        "device": device,
        "base": {"path": str(base.resolve()), "sha256": base_hashes},
        "copied_files": copied,
    }
    if lora_dir is None:
        prov["mode"] = "passthrough (full-weight checkpoint, no adapter)"
        return prov
    weights = _adapter_weights_file(lora_dir)
    cfg = plan.lora_config
    try:  # the installed version, without importing peft (and transformers with it: ~2 s of CPU)
        from importlib.metadata import version

        peft_version = version("peft")
    except Exception:  # noqa: BLE001
        peft_version = None
    prov["mode"] = "lora merge"
    prov["adapter"] = {
        "path": str(lora_dir.resolve()),
        "sha256": {weights.name: _sha256(weights), "adapter_config.json": _sha256(lora_dir / "adapter_config.json")},
        "peft_type": "LORA",
        "r": cfg.r,
        "lora_alpha": cfg.lora_alpha,
        "use_rslora": cfg.use_rslora,
        "use_dora": cfg.use_dora,
        "lora_bias": cfg.lora_bias,
        "fan_in_fan_out": cfg.fan_in_fan_out,
    }
    prov["peft_version"] = peft_version
    prov["modules"] = {lm.name: {"r": lm.r, "lora_alpha": lm.alpha, "scale": lm.scale, "kind": lm.kind}
                       for lm in plan.modules.values()}  # fmt: skip
    prov["replaced_tensors"] = sorted(plan.replace)
    if plan.new_vocab is not None:
        prov["vocab_size"] = plan.new_vocab
    return prov


def _nbytes(info: TensorInfo) -> int:
    return math.prod(info.shape) * itemsize(info.dtype)
