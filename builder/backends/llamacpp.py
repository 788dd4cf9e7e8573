"""llama.cpp: the model converted to GGUF with llama.cpp's own tools, served by llama-server."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Optional

from pydantic import Field

from builder.backends.base import Backend, DemoBases, Healthcheck, NoOptions, bash_probe, gguf_check
from builder.model.gguf.convert import DEFAULT_QUANT as GGUF_DEFAULT
from builder.model.gguf.convert import QUANTS as GGUF_QUANTS
from builder.model.gguf.router import LORA_DIR, PRESET

if TYPE_CHECKING:
    from builder.model.adapter import AdapterFacts
    from builder.spec import BuildSpec

PRESET_FILE = "llamacpp/preset.ini"  # in the build context; the image's /models/preset.ini


class LlamacppOptions(NoOptions):
    cpu: Literal["all-variants", "avx2"] = Field(
        "all-variants",
        description="llama.cpp's CPU code: every x86 ISA level, picked at start (runtime dispatch), "
        "or one AVX2 build (a quarter of the compile)",
    )


@dataclass(frozen=True)
class LlamacppBackend(Backend):
    def check(self, config: dict, spec: BuildSpec) -> Optional[str]:
        return gguf_check(config)

    def serves_gguf(self, spec: BuildSpec) -> bool:
        return True

    def vision_gap(self, config: dict, spec: BuildSpec) -> Optional[str]:
        from builder.model.vision import PROVEN, proven, vision_architecture

        if proven(config):
            return None
        return (
            f"its image encoder (mmproj) is converted and checked here for {', '.join(PROVEN)} only; "
            f"{vision_architecture(config)} would be served text-only"
        )

    def vision_plan(self, spec: BuildSpec) -> Optional[str]:
        from builder.model.gguf.convert import mmproj_type

        quant = self.quant_for(spec)
        return (
            f"text GGUF ({quant}) + mmproj GGUF ({mmproj_type(quant)}: vision tower and projector), each a layer "
            "of its own; llama-server --mmproj; adapters on the language model share both"
        )

    def openai_gaps(self, spec: BuildSpec) -> Optional[frozenset[str]]:
        # tests/demo/test_demo.py (llama-server on the host) and tests/e2e/test_pipeline.py (the image)
        return frozenset()

    def adapter_problems(self, facts: AdapterFacts) -> list[str]:
        """What the pinned converter and llama-server cannot serve unmerged (DoRA, saved modules, ...)."""
        from builder.model.gguf.lora import llamacpp_problems

        return llamacpp_problems(facts)

    def adapter_files(self, spec: BuildSpec, names: list[str]) -> dict[str, str]:
        """llama-server's router preset: the base under the served name, each adapter under its own."""
        from builder.model.gguf.router import MMPROJ_GGUF, router_preset
        from builder.model.vision import proven
        from builder.spec import read_model_config

        config = read_model_config(spec)
        mmproj = MMPROJ_GGUF if config is not None and proven(config) else None
        return {PRESET_FILE: router_preset(spec.served_model_name or "model", names, mmproj=mmproj)}

    def engine_tag(self, spec: BuildSpec) -> str:
        """llama.cpp's commit and its compile: COMMIT-avx2, COMMIT-all-variants, COMMIT-cuda[-ARCH...]."""
        from builder.model.gguf.llamacpp import COMMIT

        if self.uses_cuda(spec):
            archs = spec.cuda_architectures
            return f"{COMMIT}-cuda" + (f"-{archs.replace(';', '-')}" if archs else "")
        return f"{COMMIT}-{spec.llamacpp_cpu}"


BACKEND = LlamacppBackend(
    name="llamacpp",
    title="llama.cpp",
    description="GGUF (f32 … q4_k_m), `llama-server` (continuous batching)",
    base_image="debian:bookworm-slim",
    base_arg="LLAMACPP_BASE",
    port=8002,
    health_path="/health",
    healthcheck=Healthcheck(bash_probe(8002, "/health"), "2s", "5s", 5, "60s"),
    api_key_var="LLAMA_API_KEY",
    quants=GGUF_QUANTS,
    default_quant=GGUF_DEFAULT,
    cuda_base="nvidia/cuda:12.8.1-runtime-ubuntu24.04",
    tunables=(("LLAMA_ARG_N_PARALLEL", "8"), ("LLAMA_ARG_CTX_SIZE", "4096"), ("LLAMA_ARG_THREADS", "-1")),
    options=LlamacppOptions,
    demo=DemoBases(local="local/debian:bookworm-slim"),
    # adapters unmerged: llama-server's router, one child per served name over one shared base GGUF layer
    serves_adapters=True,
    # llamacpp-engine:COMMIT-CPU serves a mounted /models/model.gguf; NAME-weights:TAG holds the GGUF layer
    mounted_weights=True,
    template_values={"lora_dir": LORA_DIR, "preset": PRESET, "preset_file": PRESET_FILE},
)
