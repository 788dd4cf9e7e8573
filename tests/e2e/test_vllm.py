"""vLLM image builds from the local vLLM base (the real vllm==0.33.0 on CPU-only machines).

(a) the demo model (GlmForCausalLM) + LoRA merged (LORA=merge): the build-time architecture check passes and the whole
    Dockerfile.vllm builds; the image carries labels, the entrypoint and the right `vllm serve` argv.
(b) a model whose config.json names an architecture vLLM 0.33 dropped: refused by the check with the
    alternatives, before any heavy step (nothing of build-env past its FROM started).
(c) an embedding model (BertModel, in vLLM's registry as a pooling model): refused with what vLLM would
    do with it; the registry facts the check reads (`_ModelInfo.is_text_generation_model`,
    `is_pooling_model`, `supports_lora`) for Llama, GLM and an embedding model, from the real vLLM.

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
NAME, BAD_NAME, EMBED_NAME, LORA_NAME, TAG = "e2evllm", "e2evllm-bad", "e2evllm-embed", "e2evllm-lora", "test"
IMAGE, LORA_IMAGE = f"{NAME}-vllm:{TAG}", f"{LORA_NAME}-vllm:{TAG}"
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
    model: Path, name: str, adapter: Path | None = None, timeout: float = 3600, lora: str = "merge"
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
        argv += ["--adapter", str(adapter), "--lora", lora]
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
def refused_embedding(vllm_base, tmp_path_factory) -> tuple[subprocess.CompletedProcess, str]:
    """An embedding model: vLLM knows BertModel, as a pooling model (no chat or completions)."""
    model = tmp_path_factory.mktemp("bert") / "tiny-bert"
    model.mkdir()
    config = {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "vocab_size": 128,
        "torch_dtype": "float32",
    }
    (model / "config.json").write_text(json.dumps(config))
    (model / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    (model / "model.safetensors").write_bytes(b"\0" * 64)  # never read: the build stops at the check
    res = builder_build(model, EMBED_NAME, timeout=1200)
    return res, build_log(EMBED_NAME)


@pytest.fixture(scope="module")
def built(vllm_base, demo_models, docker_cmd) -> dict:
    start = time.monotonic()
    res = builder_build(demo_models["base"], NAME, demo_models["adapter"])
    TIMINGS["vllm image build"] = time.monotonic() - start
    assert res.returncode == 0, f"builder build failed:\n{res.stdout[-4000:]}\n{res.stderr[-6000:]}"
    return json.loads(docker_cmd("image", "inspect", IMAGE).stdout)[0]


@pytest.fixture(scope="module")
def served_lora(vllm_base, demo_models, docker_cmd) -> dict:
    """The demo LoRA served unmerged (LORA=serve): the base as it is, the adapter a layer of its own."""
    res = builder_build(demo_models["base"], LORA_NAME, demo_models["adapter"], lora="serve")
    assert res.returncode == 0, f"builder build failed:\n{res.stdout[-4000:]}\n{res.stderr[-6000:]}"
    return json.loads(docker_cmd("image", "inspect", LORA_IMAGE).stdout)[0]


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


# What builder.runtime.vllm_boot reads from the real registry (ModelRegistry.models[arch].inspect_model_cls(),
# vllm/model_executor/models/registry.py), and what it decides, for each architecture.
REGISTRY_PROBE = """
import json, dataclasses
from builder.runtime import vllm_boot
out = {}
for arch in ("BertModel", "LlamaForCausalLM", "GlmForCausalLM", "ChatGLMModel", "Qwen2ForRewardModel"):
    info = vllm_boot.inspect_architecture(arch, arch)
    out[arch] = {**dataclasses.asdict(info), "refusals": vllm_boot.serving_refusals(info, lora_rank=16)}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def registry_facts(vllm_base, docker_cmd) -> dict[str, dict]:
    """The check's functions run inside the vLLM base against its real registry (the repo's runtime code
    mounted read-only; the registry inspects each class in a subprocess, no GPU needed)."""
    out = docker_cmd(
        "run", "--rm", "--network", "none", "-v", f"{REPO / 'builder'}:/opt/app/builder:ro",
        "-e", "PYTHONPATH=/opt/app", "-e", "PYTHONDONTWRITEBYTECODE=1", "--entrypoint", "python3",
        vllm_base, "-c", REGISTRY_PROBE, timeout=900,
    ).stdout  # fmt: skip
    facts = json.loads(out.strip().splitlines()[-1])
    print("\nvLLM registry facts:", json.dumps(facts, indent=1))
    return facts


def test_registry_says_llama_and_glm_generate_text_and_take_lora(registry_facts):
    for arch, cls in (
        ("LlamaForCausalLM", "LlamaForCausalLM"),  # model_executor/models/llama.py: SupportsLoRA
        ("GlmForCausalLM", "TransformersForCausalLM"),  # registry.py _TRANSFORMERS_SUPPORTED_MODELS
        ("ChatGLMModel", "ChatGLMForCausalLM"),  # model_executor/models/chatglm.py: SupportsLoRA
    ):
        info = registry_facts[arch]
        assert info["model_class"] == cls, info
        assert info["is_text_generation_model"] and not info["is_pooling_model"], info
        assert info["supports_lora"] is True, info
        assert info["refusals"] == [], info


