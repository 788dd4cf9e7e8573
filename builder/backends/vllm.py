"""vLLM: the model served by `vllm serve` on an NVIDIA GPU, LoRA adapters merged or served unmerged."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

from pydantic import AfterValidator, Field

from builder.backends.base import REMOTE_CODE, Backend, Healthcheck, NoOptions, http_probe

if TYPE_CHECKING:
    from builder.model.adapter import AdapterFacts
    from builder.spec import BuildSpec

# vLLM 0.33 dropped these; the vLLM image re-checks against vLLM's own registry at build time.
VLLM_UNSUPPORTED = {"BaichuanForCausalLM", "InternLMForCausalLM"}

# What vLLM's --max-model-len takes (vllm/utils/argparse_utils.py human_readable_int_or_auto).
MAX_MODEL_LEN = r"auto|-1|[1-9][0-9]*|[0-9]+(\.[0-9]+)?[kKmMgG]"

# First start of a served model: weights load, torch.compile (cached under ~/.cache/vllm afterwards),
# CUDA-graph capture, KV-cache profiling. Minutes for a 7-9B model on one GPU; a large one takes longer.
STARTUP_BUDGET = "1200s"

LORA_DIR = "/models/lora"  # adapter NAME served unmerged: /models/lora/NAME (adapter_config.json + weights)


def check_max_model_len(value: str) -> str:
    if not re.fullmatch(MAX_MODEL_LEN, value):
        raise ValueError(
            f"{value!r} is not a --max-model-len: auto (or -1), a token count (4096), or one with a "
            "k/m/g (×1000) or K/M/G (×1024) suffix (32k, 32K)"
        )
    return value


class VllmOptions(NoOptions):
    max_model_len: Annotated[str, AfterValidator(check_max_model_len)] = Field(
        "auto",
        description="vLLM's --max-model-len, the context its KV cache is sized for: auto (or -1) = the "
        "largest that fits in GPU memory, else tokens (4096, 32k, 32K); the image's LLM_MAX_MODEL_LEN",
    )


@dataclass(frozen=True)
class VllmBackend(Backend):
    def check(self, config: dict, spec: BuildSpec) -> Optional[str]:
        archs = set(config.get("architectures") or [])
        if not archs:
            return "config.json names no architectures"
        if archs & VLLM_UNSUPPORTED:
            return f"vLLM 0.33 dropped {', '.join(sorted(archs & VLLM_UNSUPPORTED))}"
        if "auto_map" in config and not spec.trust_remote_code:
            return REMOTE_CODE
        return None

    def vision_gap(self, config: dict, spec: BuildSpec) -> Optional[str]:
        return None  # the build's arch-check asks vLLM's registry, which lists the multimodal architectures

    def vision_plan(self, spec: BuildSpec) -> Optional[str]:
        return (
            "images through image_url (vLLM's own processor); the architecture is checked against vLLM's registry "
            "at build time; not yet served with an image on a GPU here"
        )

    def tunables_for(self, spec: BuildSpec) -> tuple[tuple[str, str], ...]:
        return (*self.tunables, ("LLM_MAX_MODEL_LEN", self.options_of(spec).max_model_len))

    def adapter_problems(self, facts: AdapterFacts) -> list[str]:
        """What vLLM's PEFT loader refuses or would serve wrongly (DoRA, saved modules, rank over 512, ...);
        whether the architecture takes LoRA at all, the build's arch-check asks vLLM's registry."""
        from builder.model.adapter import vllm_problems

        return vllm_problems(facts)

    def adapter_build_args(self, spec: BuildSpec, served: dict[str, Path]) -> dict[str, str]:
        """LORA_RANK: the adapters' largest rank (the arch-check refuses what vLLM cannot serve at it);
        MAX_LORA_RANK: the smallest --max-lora-rank vLLM allows that holds it (the image's LLM_MAX_LORA_RANK)."""
        from builder.model.adapter import declared_rank, vllm_max_lora_rank

        rank = max(declared_rank(path) for path in served.values())
        return {"LORA_RANK": str(rank), "MAX_LORA_RANK": str(vllm_max_lora_rank(rank) or "")}


BACKEND = VllmBackend(
    name="vllm",
    title="vLLM",
    description="merged model, `vllm serve`",
    base_image="vllm/vllm-openai:v0.33.0",
    base_arg="VLLM_BASE",
    port=8000,
    health_path="/health",
    healthcheck=Healthcheck(http_probe(8000, "/health"), "10s", "5s", 3, STARTUP_BUDGET),
    startup_budget=STARTUP_BUDGET,
    api_key_var="VLLM_API_KEY",
    check_explicit=False,  # the build's arch-check stage asks vLLM itself, which knows better than this list
    gpu=True,
    cache_volume="/home/app/.cache",
    passthrough_env=("LLM_EXTRA_ARGS",),
    options=VllmOptions,
    runtime_modules=("vllm_boot.py",),
    # adapters unmerged: --enable-lora --lora-modules, each adapter a small layer over one base
    serves_adapters=True,
    template_values={"lora_dir": LORA_DIR},
)
