"""`make demo` and `make smoke`: the whole pipeline on the embedded demo model, and API checks.

The demo trains the tiny GLM and its two LoRAs (builder/demo/model.py), builds the images of every
backend the registry marks `demo` from the base and the first LoRA with `builder build`, starts them
with compose and asks each backend the prompt the LoRA changed: the LoRA's answer coming back proves
merge and conversion carried it through. Then it builds one more image, of the demo backends that serve
adapters unmerged, with both LoRAs named over the one base, runs it with `docker run` and asks the
base's name and each LoRA's the same prompt: three names, three lines.

`make demo-vllm-cpu` runs that last step on vLLM's CPU variant (DEVICE=cpu): its base is a 4 GB image and
a few minutes more, so the default demo leaves it out.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from builder import backends
from builder.errors import BuilderError
from builder.image.docker import Docker
from builder.runtime.smoke import free_port

if TYPE_CHECKING:
    from builder.spec import BuildSpec

REPO = Path(__file__).resolve().parents[2]
HARNESS = REPO / "scripts" / "harness.sh"
CACHE = REPO / ".cache"
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
WHEELHOUSE = CACHE / "wheelhouse"
console = Console(stderr=True)

# The build stage's bases (each backend's come from its record's `demo`): a local stand-in where the
# harness can make one, else a small public image (the defaults target real GPU hosts).
BUILD_BASE_LOCAL, BUILD_BASE_PUBLIC = "local/python:bookworm", "python:3.11-slim-bookworm"
# Step 5's image: both LoRAs served unmerged under these names (builder.demo.model.ADAPTERS, in order).
ADAPTERS_NAME = "demo-adapters"
SERVED_ADAPTERS = ("tuned", "second")
LOAD_TIMEOUT_S = 300


def _can_run_harness() -> bool:
    return Path("/etc/debian_version").exists() and os.geteuid() == 0 and shutil.which("apt-get") is not None


def ensure_engine() -> Docker:
    """A Docker engine that answers: the caller's, or one started with the CI harness."""
    try:
        docker = Docker.detect()
        if docker.ping():
            return docker
    except BuilderError:
        pass
    if not _can_run_harness():
        raise BuilderError(
            "make demo needs a Docker engine with BuildKit (Docker 20.10+, or buildx): install Docker "
            "(https://docs.docker.com/engine/install/) and start it, then run make demo again"
        )
    console.print(
        "[yellow]no Docker engine answers: starting one with scripts/harness.sh engine-up (the CI harness)[/]"
    )
    subprocess.run(["bash", str(HARNESS), "engine-up"], check=True)
    docker = Docker.detect()
    docker.require_engine()
    return docker


def demo_spec_flags(models: Path) -> dict:
    """Spec for the demo: local bases where the harness can make them, else small public ones."""
    flags: dict = {
        "model": str(models / "base"),
        "adapter": str(models / "adapter"),
        "backends": ",".join(backends.DEMO),
        "quant": "q8_0",
        "name": "demo",
        "llamacpp_cpu": "avx2",  # a quarter of the all-variants compile: the cold demo stays short
    }
    demo = {name: backends.get(name).demo for name in backends.DEMO}
    if _can_run_harness():
        wanted = ",".join(d.harness_base for d in demo.values() if d.harness_base) or "none"
        subprocess.run(["bash", str(HARNESS), "bases"], check=True, env={**os.environ, "HARNESS_BASES": wanted})
        flags["base_images__build"] = BUILD_BASE_LOCAL
        flags.update({f"base_images__{name}": d.local for name, d in demo.items()})
    else:
        flags["base_images__build"] = BUILD_BASE_PUBLIC
        flags.update({f"base_images__{name}": d.public for name, d in demo.items() if d.public})
    if HOST_CA.is_file():
        flags["ca_bundle"] = str(HOST_CA)
    if any(WHEELHOUSE.glob("*.whl")):  # `make wheelhouse` (a dependency of `make demo`) fills it
        flags["wheelhouse"] = str(WHEELHOUSE)
    return flags


def _served_adapters(models: Path) -> dict[str, str]:
    """{served name: LoRA folder} of the demo's two LoRAs (builder.demo.model.ADAPTERS, in order)."""
    from builder.demo import model as demo

    return {served: str(models / folder) for served, (folder, _, _) in zip(SERVED_ADAPTERS, demo.ADAPTERS, strict=True)}


def adapters_spec_flags(flags: dict, models: Path) -> dict:
    """Step 5's spec from the first one's flags (`demo_spec_flags`: same bases, quant and options): the demo
    backends that serve adapters unmerged, both LoRAs named over the one base."""
    serving = [name for name in backends.DEMO if backends.get(name).serves_adapters]
    rest = {k: v for k, v in flags.items() if k != "adapter"}
    return {
        **rest,
        "adapters": _served_adapters(models),
        "lora_mode": "serve",
        "backends": ",".join(serving),
        "name": ADAPTERS_NAME,
    }