def test_registry_refuses_pooling_models_with_what_vllm_would_do(registry_facts):
    bert = registry_facts["BertModel"]
    assert bert["model_class"] == "BertEmbeddingModel" and bert["is_pooling_model"], bert
    (reason,) = [r for r in bert["refusals"] if "text-generation" in r]
    assert "pooling model computing embeddings" in reason and "no /v1/chat/completions" in reason
    reward = registry_facts["Qwen2ForRewardModel"]
    assert reward["is_pooling_model"] and any("reward scores" in r for r in reward["refusals"]), reward


def test_embedding_model_is_refused_by_the_build_with_its_reason(refused_embedding, docker_cmd):
    res, log = refused_embedding
    assert res.returncode != 0, "the build of an embedding model succeeded"
    out = res.stdout + res.stderr
    assert "failed in stage `arch-check`" in out, out[-3000:]
    assert "error: vLLM 0.33.0 cannot serve BertModel: BertModel (vLLM class BertEmbeddingModel)" in log
    assert "pooling model computing embeddings" in log and "no /v1/chat/completions" in log
    assert not started_steps(log, "model"), "the merge stage started"
    assert docker_cmd("image", "inspect", f"{EMBED_NAME}-vllm:{TAG}", check=False).returncode != 0


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
    assert "could not inspect" not in log, "vLLM's registry could not inspect the demo's class: the check was skipped"
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
    def serve_print(*env: str) -> subprocess.CompletedProcess:
        argv = ["run", "--rm", "--network", "none", "--entrypoint", "python3"]
        for e in env:
            argv += ["-e", e]
        return docker_cmd(*argv, IMAGE, "-m", "builder.runtime.vllm_boot", "serve", "--print")

    res = serve_print("LLM_EXTRA_ARGS=--max-model-len 512 --enforce-eager", "API_KEY=e2e-secret")
    argv = shlex.split(res.stdout.strip().splitlines()[-1])
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
        "auto",  # the image's LLM_MAX_MODEL_LEN (spec vllm_max_model_len) ...
        "--middleware",
        "builder.runtime.vllm_limits.RequestLimits",
        "--max-logprobs",
        "20",
        "--override-generation-config",
        '{"max_new_tokens": 4096}',
        "--max-model-len",
        "512",  # ... and LLM_EXTRA_ARGS last, which vLLM's parser lets win
        "--enforce-eager",
    ]
    assert "e2e-secret" not in res.stdout
    old = serve_print("VLLM_EXTRA_ARGS=--enforce-eager")  # the old name: still read, with a warning
    assert shlex.split(old.stdout.strip().splitlines()[-1])[-1] == "--enforce-eager"
    assert "warning: VLLM_EXTRA_ARGS is renamed LLM_EXTRA_ARGS" in old.stderr


def test_image_env_home_and_caches(built):
    env = dict(e.split("=", 1) for e in built["Config"]["Env"])
    assert env["HOME"] == "/home/app" and env["VLLM_CACHE_ROOT"] == "/home/app/.cache/vllm"
    assert env["LLM_MAX_MODEL_LEN"] == "auto" and env["LLM_MODEL_PATH"] == "/models/model"
    assert not {k for k in env if k.startswith("VLLM_")} - {"VLLM_CACHE_ROOT", "VLLM_NO_USAGE_STATS"}


def test_demo_model_has_a_chat_template(built):
    log = build_log(NAME)
    assert "warning: the model has no chat template" not in log
    cached = re.search(r"^#(\d+) \[chat-template \d+/\d+\] RUN .*\n(?:#\1 .*\n)*?#\1 CACHED", log, flags=re.M)
    assert "chat template: " in log or cached, "the chat-template check neither ran nor was cached"


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


# ---- the demo LoRA served unmerged on vLLM ------------------------------------------------------


def test_served_lora_image_passes_the_lora_check_and_sets_the_lora_env(served_lora, demo_models):
    log = build_log(LORA_NAME)
    cached = re.search(r"^#(\d+) \[arch-check \d+/\d+\] RUN .*\n(?:#\1 .*\n)*?#\1 CACHED", log, flags=re.M)
    assert "LoRA: supported; serve with --enable-lora --max-lora-rank 8" in log or cached, log[-3000:]
    name = demo_models["base"].name  # one unnamed adapter takes the model's name; the base is NAME-base
    env = dict(e.split("=", 1) for e in served_lora["Config"]["Env"])
    assert env["LLM_LORA_MODULES"] == f"{name}=/models/lora/{name}" and env["LLM_MAX_LORAS"] == "1"
    assert env["LLM_MAX_LORA_RANK"] == "8"


def test_served_lora_argv_and_files_inside_the_image(served_lora, demo_models, docker_cmd):
    name = demo_models["base"].name
    res = docker_cmd("run", "--rm", "--network", "none", "--entrypoint", "python3", LORA_IMAGE,
                     "-m", "builder.runtime.vllm_boot", "serve", "--print")  # fmt: skip
    argv = shlex.split(res.stdout.strip().splitlines()[-1])
    assert argv[argv.index("--served-model-name") + 1] == f"{name}-base"
    tail = argv[argv.index("--enable-lora") :]
    assert tail[:7] == ["--enable-lora", "--lora-modules", f"{name}=/models/lora/{name}",
                        "--max-loras", "1", "--max-lora-rank", "8"]  # fmt: skip
    files = docker_cmd("run", "--rm", "--network", "none", "--entrypoint", "sh", LORA_IMAGE, "-c",
                       f"ls /models/model; echo ==; ls /models/lora/{name}").stdout  # fmt: skip
    model, lora = files.split("==")
    assert "config.json" in model and "adapter_config.json" not in model  # the base, unmerged
    assert "adapter_config.json" in lora and "adapter_model.safetensors" in lora
