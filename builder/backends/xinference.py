"""Xinference: the model registered and launched when the container starts, on Xinference's llama.cpp
engine (the GGUF; the default), or its transformers or vLLM engine (the merged weights)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Optional, get_args

from pydantic import Field

from builder.backends.base import Backend, DemoBases, Healthcheck, NoOptions, Topology, gguf_check
from builder.backends.llamacpp import BACKEND as LLAMACPP

if TYPE_CHECKING:
    from builder.spec import BuildSpec

# Xinference's llama.cpp engine imports xllamacpp; the image installs this prebuilt CPU wheel when its
# base has none (the Xinference base images of the 4.x line do not pin one). mk/xllamacpp.mk: the same.
XLLAMACPP_VERSION = "2026.10.11549"


class XinferenceOptions(NoOptions):
    engine: Literal["llama.cpp", "transformers", "vllm"] = Field(
        "llama.cpp",
        description="Xinference engine: llama.cpp serves the GGUF (QUANT) on CPU; transformers and vllm the merged weights",
    )


@dataclass(frozen=True)
class XinferenceCluster:
    """Xinference's distributed mode as compose.xinference-cluster.yaml and k8s/xinference-cluster/ run it.
    Every value reaches the containers as an environment variable that the image's cluster role reads
    (builder/runtime/xinference/cluster.py, which keeps the same defaults)."""

    workers: int = 2
    replicas: int = 2  # of the model; the supervisor waits for `workers` and Xinference puts one on each
    supervisor_port: int = 19997  # actor RPC, inside the cluster's network only
    worker_port: int = 30001  # actor RPC, inside the cluster's network only
    metrics_port: int = 30002  # Prometheus metrics of a worker (per-replica request counters)
    worker_grace: int = 30  # seconds between SIGTERM and SIGKILL: leave (deregister), then exit
    home_size: str = "1Gi"  # Kubernetes: a worker's home (registration, recovery state, logs)

    def supervisor_env(self, host: str) -> dict[str, str]:
        """The supervisor role's variables; `host`: the address it binds and hands to the workers."""
        return {
            "XINFERENCE_ROLE": "supervisor",
            "XINFERENCE_HOST": host,
            "XINFERENCE_SUPERVISOR_PORT": str(self.supervisor_port),
            "XINFERENCE_REPLICAS": str(self.replicas),
            "XINFERENCE_MIN_WORKERS": str(self.workers),
        }

    def worker_env(self, host: str, supervisor_url: str) -> dict[str, str]:
        """A worker role's variables; `host`: its own address, `supervisor_url`: the supervisor's HTTP API."""
        return {
            "XINFERENCE_ROLE": "worker",
            "XINFERENCE_HOST": host,
            "XINFERENCE_SUPERVISOR_URL": supervisor_url,
            "XINFERENCE_WORKER_PORT": str(self.worker_port),
            "XINFERENCE_METRICS_PORT": str(self.metrics_port),
        }


@dataclass(frozen=True)
class XinferenceBackend(Backend):
    def check(self, config: dict, spec: BuildSpec) -> Optional[str]:
        return gguf_check(config) if self.serves_gguf(spec) else super().check(config, spec)

    def serves_gguf(self, spec: BuildSpec) -> bool:
        return self.options_of(spec).engine == "llama.cpp"

    def mounts_weights(self, spec: BuildSpec) -> bool:
        """The llama.cpp engine's build only: its engine serves llama.cpp's weights image (the same GGUF layer).
        The Hugging Face folder variants stay baked-only."""
        return self.serves_gguf(spec)

    def engine_tag(self, spec: BuildSpec) -> str:
        """The Xinference base's tag (its release, without a leading v) and the llama.cpp binding's version:
        4.1.0-xllamacpp-2026.10.11549."""
        release = spec.runtime_base(self.name).rsplit("/", 1)[-1].partition(":")[2] or "latest"
        return f"{release.removeprefix('v')}-xllamacpp-{XLLAMACPP_VERSION}"

    def template_for(self, spec: BuildSpec) -> str:
        """Two images: the GGUF on the llama.cpp engine, or the merged weights on transformers/vLLM."""
        return f"{self.name}-gguf.Dockerfile.j2" if self.serves_gguf(spec) else self.template

    def vision_gap(self, config: dict, spec: BuildSpec) -> Optional[str]:
        return (
            "its image registers the model as a text LLM (builder/runtime/xinference/registration.py: no "
            "vision ability, no mmproj for its llama.cpp engine), so images would never reach the model; "
            "BACKEND=llamacpp serves them"
        )

    def gguf_toolchain_base(self, spec: BuildSpec) -> tuple[str, str]:
        """llama.cpp compiles on the llama.cpp image's base: one cached compile serves both images."""
        return LLAMACPP.gguf_toolchain_base(spec)

    def openai_variants(self) -> tuple[tuple[str, dict[str, Any]], ...]:
        choices = get_args(XinferenceOptions.model_fields["engine"].annotation)
        return tuple((f"{self.title}, {engine} engine", {f"{self.name}_engine": engine}) for engine in choices)

    def openai_gaps(self, spec: BuildSpec) -> Optional[frozenset[str]]:
        # Xinference 4.1.0 per engine (tests/runtime/xinference/test_xinference_engines.py; the GGUF image
        # again in tests/e2e/test_pipeline.py); the vLLM engine needs a GPU, which these tests do not have.
        engine = self.options_of(spec).engine
        if engine == "llama.cpp":
            return frozenset()
        if engine == "transformers":
            return frozenset({"completions", "stop", "max_tokens_length", "usage"})
        return None

    def smoke_gaps(self, spec: BuildSpec) -> frozenset[str]:
        # Xinference 4.1.0's transformers engine implements chat only (no /v1/completions); its
        # llama.cpp engine serves all of it (tests/runtime/test_xinference_engines.py).
        return frozenset() if self.serves_gguf(spec) else frozenset({"completions"})


BACKEND = XinferenceBackend(
    name="xinference",
    title="Xinference",
    description="the model registered and launched at start: the GGUF on its llama.cpp engine (default), "
    "or the merged weights on its transformers or vLLM engine",
    hardware="CPU (llama.cpp, transformers engines) or NVIDIA GPU (vLLM engine)",
    base_image="xprobe/xinference:v4.1.0",
    base_arg="XINFERENCE_BASE",
    port=9997,
    health_path="/status",  # the server is up; the healthcheck also asks the model
    # Healthy only once the model is launched and answers a one-token chat.
    healthcheck=Healthcheck(("python3", "-m", "builder.runtime.xinference", "--health"), "5s", "60s", 3, "600s"),
    api_key_var="XINFERENCE_API_KEY",
    cache_volume="/home/app/.cache",
    stop_grace_period="30s",
    options=XinferenceOptions,
    runtime_modules=("xinference",),
    template_values={"xllamacpp_version": XLLAMACPP_VERSION},
    topologies=(
        Topology(
            "xinference-cluster",
            "Xinference's distributed mode: supervisor Deployment, worker StatefulSet, Services, "
            "PodDisruptionBudget, NetworkPolicy",
            XinferenceCluster(),
        ),
    ),
    demo=DemoBases(local="local/xinference:latest", harness_base="xinference"),
)
