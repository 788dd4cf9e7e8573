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

The pieces, in the order a merge uses them: `inputs` (which folders, the base's shard headers),
`adapter` (adapter_config.json and tensors, usable without merging), `plan` (what happens to each base
tensor), `peft_math` (the deltas), `stream` (shards read, merged, written and hashed), `folders` (the
other files, signals); this module runs them and writes the provenance record.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any

from builder import __version__
from builder.errors import BuilderError
from builder.files import atomic_dir, write_atomic
from builder.model.merge.adapter import Adapter, AdapterTensor, LoraSpec, adapter_weights_file, read_adapter
from builder.model.merge.folders import (
    PROVENANCE,
    copy_tree,
    inside,
    keep_base_file,
    keep_tokenizer_file,
    sigterm_as_interrupt,
)
from builder.model.merge.inputs import base_shards, check_unquantized, load_json, resolve_base, resolve_inputs
from builder.model.merge.plan import Plan, build_plan
from builder.model.merge.stream import sha256, write_shards
from builder.model.tensors import Shard, TensorInfo

DTYPES = ("auto", "bfloat16", "float16", "float32")

# The entry point, and the readers that work without merging (an adapter, the base it was trained on, the
# base's shard headers, the plan that checks an adapter against its base).
__all__ = [
    "DTYPES",
    "PROVENANCE",
    "Adapter",
    "AdapterTensor",
    "LoraSpec",
    "Plan",
    "base_shards",
    "build_plan",
    "load_json",
    "merge_model",
    "read_adapter",
    "resolve_base",
]


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
    adapter = Path(adapter) if adapter is not None else None
    base, lora_dir = resolve_inputs(Path(base) if base is not None else None, adapter)
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise BuilderError("--device cuda, but no CUDA GPU is visible; use --device cpu")
    out = _out_folder(out, base, lora_dir or adapter or base, force)

    # validate everything before writing anything
    config = load_json(base / "config.json")
    check_unquantized(base, config)
    shards = base_shards(base)
    base_tensors: dict[str, TensorInfo] = {}
    for shard in shards:
        base_tensors.update(shard.tensors)
    plan = build_plan(base_tensors, config, lora_dir, dtype)

    # write into a temp folder beside the target, renamed into place (replacing an old one) at the end
    with sigterm_as_interrupt(), atomic_dir(out, replace=force) as tmp:
        provenance = _write(tmp, base, shards, plan, config, lora_dir, dtype, device, quiet)
        write_atomic(tmp / PROVENANCE, json.dumps(provenance, indent=2) + "\n")
    return out


def _out_folder(out: Path | None, base: Path, source: Path, force: bool) -> Path:
    """--out (default: `<source>-merged` beside the source), checked not to overlap an input or, unless
    `force`, to exist."""
    out = Path(out) if out is not None else source.parent / f"{source.name}-merged"
    for folder in {base, source}:
        if inside(out, folder) or inside(folder, out):
            raise BuilderError(f"--out {out} overlaps the input folder {folder}; pick another --out")
    if out.exists() and not force:
        raise BuilderError(f"{out} already exists; pass --force to replace it, or choose another --out")
    return out


def _write(tmp: Path, base: Path, shards: list[Shard], plan: Plan, config: dict, lora_dir: Path | None,
           dtype: str, device: str, quiet: bool) -> dict:  # fmt: skip
    """Fill `tmp` with the merged model; returns its provenance record."""
    # non-weight files: the base's, then the adapter's tokenizer files on top
    copied = copy_tree(base, tmp, keep_base_file)
    if lora_dir is not None:
        copy_tree(lora_dir, tmp, keep_tokenizer_file)
    new_config = _merged_config(config, plan)
    if new_config != config:
        write_atomic(tmp / "config.json", json.dumps(new_config, indent=2, sort_keys=False) + "\n")
    base_hashes = write_shards(tmp, shards, plan, device, quiet)

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
    prov.update(_lora_provenance(lora_dir, plan))
    return prov


def _merged_config(config: dict, plan: Plan) -> dict:
    """config.json of the merged model: the dtype asked for, and the vocab size an adapter grew."""
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
    return new_config


def _lora_provenance(lora_dir: Path, plan: Plan) -> dict[str, Any]:
    """The provenance record's adapter part: which adapter (hashed), its config, each merged module."""
    weights = adapter_weights_file(lora_dir)
    cfg = plan.lora_config
    try:  # the installed version, without importing peft (and transformers with it: ~2 s of CPU)
        from importlib.metadata import version

        peft_version = version("peft")
    except Exception:  # noqa: BLE001
        peft_version = None
    prov: dict[str, Any] = {"mode": "lora merge"}
    prov["adapter"] = {
        "path": str(lora_dir.resolve()),
        "sha256": {weights.name: sha256(weights), "adapter_config.json": sha256(lora_dir / "adapter_config.json")},
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
