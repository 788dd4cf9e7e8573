"""Fixtures for the end-to-end tests: a Docker engine, a local registry, local base images.

Everything under tests/e2e is marked ``e2e``; ``pytest`` alone deselects it (addopts
``-m 'not e2e'``), ``make e2e`` runs ``pytest -m e2e tests/e2e`` and calls
``scripts/harness.sh engine-down`` afterwards. The fixtures never stop the engine.

Builds must use the Debian client ``/usr/bin/docker`` with ``DOCKER_BUILDKIT=1`` (the 28.x
client first on PATH has no buildx); use :data:`DOCKER` / :func:`docker_env` for that.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HARNESS = REPO / "scripts" / "harness.sh"
DOCKER = "/usr/bin/docker" if Path("/usr/bin/docker").exists() else (shutil.which("docker") or "docker")
REGISTRY = "127.0.0.1:5000"
# Where the harness's registry keeps its blobs (scripts/harness.sh: $STATE/registry/storage).
REGISTRY_STORAGE = REPO / ".cache" / "harness" / "registry" / "storage"
PYTHON_BASE = "local/python:bookworm"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"

_E2E_DIR = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    # tryfirst: mark before the -m deselection runs.
    for item in items:
        if _E2E_DIR in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.e2e)


def docker_env() -> dict[str, str]:
    return {**os.environ, "DOCKER_BUILDKIT": "1"}


def docker(*args: str, check: bool = True, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    """Run the build-capable docker client; on failure show stdout/stderr in the test report."""
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw["env"] = {**docker_env(), **kw.get("env", {})}
    proc = subprocess.run([DOCKER, *args], timeout=timeout, **kw)
    if check and proc.returncode != 0:
        pytest.fail(
            f"docker {' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}",
            pytrace=False,
        )
    return proc


def harness(subcommand: str, timeout: float = 1800, **env: str) -> str:
    proc = subprocess.run(
        ["bash", str(HARNESS), subcommand],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        pytest.fail(
            f"scripts/harness.sh {subcommand} exited {proc.returncode}\n"
            f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}",
            pytrace=False,
        )
    return proc.stdout + proc.stderr


@pytest.fixture(scope="session")
def docker_cmd():
    """The :func:`docker` function (build-capable client, BuildKit on, fails the test with its output)."""
    return docker


@pytest.fixture(scope="session")
def harness_cmd():
    """The :func:`harness` function: ``harness_cmd("bases", HARNESS_BASES="x")`` -> combined output."""
    return harness


@pytest.fixture(scope="session")
def docker_engine() -> str:
    """A running engine (installed and started if needed). Yields the build-capable client path."""
    harness("engine-up", timeout=900)
    info = docker("info", "--format", "{{.ServerVersion}}", timeout=60)
    assert info.stdout.strip(), "docker info answered without a server version"
    return DOCKER


@pytest.fixture(scope="session")
def local_registry(docker_engine) -> str:
    """A local registry; yields its address "127.0.0.1:5000" (insecure loopback, no TLS)."""
    harness("registry-up", timeout=300)
    return REGISTRY


def registry_bytes() -> int:
    """Bytes the harness's local registry stores: every file under its storage folder (blobs, manifests, links)."""
    if not REGISTRY_STORAGE.is_dir():
        pytest.fail(
            f"{REGISTRY_STORAGE} does not exist: the registry on {REGISTRY} was not started by scripts/harness.sh"
        )
    return sum(f.stat().st_size for f in REGISTRY_STORAGE.rglob("*") if f.is_file() and not f.is_symlink())


def manifest_layers(ref: str) -> dict[str, int]:
    """{compressed layer digest: size} of an image's manifest as the registry serves it (builder push's reader)."""
    from builder.image.docker import Docker
    from builder.image.push import manifest_layers as read

    return read(Docker.detect(), ref)


@pytest.fixture(scope="session")
def local_bases(docker_engine) -> dict[str, str]:
    """Build (or reuse) the local base images; yields {"python": "local/python:bookworm", NAME: "local/NAME:latest", ...}.

    Only images that exist after ``harness.sh bases`` are included (HARNESS_BASES selects
    the scripts/bases/NAME.Dockerfile ones; vllm is skipped by default).
    """
    harness("bases", timeout=3600)
    images = {"python": PYTHON_BASE}
    for df in sorted((REPO / "scripts" / "bases").glob("*.Dockerfile")):
        name = df.name[: -len(".Dockerfile")]
        image = f"local/{name}:latest"
        if docker("image", "inspect", image, check=False, timeout=60).returncode == 0:
            images[name] = image
    for image in images.values():
        docker("image", "inspect", image, timeout=60)
    return images


@pytest.fixture(scope="session")
def demo_models() -> dict[str, Path]:
    """The embedded demo model and its two LoRAs (trained once, cached in .cache/demo)."""
    from builder.demo.model import second_adapter

    out = REPO / ".cache" / "demo"
    subprocess.run([sys.executable, "-m", "builder", "demo-model", "--out", str(out)], check=True, cwd=REPO)
    return {"base": out / "base", "adapter": out / "adapter", "second": second_adapter(out)}


def smoke_argv(container: str, port: int, model: str, api_key: str, skip=()) -> list[str]:
    """`docker` arguments that run the smoke client inside `container`'s network namespace, from a
    side container holding builder's runtime code: works for every image, those without Python
    (llama.cpp) and those started with --network none included."""
    runtime = REPO / "builder" / "runtime"
    argv = ["run", "--rm", "--network", f"container:{container}", "-v", f"{runtime}:/opt/app/builder/runtime:ro"]
    argv += ["-v", f"{REPO / 'builder' / '__init__.py'}:/opt/app/builder/__init__.py:ro", "-e", "PYTHONPATH=/opt/app"]
    argv += [PYTHON_BASE, "python3", "-m", "builder.runtime.smoke", "--url", f"http://127.0.0.1:{port}"]
    return argv + ["--model", model, "--api-key", api_key, *(f"--skip={gap}" for gap in sorted(skip))]
