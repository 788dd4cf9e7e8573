"""`make demo` and `make smoke`: the whole pipeline on the embedded demo model, and API checks.

The demo trains the tiny GLM and its LoRA (builder/demo/model.py), builds the images of every
backend the registry marks `demo` from them with `builder build`, starts them with compose and asks each backend the prompt
the LoRA changed: the LoRA's answer coming back proves merge and conversion carried it through.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from rich.console import Console

from builder import backends
from builder.errors import BuilderError
from builder.image.docker import Docker

REPO = Path(__file__).resolve().parents[2]
HARNESS = REPO / "scripts" / "harness.sh"
CACHE = REPO / ".cache"
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
WHEELHOUSE = CACHE / "wheelhouse"
console = Console(stderr=True)

# The build stage's bases (each backend's come from its record's `demo`): a local stand-in where the
# harness can make one, else a small public image (the defaults target real GPU hosts).
BUILD_BASE_LOCAL, BUILD_BASE_PUBLIC = "local/python:bookworm", "python:3.11-slim-bookworm"


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


def run_demo() -> None:
    from builder.demo import model as demo
    from builder.image.build import build
    from builder.runtime.smoke import chat
    from builder.spec import load_spec

    docker = ensure_engine()
    models = CACHE / "demo"
    console.rule("1/4 train the demo model and its LoRA")
    demo.build_demo(models)
    console.rule("2/4 build the images (merge + convert run inside the build)")
    spec = load_spec(demo_spec_flags(models))
    build(spec, docker=docker)
    console.rule("3/4 docker compose up")
    docker.compose(["up", "-d", "--wait", "--wait-timeout", "600"], REPO)
    console.rule("4/4 ask each backend the prompt the LoRA changed")
    env = _read_env()
    prompt = demo.CHANGED_PROMPT
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
    console.print("stop them with `make down`")
    if not ok:
        raise BuilderError("a backend did not give the LoRA's answer")


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
