"""The backend registry: one record per serving backend, read by spec, render, build, smoke and the demo.

Adding a backend is one `Backend` record in `REGISTRY` plus one template,
`builder/image/templates/<name>.Dockerfile.j2`; compose.yaml, the .env that `make image` writes, the
smoke checks and `BACKEND=auto` follow from the record.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from builder.spec import BuildSpec

# A check answers "can this backend serve this model?": None for yes, else the reason why not.
Check = Callable[[dict, "BuildSpec"], Optional[str]]


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
class Backend:
    name: str  # BACKEND= value, image suffix, compose service and profile, spec field names
    title: str  # what the README and logs call it
    serves: str  # what the image serves, one line
    base_image: str  # default runtime base image (spec.base_images.<name>)
    base_arg: str  # the Dockerfile ARG that names the runtime base
    port: int  # where its server listens in the container; compose publishes the same host port
    health_path: str  # HTTP path that answers 200 once the model serves
    healthcheck: Healthcheck
    api_key_var: str  # container environment variable that receives the project's API key
    check: Check  # can it serve this model (config.json)? None, or why not
    check_explicit: bool = True  # also refuse an explicit BACKEND= choice when `check` says no
    quants: tuple[str, ...] = ()  # QUANT types it builds; () = it serves the merged weights as they are
    cuda_base: Optional[str] = None  # runtime base of its CUDA variant (spec.cuda), if it has one
    gpu: bool = False  # needs an NVIDIA GPU to serve
    cache_volume: Optional[str] = None  # container path that compose backs with a named volume
    passthrough_env: tuple[str, ...] = ()  # host/.env variables compose hands to the container as they are
    tunables: tuple[tuple[str, str], ...] = ()  # (container variable, default): image ENV, overridable via .env
    stop_grace_period: str = "10s"  # time between SIGTERM and SIGKILL on `docker compose stop`
    smoke_skip: frozenset[str] = frozenset()  # smoke checks its pinned version cannot pass (upstream gaps)
    gguf_closes_gaps: bool = False  # serving a GGUF (llama.cpp engine), it passes every smoke check
    gguf: bool = False  # serves a GGUF: its image builds the llama.cpp stages (compile, convert, quantize)
    demo: bool = False  # built and asked by `make demo`

    @property
    def dockerfile(self) -> str:
        return f"Dockerfile.{self.name}"

    @property
    def template(self) -> str:
        return f"{self.name}.Dockerfile.j2"

    def uses_cuda(self, spec: BuildSpec) -> bool:
        return self.gpu or (spec.cuda and self.cuda_base is not None)

    def serves_gguf(self, spec: BuildSpec) -> bool:
        return self.gguf or (self.name == "xinference" and spec.xinference_engine == "llama.cpp")

    def smoke_gaps(self, spec: BuildSpec) -> frozenset[str]:
        """The smoke checks this build cannot pass (written to .env as <BACKEND>_SMOKE_SKIP)."""
        return frozenset() if self.gguf_closes_gaps and self.serves_gguf(spec) else self.smoke_skip

    def quant_types(self, spec: BuildSpec) -> tuple[str, ...]:
        """The QUANT types this build produces; () when it serves the merged weights as they are."""
        return GGUF_QUANTS if self.serves_gguf(spec) else self.quants


# -- checks ------------------------------------------------------------------------------------

# vLLM 0.33 dropped these; the vLLM image re-checks against vLLM's own registry at build time.
VLLM_UNSUPPORTED = {"BaichuanForCausalLM", "InternLMForCausalLM"}
REMOTE_CODE = "the model needs remote code (auto_map in config.json): pass --trust-remote-code if you trust it"


def _check_vllm(config: dict, spec: BuildSpec) -> Optional[str]:
    archs = set(config.get("architectures") or [])
    if not archs:
        return "config.json names no architectures"
    if archs & VLLM_UNSUPPORTED:
        return f"vLLM 0.33 dropped {', '.join(sorted(archs & VLLM_UNSUPPORTED))}"
    if "auto_map" in config and not spec.trust_remote_code:
        return REMOTE_CODE
    return None


def _check_chatglmcpp(config: dict, spec: BuildSpec) -> Optional[str]:
    from builder.errors import BuilderError
    from builder.model.convert import check_supported

    try:  # a QUANT it cannot produce is _check_quant's to report (it names the backends that can)
        check_supported(config, spec.quant if spec.quant in GGML_QUANTS else "f16")
    except BuilderError as e:
        return str(e)
    return None


def _check_llamacpp(config: dict, spec: BuildSpec) -> Optional[str]:
    from builder.model.gguf.convert import check_supported

    return check_supported(config)


def _check_xinference(config: dict, spec: BuildSpec) -> Optional[str]:
    if spec.xinference_engine == "llama.cpp":
        return _check_llamacpp(config, spec)
    return REMOTE_CODE if "auto_map" in config and not spec.trust_remote_code else None


# Xinference's llama.cpp engine imports xllamacpp; the image installs this prebuilt CPU wheel when its
# base has none (the Xinference base images of the 4.x line do not pin one).
XLLAMACPP_VERSION = "2026.10.11549"

GGML_QUANTS = ("f32", "f16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
GGUF_QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k_m", "q5_k_m", "q6_k")

REGISTRY: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend(
            name="vllm",
            title="vLLM",
            serves="merged model, `vllm serve`",
            base_image="vllm/vllm-openai:v0.33.0",
            base_arg="VLLM_BASE",
            port=8000,
            health_path="/health",
            healthcheck=Healthcheck(http_probe(8000, "/health"), "10s", "5s", 3, "300s"),
            api_key_var="VLLM_API_KEY",
            check=_check_vllm,
            check_explicit=False,  # stage arch-check asks vLLM itself, which knows better than this list
            gpu=True,
            cache_volume="/home/app/.cache",
            passthrough_env=("VLLM_EXTRA_ARGS",),
        ),
        Backend(
            name="chatglmcpp",
            title="chatglm.cpp",
            serves="GGML (f32 … q4_0), our OpenAI server over `chatglm_cpp.Pipeline`",
            base_image="python:3.12-slim-bookworm",
            base_arg="RUNTIME_BASE",
            port=8001,
            health_path="/health",
            healthcheck=Healthcheck(http_probe(8001, "/health"), "2s", "5s", 5, "60s"),
            api_key_var="API_KEY",
            check=_check_chatglmcpp,
            quants=GGML_QUANTS,
            cuda_base="nvidia/cuda:12.8.1-runtime-ubuntu24.04",
            demo=True,
        ),
        Backend(
            name="llamacpp",
            title="llama.cpp",
            serves="GGUF (f32 … q4_k_m), `llama-server` (continuous batching)",
            base_image="debian:bookworm-slim",
            base_arg="LLAMACPP_BASE",
            port=8002,
            health_path="/health",
            healthcheck=Healthcheck(bash_probe(8002, "/health"), "2s", "5s", 5, "60s"),
            api_key_var="LLAMA_API_KEY",
            check=_check_llamacpp,
            quants=GGUF_QUANTS,
            cuda_base="nvidia/cuda:12.8.1-runtime-ubuntu24.04",
            tunables=(("LLAMA_ARG_N_PARALLEL", "8"), ("LLAMA_ARG_CTX_SIZE", "4096"), ("LLAMA_ARG_THREADS", "-1")),
            gguf=True,
            demo=True,
        ),
        Backend(
            name="xinference",
            title="Xinference",
            serves="merged model, registered and launched at start",
            base_image="xprobe/xinference:v4.1.0",
            base_arg="XINFERENCE_BASE",
            port=9997,
            health_path="/status",  # the server is up; the healthcheck also asks the model
            # Healthy only once the model is launched and answers a one-token chat.
            healthcheck=Healthcheck(
                ("python3", "-m", "builder.runtime.xinference", "--health"), "5s", "60s", 3, "600s"
            ),
            api_key_var="XINFERENCE_API_KEY",
            check=_check_xinference,
            cache_volume="/home/app/.cache",
            stop_grace_period="30s",
            # Xinference 4.1.0's transformers engine implements chat only (no /v1/completions); its
            # llama.cpp engine serves all of it (tests/runtime/test_xinference_engines.py).
            smoke_skip=frozenset({"completions"}),
            gguf_closes_gaps=True,
            demo=True,
        ),
    )
}
NAMES: tuple[str, ...] = tuple(REGISTRY)
QUANTS: tuple[str, ...] = tuple(dict.fromkeys(q for b in REGISTRY.values() for q in b.quants))
DEMO: tuple[str, ...] = tuple(b.name for b in REGISTRY.values() if b.demo)


def get(name: str) -> Backend:
    return REGISTRY[name]
