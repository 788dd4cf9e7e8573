"""Vision-language models: which architectures take images here, how their checkpoints name the language
model, the vision tower and the projector, and which of those parts an adapter changes.

Qwen2-VL and Qwen2.5-VL checkpoints come in two key layouts. transformers before 4.52 saved (and peft
adapters trained with it name) `model.layers...`, `model.embed_tokens`, `visual.blocks...`,
`visual.merger...`; from 4.52 on the modules are `model.language_model.layers...` and `model.visual...`.
SWIFT adapters of some runs name the language model `language_model.model.layers...`. `base_key` finds a
name of any layout in the base's own layout (the merge and the adapter checks use it), `part` says which
part a name belongs to.

Standard library only: the host (spec, selection) and the build stage both use it.
"""

from __future__ import annotations

from collections import Counter

# Architectures whose image path this builder converts and checks (llama.cpp's mmproj of the pinned
# converter; greedy ids with an image equal transformers' in tests/model/test_vision_gguf.py).
PROVEN = {
    "Qwen2VLForConditionalGeneration": "Qwen2-VL",
    "Qwen2_5_VLForConditionalGeneration": "Qwen2.5-VL",
}
LANGUAGE_MODEL = "language model"
TOWER = "vision tower"
PROJECTOR = "projector"

# (old prefix, new prefix): the same module under transformers < 4.52 and >= 4.52, then SWIFT's name.
_LAYOUTS = (
    ("visual.", "model.visual."),
    ("model.", "model.language_model."),
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
)
_PEFT_PREFIX = "base_model.model."


def vision_architecture(config: dict) -> str | None:
    """The architecture of a vision-language model (config.json has a vision config, or names a known one);
    None for a text model."""
    archs = config.get("architectures") or []
    arch = str(archs[0]) if archs else ""
    if arch in PROVEN or isinstance(config.get("vision_config"), dict):
        return arch or str(config.get("model_type") or "unknown")
    return None


def proven(config: dict) -> bool:
    """Whether the model is one whose image path is converted and checked here."""
    return (config.get("architectures") or [""])[0] in PROVEN


def canonical(name: str) -> str:
    """`name` (a module or tensor name of any layout, with or without peft's prefix) in the >= 4.52 layout."""
    name = name.removeprefix(_PEFT_PREFIX)
    if name.startswith(("model.language_model.", "model.visual.")):
        return name
    for old, new in _LAYOUTS:
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def _spellings(name: str) -> list[str]:
    """`name` and the same module in every layout."""
    new = canonical(name)
    out = [name.removeprefix(_PEFT_PREFIX), new]
    for old, new_prefix in _LAYOUTS[:2]:
        if new.startswith(new_prefix):
            out.append(old + new[len(new_prefix) :])
    return list(dict.fromkeys(out))


def base_key(name: str, base_keys) -> str | None:
    """The base's own spelling of `name` (a tensor name; in `base_keys`), whatever layout `name` is in; None
    when the base has no such tensor in any layout."""
    return next((n for n in _spellings(name) if n in base_keys), None)


def part(name: str) -> str:
    """Which part of a vision-language model a module or tensor name belongs to."""
    name = canonical(name)
    if name.startswith("model.visual.merger."):
        return PROJECTOR
    if name.startswith("model.visual."):
        return TOWER
    return LANGUAGE_MODEL


def parts_touched(lora_modules, full_tensors) -> dict[str, str]:
    """{part: what the adapter does to it} for the names of its LoRA modules and of the full tensors it saves,
    in the order language model, vision tower, projector (parts it leaves alone are absent)."""
    lora = Counter(part(n) for n in lora_modules)
    full = Counter(part(n) for n in full_tensors)
    out = {}
    for p in (LANGUAGE_MODEL, TOWER, PROJECTOR):
        what = [f"LoRA on {lora[p]} module(s)"] if lora[p] else []
        what += [f"{full[p]} full tensor(s)"] if full[p] else []
        if what:
            out[p] = ", ".join(what)
    return out


# -- vLLM: where its LoRA loader puts an adapter's modules ------------------------------------------------------
# vLLM's Qwen2VLForConditionalGeneration / Qwen2_5_VLForConditionalGeneration (model_executor/models/qwen2_vl.py,
# qwen2_5_vl.py): hf_to_vllm_mapper.orig_to_new_prefix, applied in this order to every LoRA tensor name after
# `base_model.model.` (lora/utils.py parse_fine_tuned_lora_name), and get_mm_mapping()'s module prefixes. vLLM
# checks a LoRA module's last name only (q_proj, ...): a module whose full name lands outside these prefixes is
# loaded and never applied, and the server answers as the base does. tests/model/test_vision_vllm.py compares
# these tables with the installed vLLM's source.
VLLM_PREFIX_MAP = (
    ("model.language_model.", "language_model.model."),
    ("model.visual.", "visual."),
    ("lm_head.", "language_model.lm_head."),
    ("model.", "language_model.model."),
)
VLLM_PARTS = (
    ("visual.merger.", PROJECTOR),
    ("visual.", TOWER),
    ("language_model.model.", LANGUAGE_MODEL),
    ("language_model.lm_head.", LANGUAGE_MODEL),
)
# The vLLM classes with supports_tower_connector_lora = True among PROVEN (checked as above); the flag is
# experimental in vLLM and not served with an image here, so such adapters are merged.
VLLM_TOWER_CONNECTOR_LORA = tuple(PROVEN)


def vllm_module(name: str) -> str:
    """The module name vLLM's LoRA loader gives an adapter module (its own name in the adapter file)."""
    name = name.removeprefix(_PEFT_PREFIX)
    for old, new in VLLM_PREFIX_MAP:
        if name.startswith(old):
            name = new + name[len(old) :]
    return name


def vllm_part(name: str) -> str | None:
    """The part of the model vLLM applies the LoRA of adapter module `name` to; None: none (never applied)."""
    mapped = vllm_module(name)
    return next((p for prefix, p in VLLM_PARTS if mapped.startswith(prefix)), None)


def vllm_misplaced(adapter_modules) -> list[str]:
    """The adapter's modules (names as in its weights file) that vLLM would load and never apply: their name
    lands outside its language model, vision tower and projector, or in another part than the checkpoint's."""
    return sorted(m for m in adapter_modules if vllm_part(m) is None or vllm_part(m) != part(m))
