"""What vLLM's GPU run needs, asserted from the rendered Dockerfile.vllm, compose.yaml, k8s
manifests and the vLLM docs page, without a GPU or Docker. The architecture check's decisions are in
tests/runtime/test_vllm_boot.py, and against the real pinned vLLM in tests/e2e/test_vllm.py.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from builder import backends, cli
from builder.image import k8s
from builder.image.render import HOME, render_text
from builder.runtime import vllm_boot
from builder.spec import BuildSpec

ROOT = Path(__file__).resolve().parents[2]
B = backends.get("vllm")

# The VLLM_* names vLLM 0.33.0 itself reads (vllm/envs.py: VLLM_CACHE_ROOT :714, VLLM_API_KEY :829,
# VLLM_NO_USAGE_STATS :842); any other VLLM_* name makes it warn "Unknown vLLM environment variable"
# (platforms/interface.py:1458-1471), or fail under --fail-on-environ-validation.
VLLMS_OWN = {"VLLM_CACHE_ROOT", "VLLM_API_KEY", "VLLM_NO_USAGE_STATS"}


def runtime_env(dockerfile: str) -> dict[str, str]:
    """The runtime stage's ENV (after its last FROM), as a shell would read it."""
    runtime = dockerfile[dockerfile.rindex("\nFROM ") :]
    joined = re.sub(r"\\\n\s*", " ", runtime)
    env: dict[str, str] = {}
    for line in joined.splitlines():
        if line.startswith("ENV "):
            for word in shlex.split(line[4:]):
                name, _, value = word.partition("=")
                env[name] = value
    return env


def vllm_files(spec: BuildSpec) -> tuple[str, dict, dict]:
    """(Dockerfile.vllm, compose's vllm service, the k8s vllm container)."""
    texts = render_text(spec)
    compose = yaml.safe_load(texts["compose.yaml"])["services"]["vllm"]
    deploy = yaml.safe_load(k8s.render_k8s_text(spec, ["vllm"])["vllm/deployment.yaml"])
    return texts["Dockerfile.vllm"], compose, deploy["spec"]["template"]["spec"]


def test_committed_files_are_the_default_render():
    texts = render_text(BuildSpec())
    assert (ROOT / "Dockerfile.vllm").read_text() == texts["Dockerfile.vllm"]
    assert (ROOT / "compose.yaml").read_text() == texts["compose.yaml"]
    assert (ROOT / "k8s/vllm/deployment.yaml").read_text() == k8s.render_k8s_text(BuildSpec())["vllm/deployment.yaml"]


# ---- 1. --max-model-len from the spec, default auto -------------------------------------------------


def test_max_model_len_defaults_to_auto_and_reaches_vllm_serve():
    dockerfile, compose, pod = vllm_files(BuildSpec())
    env = runtime_env(dockerfile)
    assert env["LLM_MAX_MODEL_LEN"] == "auto"
    argv = vllm_boot.serve_argv(env)
    assert argv[argv.index("--max-model-len") + 1] == "auto"
    assert compose["environment"]["LLM_MAX_MODEL_LEN"] == "${LLM_MAX_MODEL_LEN:-auto}"
    container = pod["containers"][0]
    assert {"name": "LLM_MAX_MODEL_LEN", "value": "auto"} in container["env"]


def test_max_model_len_from_the_spec_and_the_flag():
    dockerfile, compose, pod = vllm_files(BuildSpec(vllm_max_model_len="32k"))
    assert runtime_env(dockerfile)["LLM_MAX_MODEL_LEN"] == "32k"
    assert compose["environment"]["LLM_MAX_MODEL_LEN"] == "${LLM_MAX_MODEL_LEN:-32k}"
    assert {"name": "LLM_MAX_MODEL_LEN", "value": "32k"} in pod["containers"][0]["env"]
    assert any(flag == "--vllm-max-model-len" for flag, *_ in cli.SPEC_OPTIONS)


@pytest.mark.parametrize("good", ["auto", "-1", "4096", "25.6k", "32K", "1m"])
def test_max_model_len_takes_what_vllm_parses(good):
    assert BuildSpec(vllm_max_model_len=good).vllm_max_model_len == good


@pytest.mark.parametrize("bad", ["", "lots", "0", "4096 tokens", "-2", "4k;rm"])
def test_max_model_len_refuses_the_rest(bad):
    with pytest.raises(ValidationError, match="vllm_max_model_len"):
        BuildSpec(vllm_max_model_len=bad)


# ---- 2. the host driver the pinned image needs ---------------------------------------------------------


