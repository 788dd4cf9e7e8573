"""chatglm.cpp: the GLM family converted to GGML, served by our OpenAI server over chatglm_cpp.Pipeline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from builder.backends.base import Backend, DemoBases, Healthcheck, http_probe
from builder.model.convert import DEFAULT_QUANT as GGML_DEFAULT
from builder.model.convert import QUANTS as GGML_QUANTS

if TYPE_CHECKING:
    from builder.spec import BuildSpec

CHATGLM_CPP_VERSION = "0.4.2"  # the chatglm-cpp wheel its image compiles (pyproject.toml pins the same)


@dataclass(frozen=True)
class ChatglmcppBackend(Backend):
    def check(self, config: dict, spec: BuildSpec) -> Optional[str]:
        from builder.errors import BuilderError
        from builder.model.convert import check_supported

        try:  # a QUANT it cannot produce is selection's to report (it names the backends that can)
            quant = self.quant_for(spec)
            check_supported(config, quant if quant in self.quants else "f16")
        except BuilderError as e:
            return str(e)
        return None

    def vision_gap(self, config: dict, spec: BuildSpec) -> Optional[str]:
        return "chatglm.cpp's Pipeline takes text only (it has no image encoder)"

    def engine_tag(self, spec: BuildSpec) -> str:
        """chatglm-cpp's version, and for the CUDA build its architectures: 0.4.2, 0.4.2-cuda-80-86-89-90."""
        if self.uses_cuda(spec):
            archs = spec.cuda_architectures
            return f"{CHATGLM_CPP_VERSION}-cuda" + (f"-{archs.replace(';', '-')}" if archs else "")
        return CHATGLM_CPP_VERSION


BACKEND = ChatglmcppBackend(
    name="chatglmcpp",
    title="chatglm.cpp",
    description="GGML (f32 … q4_0), our OpenAI server over `chatglm_cpp.Pipeline`",
    base_image="python:3.12-slim-bookworm",
    base_arg="RUNTIME_BASE",
    port=8001,
    health_path="/health",
    healthcheck=Healthcheck(http_probe(8001, "/health"), "2s", "5s", 5, "60s"),
    api_key_var="API_KEY",
    quants=tuple(GGML_QUANTS),
    default_quant=GGML_DEFAULT,
    cuda_base="nvidia/cuda:12.8.1-runtime-ubuntu24.04",
    renamed_options={"chatglmcpp_cuda": "cuda"},  # before every backend shared one CUDA switch
    runtime_modules=("chatglmcpp",),
    template_values={"chatglm_cpp_version": CHATGLM_CPP_VERSION},
    demo=DemoBases(local="local/python:bookworm", public="python:3.11-slim-bookworm"),
    mounted_weights=True,
    weights_suffix="-ggml",  # GGML, not llama.cpp's GGUF nor vLLM's folders: NAME-weights-ggml
)
