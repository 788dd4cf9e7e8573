"""vLLM: the model served by `vllm serve` on an NVIDIA GPU (or, `device: cpu`, on x86/Arm CPUs), LoRA adapters
merged or served unmerged."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, Optional

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

# vLLM's CPU variant (device: cpu): upstream's CPU image of the same vLLM version as the GPU base. The two
# pins move together.
VLLM_VERSION = "0.33.0"
CPU_BASE = f"vllm/vllm-openai-cpu:v{VLLM_VERSION}"
# What VLLM_CPU_OMP_THREADS_BIND takes: auto, nobind, or CPU id lists (0-31, 0-15|16-31 for two ranks).
THREADS_BIND = r"auto|nobind|[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*(\|[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*)*"

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
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="vLLM's --dtype (the image's LLM_DTYPE): auto = vLLM's choice, except on a CPU without "
        "avx512_bf16, where 16-bit weights run slower than float32 and the CPU variant serves float32",
    )
    cpu_kvcache_space: int = Field(
        4,
        ge=1,
        le=4096,
        description="CPU variant: GiB of memory for the KV cache (VLLM_CPU_KVCACHE_SPACE); what the server "
        "reserves at start besides the weights",
    )
    cpu_omp_threads_bind: Annotated[str, Field(pattern=rf"^(?:{THREADS_BIND})$")] = Field(
        "auto",
        description="CPU variant: cores vLLM's compute threads bind to (VLLM_CPU_OMP_THREADS_BIND): auto "
        "(one NUMA node, leaving a core for the server), nobind, or CPU ids such as 0-7",
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
        options = self.options_of(spec)
        values = (*self.tunables, ("LLM_MAX_MODEL_LEN", options.max_model_len), ("LLM_DTYPE", options.dtype))
        if self.cpu_variant_of_gpu(spec):
            values += (
                ("VLLM_CPU_KVCACHE_SPACE", str(options.cpu_kvcache_space)),
                ("VLLM_CPU_OMP_THREADS_BIND", options.cpu_omp_threads_bind),
            )
        return values

    def kv_cache_gib(self, spec: BuildSpec) -> int:
        return self.options_of(spec).cpu_kvcache_space if self.cpu_variant_of_gpu(spec) else 0

    def adapter_problems(self, facts: AdapterFacts) -> list[str]:
        """What vLLM's PEFT loader refuses or would serve wrongly (DoRA, saved modules, rank over 512, ...);
        whether the architecture takes LoRA at all, the build's arch-check asks vLLM's registry."""
        from builder.model.adapter import vllm_problems

        return vllm_problems(facts)

    def engine_tag(self, spec: BuildSpec) -> str:
        """vLLM's version, with `-cpu` for the CPU variant: 0.33.0, 0.33.0-cpu."""
        return VLLM_VERSION + ("-cpu" if self.cpu_variant_of_gpu(spec) else "")

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
    base_image=f"vllm/vllm-openai:v{VLLM_VERSION}",
    cpu_base=CPU_BASE,
    # vLLM's CPU worker keeps its shared-memory ring buffers in /dev/shm (160 MiB for a small model; Docker's
    # default 64 MB is refused at start)
    cpu_shm_size="1g",
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
    # the bound on one request's work (builder/runtime/vllm_limits.py, docs/vllm-limits.md); 0: no bound
    tunables=(
        ("LLM_MAX_N", "16"),
        ("LLM_MAX_TOKENS", "4096"),
        ("LLM_MAX_BODY_BYTES", "4194304"),
        ("LLM_MAX_LOGPROBS", "20"),
    ),
    options=VllmOptions,
    runtime_modules=("vllm_boot.py", "vllm_limits.py"),
    # adapters unmerged: --enable-lora --lora-modules, each adapter a small layer over one base
    serves_adapters=True,
    # vllm-engine:VERSION[-cpu] serves a mounted /models/model; NAME-weights-hf:TAG holds the weights layer
    mounted_weights=True,
    weights_suffix="-hf",
    template_values={"lora_dir": LORA_DIR},
)
