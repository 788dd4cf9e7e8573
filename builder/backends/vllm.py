"""vLLM: the merged model served by `vllm serve` on an NVIDIA GPU."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from builder.backends.base import REMOTE_CODE, Backend, Healthcheck, http_probe

if TYPE_CHECKING:
    from builder.spec import BuildSpec

# vLLM 0.33 dropped these; the vLLM image re-checks against vLLM's own registry at build time.
VLLM_UNSUPPORTED = {"BaichuanForCausalLM", "InternLMForCausalLM"}


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


BACKEND = VllmBackend(
    name="vllm",
    title="vLLM",
    description="merged model, `vllm serve`",
    base_image="vllm/vllm-openai:v0.33.0",
    base_arg="VLLM_BASE",
    port=8000,
    health_path="/health",
    healthcheck=Healthcheck(http_probe(8000, "/health"), "10s", "5s", 3, "300s"),
    api_key_var="VLLM_API_KEY",
    check_explicit=False,  # the build's arch-check stage asks vLLM itself, which knows better than this list
    gpu=True,
    cache_volume="/home/app/.cache",
    passthrough_env=("VLLM_EXTRA_ARGS",),
    runtime_modules=("vllm_boot.py",),
)
