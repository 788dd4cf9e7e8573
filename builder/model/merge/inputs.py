"""The merge's inputs: which folder is the base and which the adapter, the base an adapter was trained on
(peft's adapter_config.json, else a SWIFT run's args.json), and the base's weight shards (headers only)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

from builder.errors import BuilderError
from builder.model.tensors import Shard, read_bin_header, read_safetensors_header

# Keys of a SWIFT run's args.json / sft_args.json that name the base model, in the order they are tried.
SWIFT_BASE_KEYS = ("model_dir", "model_id_or_path", "model", "model_name_or_path", "model_type_or_path")
# What from_pretrained loads: a single weight file or a shard index.
MODEL_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def load_json(path: Path) -> dict:
    """A JSON object from `path`; a BuilderError if it is unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BuilderError(f"could not read {path} ({e}); fix or replace the file") from None
    if not isinstance(data, dict):
        raise BuilderError(f"{path} is not a JSON object; fix or replace the file")
    return data


def has_weights(folder: Path) -> bool:
    """Whether `folder` holds model weights from_pretrained would load (a full-weight checkpoint)."""
    return any((folder / n).is_file() for n in MODEL_WEIGHT_FILES)


def swift_args(adapter: Path) -> tuple[Path, dict] | None:
    """A SWIFT run's args.json / sft_args.json (its path and content), in `adapter` or the run folder above it."""
    for folder in (adapter, adapter.parent):
        for name in ("args.json", "sft_args.json"):
            if (folder / name).is_file():
                return folder / name, load_json(folder / name)
    return None


def _candidate_paths(value: str, adapter: Path) -> Iterator[Path]:
    p = Path(value).expanduser()
    yield p
    if not p.is_absolute():
        yield adapter / p
        yield adapter.parent / p


def resolve_base(adapter: Path, adapter_cfg: dict | None = None) -> Path:
    """The local base model folder `adapter` was trained on: adapter_config.json's base_model_name_or_path,
    else the model a SWIFT checkpoint's args.json names (relative paths tried from the adapter and its run
    folder). `adapter_cfg` is adapter_config.json's content, read here when not given."""
    adapter = Path(adapter)
    if adapter_cfg is None:
        adapter_cfg = load_json(adapter / "adapter_config.json")
    tried: list[str] = []
    value = adapter_cfg.get("base_model_name_or_path")
    if isinstance(value, str) and value:
        tried.append(f"adapter_config.json base_model_name_or_path={value!r}")
        for p in _candidate_paths(value, adapter):
            if p.is_dir():
                return p
    args = swift_args(adapter)
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


def resolve_inputs(base: Path | None, adapter: Path | None) -> tuple[Path, Path | None]:
    """(the base folder, the LoRA adapter folder or None) for the merge's --base and --adapter.

    An --adapter without adapter_config.json but with weights is a full-weight checkpoint: it is the base,
    and there is nothing to merge. The base must be a folder with a config.json."""
    lora_dir: Path | None = None
    if adapter is not None:
        if not adapter.is_dir():
            raise BuilderError(f"--adapter {adapter} is not a folder")
        if (adapter / "adapter_config.json").is_file():
            lora_dir = adapter
            raw_cfg = load_json(adapter / "adapter_config.json")
            if base is None:
                base = resolve_base(adapter, raw_cfg)
        elif has_weights(adapter):  # a full-parameter checkpoint: the adapter folder *is* the model
            if base is not None and base.resolve() != adapter.resolve():
                raise BuilderError(
                    f"{adapter} is a full-weight checkpoint (no adapter_config.json), so --base is not used; "
                    "drop --base, or point --adapter at a LoRA adapter folder"
                )
            base = adapter
        else:
            _not_an_adapter(adapter)
    assert base is not None
    if not base.is_dir():
        raise BuilderError(f"base model folder {base} does not exist; pass --base DIR")
    if not (base / "config.json").is_file():
        raise BuilderError(f"{base} has no config.json; pass the folder that from_pretrained would load")
    return base, lora_dir


def _not_an_adapter(adapter: Path) -> NoReturn:
    """Raise the error for a folder with neither adapter nor weights (naming its last checkpoint if it has some)."""
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


def check_unquantized(base: Path, config: dict) -> None:
    """LoRA merges into full-precision weights only: a BuilderError for a GPTQ/AWQ/bitsandbytes base."""
    quant = config.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "unknown") if isinstance(quant, dict) else "unknown"
        raise BuilderError(
            f"{base} is a quantized model ({method}); LoRA can only be merged into full-precision weights: "
            "pass the original (unquantized) base with --base"
        )


def base_shards(base: Path) -> list[Shard]:
    """The base's weight shards, headers read and checked (raises on anything missing or corrupt)."""
    for index_name, fmt in (("model.safetensors.index.json", "safetensors"), ("pytorch_model.bin.index.json", "bin")):
        if (base / index_name).is_file():
            return _indexed_shards(base, index_name, fmt)
    if (base / "model.safetensors").is_file():
        return [read_safetensors_header(base / "model.safetensors")]
    if (base / "pytorch_model.bin").is_file():
        return [read_bin_header(base / "pytorch_model.bin")]
    raise BuilderError(
        f"{base} has no model.safetensors, pytorch_model.bin or shard index; "
        "pass the folder that from_pretrained would load"
    )


def _indexed_shards(base: Path, index_name: str, fmt: str) -> list[Shard]:
    """The shards a `*.index.json` lists, each holding every tensor the index promises it."""
    index_path = base / index_name
    weight_map = load_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise BuilderError(f"{index_path} has no weight_map; re-download or re-save the model")
    names = list(dict.fromkeys(weight_map.values()))
    missing = [n for n in names if not (base / n).is_file()]
    if missing:
        raise BuilderError(
            f"{base} is missing shard(s) {', '.join(missing)} listed in {index_name}; "
            "finish the download (e.g. huggingface-cli download) and retry"
        )
    shards = [read_safetensors_header(base / n) if fmt == "safetensors" else read_bin_header(base / n) for n in names]
    for shard in shards:
        expected = [k for k, v in weight_map.items() if v == shard.path.name]
        lost = [k for k in expected if k not in shard.tensors]
        if lost:
            raise BuilderError(
                f"{shard.path} lacks {len(lost)} tensor(s) its index promises (e.g. {lost[0]}); "
                "the shard is corrupt or from another download: re-download it"
            )
    return shards