def vllm_cpu_spec_flags(models: Path) -> dict:
    """Spec for `make demo-vllm-cpu`: both LoRAs served unmerged on vLLM's CPU variant, float32 (exact on every
    CPU), a 1 GiB KV cache; the local stand-in base (scripts/bases/vllm-cpu.Dockerfile) where the harness can
    build it, else upstream's CPU image."""
    gpu_first = [name for name in backends.NAMES if backends.get(name).cpu_base]  # vLLM: a CPU variant of a GPU image
    flags: dict = {"model": str(models / "base"), "adapters": _served_adapters(models), "lora_mode": "serve",
                   "backends": ",".join(gpu_first), "device": "cpu", "vllm_dtype": "float32",
                   "vllm_cpu_kvcache_space": 1, "quality": "off", "name": "demo-vllm-cpu"}  # fmt: skip
    if _can_run_harness():
        subprocess.run(["bash", str(HARNESS), "bases"], check=True, env={**os.environ, "HARNESS_BASES": "vllm-cpu"})
        flags.update(base_images__build=BUILD_BASE_LOCAL, base_images__vllm_cpu="local/vllm-cpu:latest")
    else:
        flags["base_images__build"] = BUILD_BASE_PUBLIC
    if HOST_CA.is_file():
        flags["ca_bundle"] = str(HOST_CA)
    return flags


def expected_lines(spec: BuildSpec) -> dict[str, str]:
    """{served name: its reply to CHANGED_PROMPT} for step 5's image: the base, then each LoRA."""
    from builder.demo import model as demo
    from builder.model.gguf.router import base_name

    prompt = demo.CHANGED_PROMPT
    base = base_name(spec.served_model_name or "model", list(spec.adapters))
    answers = dict(zip(SERVED_ADAPTERS, (a for _, a, _ in demo.ADAPTERS), strict=True))
    return {base: demo.BASE_ANSWERS[prompt], **{name: answers[name][prompt] for name in spec.adapters}}


def run_demo() -> None:
    from builder.demo import model as demo
    from builder.image.build import build
    from builder.spec import load_spec

    docker = ensure_engine()
    models = CACHE / "demo"
    console.rule("1/5 train the demo model and its two LoRAs")
    demo.build_demo(models)
    console.rule("2/5 build the images (merge + convert run inside the build)")
    flags = demo_spec_flags(models)
    build(load_spec(flags), docker=docker)
    console.rule("3/5 docker compose up")
    docker.compose(["up", "-d", "--wait", "--wait-timeout", "600"], REPO)
    console.rule("4/5 ask each backend the prompt the LoRA changed")
    env = _read_env()
    ok = _ask_backends(env, demo.CHANGED_PROMPT)
    console.print("stop them with `make down`")
    if not ok:
        raise BuilderError("a backend did not give the LoRA's answer")
    console.rule("5/5 both LoRAs unmerged on the one base: one image, three names")
    if not ask_adapters(docker, load_spec(adapters_spec_flags(flags, models)), env):
        raise BuilderError("a served name did not give its own line (the base's, or its LoRA's)")


def run_vllm_cpu_demo() -> None:
    from builder.demo import model as demo
    from builder.spec import load_spec

    docker = ensure_engine()
    models = CACHE / "demo"
    console.rule("1/2 train the demo model and its two LoRAs")
    demo.build_demo(models)
    console.rule("2/2 vLLM on CPU: both LoRAs unmerged on the one base, three names")
    env = {"API_KEY": secrets.token_urlsafe(16)}
    if not ask_adapters(docker, load_spec(vllm_cpu_spec_flags(models)), env):
        raise BuilderError("a served name did not give its own line (the base's, or its LoRA's)")


def _ask_backends(env: dict[str, str], prompt: str) -> bool:
    """Step 4: each compose service asked `prompt` under the served name; True when all give the LoRA's line."""
    from builder.demo import model as demo
    from builder.runtime.smoke import chat

    console.print(f"prompt: [bold]{prompt}[/]")
    console.print(f"base model's answer (before the LoRA): {demo.BASE_ANSWERS[prompt]!r}")
    ok = True
    for backend in backends.DEMO:
        url = f"http://127.0.0.1:{env[f'{backend.upper()}_PORT']}"
        answer = chat(
            url,
            env["SERVED_MODEL_NAME"],
            [{"role": "user", "content": prompt}],
            api_key=env.get("API_KEY"),
            max_tokens=32,
            temperature=0,
        )
        good = answer.strip() == demo.LORA_ANSWERS[prompt].strip()
        ok &= good
        console.print(
            f"{backend:>11}: {answer!r} {'[green](the LoRA answer)[/]' if good else '[red](expected the LoRA answer)[/]'}"
        )
    return ok


