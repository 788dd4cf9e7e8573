"""The contract every backend record fulfils: what spec, selection, render, build, compose, k8s, smoke
and the demo read from it. A backend is one `Backend` (or a subclass overriding its decisions) plus
one Dockerfile template; nothing else in the project names it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from builder.model.adapter import AdapterFacts
    from builder.spec import BuildSpec

TEMPLATES = Path(__file__).resolve().parents[1] / "image" / "templates"
# The OpenAI API features the tests probe with the official `openai` client (tests/_openai_features.py),
# and how the reference page names them.
OPENAI_FEATURES = {
    "chat": "chat",
    "chat_stream": "chat, streaming",
    "stop": "`stop` strings",
    "max_tokens_length": '`max_tokens` → `finish_reason: "length"`',
    "completions": "`/v1/completions`",
    "usage": "`usage` counts",
}
REMOTE_CODE = "the model needs remote code (auto_map in config.json): pass --trust-remote-code if you trust it"


class NoOptions(BaseModel):
    """A backend's own spec options: each field `f` of its model becomes the spec field and CLI flag
    `<backend>_f` / `--<backend>-f` (choices from a Literal type)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Healthcheck:
    """The container's health probe: HEALTHCHECK in the Dockerfile and compose's healthcheck."""

    test: tuple[str, ...]  # exec form, run inside the container
    interval: str
    timeout: str
    retries: int
    start_period: str


def http_probe(port: int, path: str) -> tuple[str, ...]:
    """Exec-form probe for images that have Python: 200 from http://127.0.0.1:PORT/PATH."""
    code = (
        "import sys, urllib.request; "
        f"sys.exit(urllib.request.urlopen('http://127.0.0.1:{port}{path}', timeout=4).status != 200)"
    )
    return ("python3", "-c", code)


def bash_probe(port: int, path: str) -> tuple[str, ...]:
    """Exec-form probe for images without Python or curl: an HTTP/1.0 GET over bash's /dev/tcp, healthy
    on a 200 status line (no `$` in it: compose would interpolate one)."""
    script = (
        f"exec 3<>/dev/tcp/127.0.0.1/{port} && printf 'GET {path} HTTP/1.0\\r\\n\\r\\n' >&3 "
        "&& grep -q '^HTTP/1.[01] 200' <&3"
    )
    return ("bash", "-c", script)


@dataclass(frozen=True)
class DemoBases:
    """Bases `make demo` builds on: local stand-ins where the harness makes them, else public images."""

    local: str  # local/<image>: scripts/harness.sh bases builds it
    public: Optional[str] = None  # None: the record's own base_image is already small and public
    harness_base: Optional[str] = None  # scripts/bases/<this>.Dockerfile, when the local one comes from there


@dataclass(frozen=True)
class Topology:
    """A multi-container layout of one backend's image (Xinference's supervisor + workers): rendered to
    compose.<name>.yaml (template compose.<name>.yaml.j2) and the k8s base k8s/<name>/."""

    name: str
    description: str  # one line for the k8s README
    settings: Any  # the layout's numbers (workers, replicas, ports...), handed to its templates


