"""vLLM image builds from the local vLLM base (the real vllm==0.33.0 on CPU-only machines).

(a) the demo model (GlmForCausalLM) + LoRA: the build-time architecture check passes and the whole
    Dockerfile.vllm builds; the image carries labels, the entrypoint and the right `vllm serve` argv.
(b) a model whose config.json names an architecture vLLM 0.33 dropped: refused by the check with the
    alternatives, before any heavy step (nothing of build-env past its FROM started).

No GPU here, so the server is never started. local/vllm:latest (~9 GB) is built only when
HARNESS_BASES selects it (`make e2e-vllm`); without it this module skips.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from builder.backends.vllm import VLLM_UNSUPPORTED

REPO = Path(__file__).resolve().parents[2]
SPEC = REPO / "tests" / "e2e" / "local-bases.yaml"
VLLM_BASE = "local/vllm:latest"
NAME, BAD_NAME, TAG = "e2evllm", "e2evllm-bad", "test"
IMAGE = f"{NAME}-vllm:{TAG}"
TIMINGS: dict[str, float] = {}

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def vllm_base(local_bases) -> str:
    if "vllm" not in local_bases:
        pytest.skip(
            f"{VLLM_BASE} is absent: the ~9 GB vLLM base is built only on request "
            "(make e2e-vllm, or HARNESS_BASES=vllm scripts/harness.sh bases)"
        )
    return local_bases["vllm"]


def builder_build(
    model: Path, name: str, adapter: Path | None = None, timeout: float = 3600
) -> subprocess.CompletedProcess:
    """`python -m builder build --backend vllm` as a user runs it; the .env it writes is put back afterwards."""
    env_file = REPO / ".env"
    saved = env_file.read_bytes() if env_file.exists() else None
    argv = [
        sys.executable,
        "-m",
        "builder",
        "build",
        "--spec",
        str(SPEC),
        "--model",
        str(model),
        "--backend",
        "vllm",
        "--name",
        name,
        "--tag",
        TAG,
    ]
    if adapter:
        argv += ["--adapter", str(adapter)]
    try:
        return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    finally:
        if saved is None:
            env_file.unlink(missing_ok=True)
        else:
            env_file.write_bytes(saved)


def build_log(name: str) -> str:
    return (REPO / "build" / name / "logs" / "vllm.log").read_text()


def started_steps(log: str, stage: str) -> list[str]:
    """BuildKit plain-progress vertex names `[stage i/n] ...` that started (each is printed once it starts)."""
    return sorted(set(re.findall(rf"^#\d+ \[{re.escape(stage)} (\d+)/\d+\] (.*)$", log, flags=re.M)))


@pytest.fixture(scope="module")
def refused(vllm_base, tmp_path_factory) -> tuple[subprocess.CompletedProcess, str]:
    """Build a model folder whose architecture vLLM 0.33 dropped; only config.json matters to the check."""
    model = tmp_path_factory.mktemp("baichuan") / "tiny-baichuan"
    model.mkdir()
    (model / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["BaichuanForCausalLM"],
                "model_type": "baichuan",
                "hidden_size": 64,
                "num_attention_heads": 4,
                "num_hidden_layers": 2,
                "vocab_size": 128,
                "torch_dtype": "float32",
            }
        )
    )
    (model / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    (model / "model.safetensors").write_bytes(b"\0" * 64)  # never read: the build stops before the merge
    start = time.monotonic()
    res = builder_build(model, BAD_NAME, timeout=1200)
    TIMINGS["refusal"] = time.monotonic() - start
    return res, build_log(BAD_NAME)


@pytest.fixture(scope="module")
def built(vllm_base, demo_models, docker_cmd) -> dict:
    start = time.monotonic()
    res = builder_build(demo_models["base"], NAME, demo_models["adapter"])
    TIMINGS["vllm image build"] = time.monotonic() - start
    assert res.returncode == 0, f"builder build failed:\n{res.stdout[-4000:]}\n{res.stderr[-6000:]}"
    return json.loads(docker_cmd("image", "inspect", IMAGE).stdout)[0]


# ---- the facts builder.image.build relies on for BACKEND=auto -----------------------------------------


def test_registry_of_the_base_matches_builders_static_table(vllm_base, docker_cmd):
    probe = (
        "import json, vllm; from vllm.model_executor.models import ModelRegistry; "
        "print(json.dumps({'version': vllm.__version__, 'archs': sorted(ModelRegistry.get_supported_archs())}))"
    )
    out = docker_cmd("run", "--rm", "--network", "none", "--entrypoint", "python3", vllm_base, "-c", probe).stdout
    facts = json.loads(out.strip().splitlines()[-1])
    archs = set(facts["archs"])
    assert facts["version"].startswith("0.33.0")
    assert {"GlmForCausalLM", "ChatGLMModel", "LlamaForCausalLM"} <= archs
    assert not VLLM_UNSUPPORTED & archs, (
        f"builder.backends.VLLM_UNSUPPORTED lists archs vLLM serves: {VLLM_UNSUPPORTED & archs}"
    )


# ---- (b) refusal ----------------------------------------------------------------------------------


def test_unsupported_architecture_is_refused_with_the_alternatives(refused):
    res, log = refused
    assert res.returncode != 0, "the build of an unsupported architecture succeeded"
    out = res.stdout + res.stderr
    assert "failed in stage `arch-check`" in out, out[-3000:]
    for needle in (
        "cannot serve BaichuanForCausalLM",
        "BACKEND=xinference",
        "BACKEND=chatglmcpp",
        "newer vLLM base image",
    ):
        assert needle in out, f"{needle!r} missing from:\n{out[-3000:]}"
    assert "error: vLLM 0.33.0 cannot serve BaichuanForCausalLM" in log


def test_refusal_comes_before_any_heavy_step(refused, docker_cmd):
    _, log = refused
    build_env = started_steps(log, "build-env")
    assert all(step == "1" for step, _ in build_env), f"build-env went past its FROM: {build_env}"
    assert not started_steps(log, "model"), "the merge stage started"
    assert "pip install" not in "".join(line for line in log.splitlines() if "[build-env" in line)
    assert "Collecting torch" not in log and "Successfully installed" not in log
    assert docker_cmd("image", "inspect", f"{BAD_NAME}-vllm:{TAG}", check=False).returncode != 0, "an image was tagged"


# ---- (a) the demo model -------------------------------------------------------------------------


def test_demo_model_passes_the_check_and_builds(built, demo_models):
    log = build_log(NAME)
    checked = "vLLM 0.33.0 supports GlmForCausalLM" in log
    cached = re.search(r"^#(\d+) \[arch-check \d+/\d+\] RUN .*\n(?:#\1 .*\n)*?#\1 CACHED", log, flags=re.M)
    assert checked or cached, "the architecture check neither ran nor was cached"
    labels = built["Config"]["Labels"]
    assert labels["io.llm-builder.backend"] == "vllm"
    assert labels["io.llm-builder.base-model"] == demo_models["base"].name
    assert labels["io.llm-builder.adapter-digest"].startswith("sha256:")
    assert labels["io.llm-builder.builder-version"]
    assert labels["org.opencontainers.image.title"] == f"{demo_models['base'].name}-vllm"
    assert built["Config"]["Entrypoint"] == ["python3", "-m", "builder.runtime.vllm_boot", "serve"]
    assert built["Config"]["User"] == "10001:10001"
    assert "/health" in " ".join(built["Config"]["Healthcheck"]["Test"])
    assert "8000/tcp" in built["Config"]["ExposedPorts"]


def test_serve_argv_inside_the_image(built, demo_models, docker_cmd):
    out = docker_cmd(
        "run",
        "--rm",
        "--network",
        "none",
        "--entrypoint",
        "python3",
        "-e",
        "VLLM_EXTRA_ARGS=--max-model-len 512 --enforce-eager",
        "-e",
        "API_KEY=e2e-secret",
        IMAGE,
        "-m",
        "builder.runtime.vllm_boot",
        "serve",
        "--print",
    ).stdout
    argv = shlex.split(out.strip().splitlines()[-1])
    assert argv == [
        "vllm",
        "serve",
        "/models/model",
        "--served-model-name",
        demo_models["base"].name,
        "--host",
        "0.0.0.0",
        "--port",
        "8000",
        "--max-model-len",
        "512",
        "--enforce-eager",
    ]
    assert "e2e-secret" not in out


def test_image_contents(built, docker_cmd):
    """vllm on PATH, the merged model baked in (no adapter files), a writable ~/.cache for the compose volume."""
    volume = "e2evllm-cache-probe"
    docker_cmd("volume", "rm", "-f", volume, check=False)
    try:
        probe = docker_cmd(
            "run",
            "--rm",
            "--network",
            "none",
            "-v",
            f"{volume}:/home/app/.cache",
            "--entrypoint",
            "sh",
            IMAGE,
            "-c",
            "command -v vllm && ls /models/model && touch /home/app/.cache/ok && echo cache-ok",
        ).stdout
    finally:
        docker_cmd("volume", "rm", "-f", volume, check=False)
    assert "/vllm" in probe and "cache-ok" in probe
    assert "config.json" in probe and ".safetensors" in probe
    assert "adapter_config.json" not in probe


def test_image_adds_only_code_and_weights_to_its_base(built, refused, docker_cmd):
    """Above the vLLM base: the app user, builder's runtime code and the ~2 MB demo model (prints the timings)."""
    sizes = {img: docker_cmd("image", "inspect", "-f", "{{.Size}}", img).stdout.strip() for img in (VLLM_BASE, IMAGE)}
    assert 0 < int(sizes[IMAGE]) - int(sizes[VLLM_BASE]) < 50e6, sizes
    print(
        "\nvLLM e2e timings:",
        {k: f"{v:.0f}s" for k, v in TIMINGS.items()},
        "sizes:",
        {k: f"{int(v) / 1e9:.2f} GB" for k, v in sizes.items()},
    )