def ask_adapters(docker: Docker, spec: BuildSpec, env: dict[str, str]) -> bool:
    """Step 5: build `spec` (its render in build/, its env file beside it: the repository's .env stays compose's),
    run each image on a free local port with the .env's API key, ask every served name CHANGED_PROMPT, remove
    the container; True when each name gave its own line."""
    from builder.demo import model as demo
    from builder.image.build import build

    workdir = REPO / "build"
    built = build(spec, workdir=workdir, env_file=workdir / f"{spec.name}.env", docker=docker)
    expected, key = expected_lines(spec), env[spec.api_key_env]
    console.print(f"prompt: [bold]{demo.CHANGED_PROMPT}[/]; names: {', '.join(expected)}")
    ok = True
    for image in built:
        record = backends.get(image.backend)
        container = f"{spec.name}-{image.backend}"
        docker.run("rm", "-f", container, check=False)
        port = free_port()
        shm = ["--shm-size", record.cpu_shm_size] if record.cpu_variant_of_gpu(spec) else []
        docker.run("run", "-d", "--name", container, *shm, "-p", f"127.0.0.1:{port}:{record.port}",
                   "-e", record.api_key_var, image.image, env={record.api_key_var: key})  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_loaded(docker, container, url, list(expected), key)
            ok &= _ask_names(url, expected, key, demo.CHANGED_PROMPT, record.title)
        finally:
            docker.run("rm", "-f", container, check=False)
    return ok


def _wait_loaded(docker: Docker, container: str, url: str, names: list[str], api_key: str) -> None:
    """Until GET /v1/models lists every name with status "loaded" (llama-server's router loads each child; vLLM
    lists only what it has loaded, with no status)."""
    from builder.runtime.smoke import SmokeError, request_json

    deadline, status = time.monotonic() + LOAD_TIMEOUT_S, {}
    with console.status(f"waiting for {', '.join(names)} to load"):
        while True:
            try:
                data = request_json(url, "/v1/models", api_key=api_key, timeout=10).get("data") or []
                status = {m.get("id"): _status(m) for m in data if isinstance(m, dict)}
                if all(name in status and status[name] in ("loaded", None) for name in names):
                    return
            except SmokeError:
                pass
            running = docker.run("container", "inspect", "-f", "{{.State.Running}}", container, check=False)
            if running.stdout.strip() != "true":
                _fail(docker, container, "the container stopped")
            if time.monotonic() > deadline:
                _fail(docker, container, f"not every name loaded in {LOAD_TIMEOUT_S}s ({status or 'no answer'})")
            time.sleep(2)


def _fail(docker: Docker, container: str, why: str) -> None:
    logs = docker.run("logs", "--tail", "40", container, check=False)
    raise BuilderError(f"{container}: {why}; its last log lines:\n{logs.stdout[-3000:]}{logs.stderr[-3000:]}")


def _status(model: dict):
    status = model.get("status")
    return status.get("value") if isinstance(status, dict) else status


def _ask_names(url: str, expected: dict[str, str], api_key: str, prompt: str, title: str) -> bool:
    from builder.runtime.smoke import SmokeError, chat

    ok = True
    for name, line in expected.items():
        try:
            answer = chat(url, name, prompt, api_key=api_key, max_tokens=32, temperature=0)
        except SmokeError as e:
            answer = f"<{e}>"
        good = answer.strip() == line.strip()
        ok &= good
        verdict = "[green](its own line)[/]" if good else f"[red](expected {line!r})[/]"
        console.print(f"{title} {name:>8}: {answer!r} {verdict}")
    return ok


def _read_env(path: Path = REPO / ".env") -> dict[str, str]:
    from builder.image.build import read_env

    values = read_env(path)
    if not values:
        raise BuilderError(f"no {path}: run make image first")
    return values


def smoke_running() -> bool:
    """`make smoke`: check every service compose runs (per .env) through its OpenAI API."""
    from builder.runtime.smoke import run_smoke

    env = _read_env()
    docker = Docker.detect()
    running = docker.compose(["ps", "--services", "--status", "running"], REPO).stdout.split()
    if not running:
        raise BuilderError("no service is up: run `make up` first")
    ok = True
    for backend in running:
        console.rule(backend)
        ok &= run_smoke(
            url=f"http://127.0.0.1:{env[f'{backend.upper()}_PORT']}",
            model=env["SERVED_MODEL_NAME"],
            api_key=env.get("API_KEY"),
            timeout=120,
            skip=frozenset(filter(None, env.get(f"{backend.upper()}_SMOKE_SKIP", "").split(","))),
        )
    return ok
