"""A peft LoRA adapter folder, read without importing peft: adapter_config.json as a LoraSpec (LoraConfig's
defaults, unsupported variants refused) and the adapter's tensors by name, each read only when asked for.

The merge reads adapters through `read_adapter`; so can anything that uses an adapter without merging it
(the base it was trained on: `inputs.resolve_base`)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder.errors import BuilderError
from builder.model.merge.inputs import load_json
from builder.model.tensors import TensorInfo, load_bin, read_safetensors_header, read_tensor

# peft saves the tensors of a PeftModel under this prefix (the base model's own names follow it).
ADAPTER_PREFIX = "base_model.model."
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_TYPES_MERGED = {"LORA"}

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


@dataclass
class AdapterTensor:
    """An adapter tensor known by its shape, read only when its module is merged: an adapter for a big model
    (or the embeddings it saved) can run to GBs, and the merge holds one module's worth at a time."""

    shape: tuple[int, ...]
    load: Callable[[], Any]


@dataclass
class Adapter:
    """A LoRA adapter folder: its config and its tensors (by the names in the weights file)."""

    path: Path
    spec: LoraSpec
    weights_file: Path
    tensors: dict[str, AdapterTensor]


def get_pattern_key(pattern_keys, key_to_match: str) -> str:
    """peft.utils.other.get_pattern_key: the rank/alpha pattern a module name matches."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", key_to_match):
            return key
    return key_to_match


def read_adapter(adapter: Path) -> Adapter:
    """adapter_config.json and the tensors of the adapter folder `adapter` (tensor data read lazily)."""
    adapter = Path(adapter)
    spec = read_lora_spec(adapter)
    weights = adapter_weights_file(adapter)
    return Adapter(adapter, spec, weights, read_adapter_tensors(weights))


def read_lora_spec(adapter: Path, raw: dict | None = None) -> LoraSpec:
    """The LoraSpec of `adapter` (`raw`: adapter_config.json's content, read here when not given); a
    BuilderError for anything but a LoRA / rsLoRA / DoRA adapter, or a variant a per-tensor merge cannot do."""
    if raw is None:
        raw = load_json(Path(adapter) / "adapter_config.json")
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


def adapter_weights_file(adapter: Path) -> Path:
    """adapter_model.safetensors (else adapter_model.bin) in `adapter`; a BuilderError if neither is there."""
    for name in ADAPTER_WEIGHT_FILES:
        if (adapter / name).is_file():
            return adapter / name
    raise BuilderError(
        f"{adapter} has adapter_config.json but no adapter_model.safetensors or adapter_model.bin; "
        "point --adapter at the folder save_pretrained wrote (or a complete SWIFT checkpoint-N)"
    )


def read_adapter_tensors(path: Path) -> dict[str, AdapterTensor]:
    """The tensors of an adapter weights file by name: shapes from the header, data read on `load()`
    (a .bin file, which has no header to read alone, is loaded whole)."""
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
