"""The plan: what happens to each base tensor (a LoRA delta added, a full tensor from the adapter swapped
in, or nothing), with every shape checked against the base before anything is written."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder.errors import BuilderError
from builder.model.merge.adapter import ADAPTER_PREFIX, AdapterTensor, LoraSpec, get_pattern_key, read_adapter
from builder.model.tensors import TensorInfo
from builder.model.vision import base_key, vision_architecture

# Names of vocab-shaped matrices: when an adapter resizes one, it has to resize all of them.
VOCAB_MATRIX = re.compile(r"(embed_tokens|lm_head|output_layer|word_embeddings|wte|embed_out)\.weight$")

_LORA_SUFFIX = re.compile(
    r"^(?P<mod>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|lora_embedding_B|"
    r"lora_magnitude_vector(?:\.weight)?)$"
)


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


def build_plan(base_tensors: dict[str, TensorInfo], config: dict, adapter: Path | None, dtype: str) -> Plan:
    """The plan for merging the LoRA adapter folder `adapter` (None: pass the base through) into the base
    whose tensors are `base_tensors` and whose config.json is `config`, written as `dtype`."""
    config_dtype = config.get("dtype") or config.get("torch_dtype")
    config_dtype = config_dtype if config_dtype in ("bfloat16", "float16", "float32") else None
    plan = Plan(dtype=dtype, config_dtype=config_dtype)
    if adapter is None:
        return plan
    loaded = read_adapter(adapter)
    cfg = loaded.spec
    plan.lora_config = cfg
    lora = _sort_adapter_tensors(loaded.tensors, plan, adapter)
    if vision_architecture(config):
        lora = _to_base_layout(lora, plan, base_tensors)
    _check_targets(plan, lora, base_tensors)
    plan.new_vocab = _check_replacements(plan.replace, base_tensors)
    for mod, parts in lora.items():
        w = base_tensors[f"{mod}.weight"]
        shape = plan.replace[f"{mod}.weight"].shape if f"{mod}.weight" in plan.replace else w.shape
        lm = _lora_module(mod, parts, shape, cfg, adapter)
        plan.modules[f"{mod}.weight"] = lm
        if "lora_B.bias" in parts:
            bias_key = _bias_key(mod, parts["lora_B.bias"], base_tensors)
            lm.bias = parts["lora_B.bias"]
            plan.bias_of[bias_key] = lm
    return plan


def _sort_adapter_tensors(tensors: dict[str, AdapterTensor], plan: Plan, adapter: Path) -> dict[str, dict[str, Any]]:
    """LoRA parts by module ({module: {part: tensor}}); full tensors go to `plan.replace` under their base names."""
    lora: dict[str, dict[str, Any]] = {}
    for key, t in tensors.items():
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
    return lora


def _to_base_layout(lora: dict[str, dict[str, Any]], plan: Plan, base_tensors: dict[str, TensorInfo]):
    """A vision-language adapter's module and tensor names in the base's key layout (an adapter trained with
    transformers >= 4.52 on a checkpoint saved before it, or the other way round: builder/model/vision.py)."""
    plan.replace = {base_key(k, base_tensors) or k: t for k, t in plan.replace.items()}
    return {(base_key(f"{m}.weight", base_tensors) or f"{m}.weight").removesuffix(".weight"): parts
            for m, parts in lora.items()}  # fmt: skip


def _check_targets(plan: Plan, lora: dict[str, dict[str, Any]], base_tensors: dict[str, TensorInfo]) -> None:
    """Every tensor the adapter replaces and every module it adapts exists in the base."""
    missing = sorted({k for k in plan.replace if k not in base_tensors})
    for mod in lora:
        if f"{mod}.weight" not in base_tensors:
            missing.append(mod)
    if missing:
        raise BuilderError(
            f"the adapter targets {len(missing)} module(s) the base does not have (e.g. {', '.join(missing[:3])}); "
            "it was trained on a different model: pass the right --base"
        )


def _check_replacements(replace: dict[str, AdapterTensor], base_tensors: dict[str, TensorInfo]) -> int | None:
    """Full-tensor replacements have the base's shapes, except that vocab matrices may have grown (added
    tokens), all of them to one size: that size (the new vocab_size), or None when none grew."""
    vocab_keys = [k for k in base_tensors if VOCAB_MATRIX.search(k) and len(base_tensors[k].shape) == 2]
    old_vocab = {base_tensors[k].shape[0] for k in vocab_keys}
    resized: dict[str, int] = {}
    for k, t in replace.items():
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
    if not resized:
        return None
    sizes = set(resized.values())
    stale = [k for k in vocab_keys if k not in resized and base_tensors[k].shape[0] in old_vocab]
    if len(sizes) > 1 or stale:
        raise BuilderError(
            f"the adapter resizes the vocabulary ({', '.join(f'{k}: {v}' for k, v in resized.items())}) "
            f"but not consistently{' (' + ', '.join(stale) + ' keeps the old size)' if stale else ''}; "
            "train with both the input embedding and lm_head in modules_to_save"
        )
    return sizes.pop()


def _lora_module(mod: str, parts: dict[str, Any], shape: tuple[int, ...], cfg: LoraSpec, adapter: Path) -> LoraModule:
    """The LoRA module `mod` (its A/B, DoRA magnitude) checked against its base weight's `shape`, with its
    rank, alpha (rank/alpha patterns applied) and scale."""
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
            raise BuilderError(f"{adapter}: {mod} has a DoRA magnitude but use_dora is false in adapter_config.json")
        out_features = out_f if kind == "linear" else shape[1]
        ok = ok and tuple(parts["lora_magnitude_vector.weight"].shape) == (out_features,)
    elif cfg.use_dora:
        raise BuilderError(f"{adapter}: use_dora is set but {mod} has no lora_magnitude_vector; re-save the adapter")
    if not ok:
        raise BuilderError(
            f"shape mismatch for {mod}: base weight {tuple(shape)}, LoRA A {tuple(a.shape)} / B {tuple(b.shape)} "
            f"(r={r} per adapter_config.json); the adapter was made for another base model: pass the right --base"
        )
    lm = LoraModule(mod, kind, {k: v for k, v in parts.items() if k != "lora_B.bias"}, r, alpha)
    lm.scale = alpha / math.sqrt(r) if cfg.use_rslora else alpha / r
    return lm


def _bias_key(mod: str, lora_bias: AdapterTensor, base_tensors: dict[str, TensorInfo]) -> str:
    """The base bias a LoRA bias (lora_bias=True) adds to, checked to exist with the same shape."""
    bias_key = f"{mod}.bias"
    if bias_key not in base_tensors:
        raise BuilderError(
            f"the adapter has a LoRA bias for {mod} but the base layer has no bias; pass the right --base"
        )
    if tuple(lora_bias.shape) != base_tensors[bias_key].shape:
        raise BuilderError(f"shape mismatch for {bias_key}; the adapter was made for another base model")
    return bias_key