def test_docs_state_the_driver_the_pinned_vllm_needs():
    assert B.base_image == "vllm/vllm-openai:v0.33.0"  # the vLLM page's statement is about this pin
    page = (ROOT / "docs" / "vllm.md").read_text()
    section = page[page.index("## GPU and driver") :]
    section = " ".join(section[: section.index("\n#", 1)].split())
    for fact in ("CUDA 13.0", "580", "torch==2.14.0", "libcudart.so.13", "compute capability 7.5"):
        assert fact in section, fact


# ---- 3. Kubernetes: startup budget for compile + load, caches that survive a restart ------------------


def test_k8s_startup_probe_allows_compile_and_load():
    _, compose, pod = vllm_files(BuildSpec())
    startup = pod["containers"][0]["startupProbe"]
    budget = k8s.seconds(B.startup_period())
    assert B.startup_budget and budget >= 1200  # 20 min: first start = load + torch.compile + CUDA graphs
    assert startup["periodSeconds"] * startup["failureThreshold"] >= budget
    assert compose["healthcheck"]["start_period"] == B.startup_budget


def test_k8s_compile_caches_live_on_a_volume_that_survives_container_restarts():
    dockerfile, compose, pod = vllm_files(BuildSpec())
    env = runtime_env(dockerfile)
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    home = volumes[mounts[HOME]]
    assert "emptyDir" in home  # lives as long as the pod: a container restart (probe, crash) keeps it
    assert env["VLLM_CACHE_ROOT"].startswith(HOME + "/")
    readme = (ROOT / "k8s" / "README.md").read_text()
    assert "survives a container restart" in readme and "PersistentVolumeClaim" in readme


# ---- 4. HOME and every cache under it ---------------------------------------------------------------


def test_home_and_the_caches_are_set_in_the_image():
    dockerfile, compose, _ = vllm_files(BuildSpec())
    env = runtime_env(dockerfile)
    assert env["HOME"] == HOME
    cache = f"{HOME}/.cache"
    assert B.cache_volume == cache and f"vllm-cache:{cache}" in compose["volumes"]
    for var in ("XDG_CACHE_HOME", "VLLM_CACHE_ROOT", "TRITON_HOME", "CUDA_CACHE_PATH", "HF_HOME"):
        assert env[var] == cache or env[var].startswith(cache + "/"), var
    assert f"mkdir -p {cache}" in dockerfile


# ---- 5. the architecture check asks for text generation (and LoRA when asked) ----------------------


def test_the_arch_check_stage_runs_the_full_check():
    dockerfile, _, _ = vllm_files(BuildSpec())
    stage = dockerfile[dockerfile.index("AS arch-check") : dockerfile.index("AS build-env")]
    assert 'ARG LORA_RANK=""' in stage and '--lora-rank "$LORA_RANK"' in stage
    assert "vllm_boot.py check" in stage
    assert "TransformersModel" not in (ROOT / "builder/runtime/vllm_boot.py").read_text().replace(
        "no `TransformersModel`", ""
    )


# ---- 6. no VLLM_* names of ours -----------------------------------------------------------------------


def test_our_variables_are_out_of_vllms_namespace():
    dockerfile, compose, pod = vllm_files(BuildSpec())
    names = (
        set(runtime_env(dockerfile)) | set(compose["environment"]) | {e["name"] for e in pod["containers"][0]["env"]}
    )
    assert {n for n in names if n.startswith("VLLM_")} <= VLLMS_OWN
    assert {"LLM_MODEL_PATH", "LLM_TRUST_REMOTE_CODE", "LLM_EXTRA_ARGS", "LLM_MAX_MODEL_LEN"} <= names
    assert B.passthrough_env == ("LLM_EXTRA_ARGS",)
    assert set(vllm_boot.RENAMED_ENV) == {"VLLM_MODEL_PATH", "VLLM_TRUST_REMOTE_CODE", "VLLM_EXTRA_ARGS"}


# ---- 7. the chat template ------------------------------------------------------------------------------


def test_the_build_checks_the_chat_template_and_the_docs_say_how_to_give_one():
    dockerfile, _, _ = vllm_files(BuildSpec())
    stage = dockerfile[dockerfile.index("FROM build-env AS chat-template") :]
    assert "python3 -m builder.runtime.vllm_boot chat-template /w/models/model" in stage
    # the runtime's weights come from that stage, so the check is never skipped
    assert "COPY --from=chat-template /w/ /" in dockerfile[dockerfile.index(" AS runtime") :]
    page = (ROOT / "docs" / "vllm.md").read_text()
    section = page[page.index("## A model without a chat template") :]
    assert "--chat-template" in section and "LLM_EXTRA_ARGS" in section