@dataclass(frozen=True)
class Backend:
    name: str  # BACKEND= value, image suffix, compose service and profile, spec field prefix
    title: str  # what the README and logs call it
    description: str  # what the image serves, one line
    base_image: str  # default runtime base image (spec.base_images.<name>)
    base_arg: str  # the Dockerfile ARG that names the runtime base
    port: int  # where its server listens in the container; compose publishes the same host port
    health_path: str  # HTTP path that answers 200 once the model serves
    healthcheck: Healthcheck
    api_key_var: str  # container environment variable that receives the project's API key
    check_explicit: bool = True  # also refuse an explicit BACKEND= choice when `check` says no
    quants: tuple[str, ...] = ()  # QUANT types of its own format; () = it serves the merged weights as they are
    default_quant: Optional[str] = None  # its format's type when QUANT is unset (GGUF images: the GGUF default)
    cuda_base: Optional[str] = None  # runtime base of its CUDA variant (device: cuda), if it has one
    gpu: bool = False  # its default variant needs an NVIDIA GPU to serve (device: auto builds that one)
    cpu_base: Optional[str] = None  # runtime base of its CPU variant (device: cpu), for a backend whose default is GPU
    cpu_shm_size: Optional[str] = None  # /dev/shm its CPU variant needs (compose shm_size, a k8s memory emptyDir)
    cache_volume: Optional[str] = None  # container path that compose backs with a named volume
    passthrough_env: tuple[str, ...] = ()  # host/.env variables compose hands to the container as they are
    tunables: tuple[tuple[str, str], ...] = ()  # (container variable, default): image ENV, overridable via .env
    startup_budget: Optional[str] = None  # first start allowed before k8s restarts it; None: healthcheck.start_period
    stop_grace_period: str = "10s"  # time between SIGTERM and SIGKILL on `docker compose stop`
    options: type[BaseModel] = NoOptions  # its own spec options (see NoOptions)
    renamed_options: dict[str, str] = field(default_factory=dict)  # old spec key -> the field that replaced it
    runtime_modules: tuple[str, ...] = ()  # what its image ships from builder/runtime/ (beside smoke.py)
    template_values: dict[str, str] = field(default_factory=dict)  # pins its template reads (e.g. a wheel version)
    topologies: tuple[Topology, ...] = ()
    demo: Optional[DemoBases] = None  # built and asked by `make demo`, on these bases
    serves_adapters: bool = False  # serves LoRA adapters unmerged (each a small layer over one base)
    hardware: Optional[str] = None  # where it runs, as the docs say it; None: from `gpu` and `cuda_base`
    # also builds an engine image (the runtime without weights, serving what is mounted at /models) and a
    # FROM-scratch weights image holding the runtime's own weights layer (templates: `engine`, `weights` targets)
    mounted_weights: bool = False
    # what its weights and adapter images' repositories add to NAME-weights / NAME-lora, naming their format when
    # it is not GGUF ("" : GGUF; vLLM's "-hf": Hugging Face folders), so two backends of one spec never share one
    weights_suffix: str = ""
    template_dir: Path = TEMPLATES

    @property
    def dockerfile(self) -> str:
        return f"Dockerfile.{self.name}"

    @property
    def template(self) -> str:
        return f"{self.name}.Dockerfile.j2"

    def template_for(self, spec: BuildSpec) -> str:
        """The template its Dockerfile renders from for this spec (a backend may have one per variant)."""
        return self.template

    # -- decisions a backend overrides ----------------------------------------------------------

    def check(self, config: dict, spec: BuildSpec) -> Optional[str]:
        """Can it serve this model (config.json)? None, or the reason why not."""
        return REMOTE_CODE if "auto_map" in config and not spec.trust_remote_code else None

    def vision_gap(self, config: dict, spec: BuildSpec) -> Optional[str]:
        """None when this build serves the images of the vision-language model `config`, else why not: such a
        backend is skipped by BACKEND=auto and refused when named, never built text-only."""
        return f"{self.title} serves text only: the model's image input would be lost"

    def vision_plan(self, spec: BuildSpec) -> Optional[str]:
        """What its image does with a vision-language model it serves (one line for `make spec`)."""
        return None

    def serves_gguf(self, spec: BuildSpec) -> bool:
        """Its image builds the llama.cpp stages (compile, convert, quantize) and serves a GGUF."""
        return False

    def gguf_toolchain_base(self, spec: BuildSpec) -> tuple[str, str]:
        """(ARG, image) of the base llama.cpp is compiled on for this image: its own runtime base."""
        return self.base_arg, spec.runtime_base(self.name)

    def tunables_for(self, spec: BuildSpec) -> tuple[tuple[str, str], ...]:
        """(container variable, default) of this build: image ENV, compose's and k8s's overridable values."""
        return self.tunables

    def smoke_gaps(self, spec: BuildSpec) -> frozenset[str]:
        """The smoke checks this build cannot pass (written to .env as <BACKEND>_SMOKE_SKIP)."""
        return frozenset()

    def openai_variants(self) -> tuple[tuple[str, dict[str, Any]], ...]:
        """(label, spec fields) of each build of it whose OpenAI features differ (an engine, say)."""
        return ((self.title, {}),)

    def openai_gaps(self, spec: BuildSpec) -> Optional[frozenset[str]]:
        """The OPENAI_FEATURES this build's pinned server lacks, as the tests measure them with the official
        openai client (their expected gaps come from here); None: not measured on this project's machines."""
        return None

    def adapter_problems(self, facts: AdapterFacts) -> list[str]:
        """Why it cannot serve this adapter unmerged (empty: it can), each saying what to do instead."""
        return [] if self.serves_adapters else [f"{self.title} serves merged weights only"]

    def adapter_files(self, spec: BuildSpec, names: list[str]) -> dict[str, str]:
        """Files its image needs in the build context to serve adapters `names` unmerged, {context path: text}
        (its template COPYs them)."""
        return {}

    def adapter_build_args(self, spec: BuildSpec, served: dict[str, Path]) -> dict[str, str]:
        """Build args its image needs to serve the adapters `served` ({name: folder}) unmerged."""
        return {}

    def mounts_weights(self, spec: BuildSpec) -> bool:
        """This build also makes the engine and weights images (mounted_weights; a backend may have them for one
        variant only)."""
        return self.mounted_weights

    def engine_tag(self, spec: BuildSpec) -> str:
        """The tag of its engine image (mounted_weights): the engine's pin and how it was compiled."""
        raise NotImplementedError(f"{self.title} has no engine image")

    # -- derived --------------------------------------------------------------------------------

    def quant_types(self, spec: BuildSpec) -> tuple[str, ...]:
        """The QUANT types this build produces; () when it serves the merged weights as they are."""
        from builder.model.gguf.convert import QUANTS as GGUF_QUANTS

        return GGUF_QUANTS if self.serves_gguf(spec) else self.quants

    def quant_for(self, spec: BuildSpec) -> Optional[str]:
        """The type this build produces: QUANT, or its format's default when QUANT is unset; None when it
        serves the merged weights as they are."""
        if not self.quant_types(spec):
            return None
        if spec.quant:
            return spec.quant
        if self.serves_gguf(spec):
            from builder.model.gguf.convert import DEFAULT_QUANT

            return DEFAULT_QUANT
        return self.default_quant

    def device_for(self, spec: BuildSpec) -> str:
        """The variant this build makes, `cpu` or `cuda`: spec.device where it has that variant, `auto` its
        default (CUDA for a GPU backend, else CPU); `cuda` keeps a CPU-only backend on CPU. A GPU backend
        with no CPU variant cannot be built for `cpu` (the error says so)."""
        if spec.device == "cpu":
            if self.gpu and not self.cpu_base:
                from builder.errors import BuilderError

                raise BuilderError(f"{self.title} has no CPU variant: drop DEVICE=cpu or BACKEND={self.name}")
            return "cpu"
        if spec.device == "cuda":
            return "cuda" if (self.gpu or self.cuda_base) else "cpu"
        return "cuda" if self.gpu else "cpu"

    def uses_cuda(self, spec: BuildSpec) -> bool:
        return self.device_for(spec) == "cuda"

    def kv_cache_gib(self, spec: BuildSpec) -> int:
        """GiB of host memory its server reserves for the KV cache at start (a CPU engine's; 0: none fixed)."""
        return 0

    def cpu_variant_of_gpu(self, spec: BuildSpec) -> bool:
        """This build is the CPU variant of a backend whose default is GPU (vLLM on CPU)."""
        return self.gpu and self.device_for(spec) == "cpu"

    def startup_period(self) -> str:
        """How long the first start may take (model load, compile) before Kubernetes restarts it."""
        return self.startup_budget or self.healthcheck.start_period

    def option_fields(self) -> dict[str, str]:
        """{spec field: option name} of its own options."""
        return {f"{self.name}_{option}": option for option in self.options.model_fields}

    def options_of(self, spec: BuildSpec) -> BaseModel:
        """Its options as the spec resolved them."""
        return self.options(**{option: getattr(spec, key) for key, option in self.option_fields().items()})


def gguf_check(config: dict) -> Optional[str]:
    """None when the pinned llama.cpp converter registers the model's architecture, else why not."""
    from builder.model.gguf.convert import check_supported

    return check_supported(config)
