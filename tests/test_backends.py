"""The backend registry is the one place a backend is described: spec, render, compose, build args and
smoke all follow it, so they cannot drift apart."""

from __future__ import annotations

import json

import pytest
import yaml

from builder import backends
from builder.image.build import build_args
from builder.image.render import TEMPLATES, outputs, render_text
from builder.spec import BaseImages, BuildSpec, Ports

RECORDS = list(backends.REGISTRY.values())


def test_every_backend_has_a_template_and_an_output():
    found = outputs(BuildSpec())
    for b in RECORDS:
        assert (TEMPLATES / b.template).is_file(), b.template
        assert b.dockerfile in found
    topologies = {f"compose.{t.name}.yaml" for b in RECORDS for t in b.topologies}
    assert topologies == {"compose.xinference-cluster.yaml"}
    assert set(found) == {b.dockerfile for b in RECORDS} | {"compose.yaml"} | topologies


def test_spec_fields_come_from_the_registry():
    assert set(Ports.model_fields) == set(backends.NAMES)
    assert {n for n in BaseImages.model_fields if n != "build"} == set(backends.NAMES) | {
        f"{b.name}_cuda" for b in RECORDS if b.cuda_base
    } | {f"{b.name}_cpu" for b in RECORDS if b.cpu_base}
    spec = BuildSpec()
    for b in RECORDS:
        assert getattr(spec.ports, b.name) == b.port
        assert spec.runtime_base(b.name) == b.base_image
        if b.cuda_base:
            assert BuildSpec(cuda=True).runtime_base(b.name) == b.cuda_base
            assert BuildSpec(device="cuda").runtime_base(b.name) == b.cuda_base
        if b.cpu_base:
            assert BuildSpec(device="cpu").runtime_base(b.name) == b.cpu_base
        elif not b.gpu:  # a CPU backend's CPU variant is its default
            assert BuildSpec(device="cpu").runtime_base(b.name) == b.base_image


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda"])
def test_compose_reserves_a_gpu_exactly_for_the_cuda_variants(device):
    spec = BuildSpec(device=device)
    services = yaml.safe_load(render_text(spec)["compose.yaml"])["services"]
    for b in RECORDS:
        service = services[b.name]
        assert ("deploy" in service) == b.uses_cuda(spec), (device, b.name)
        cpu_engine = b.cpu_variant_of_gpu(spec)  # vLLM on CPU: shm, read-only root, no capabilities
        assert ("shm_size" in service) == cpu_engine and ("ipc" in service) == (b.gpu and not cpu_engine)
        if cpu_engine:
            assert service["read_only"] is True and service["cap_drop"] == ["ALL"] and service["tmpfs"] == ["/tmp"]
            assert "no-new-privileges:true" in service["security_opt"]


@pytest.mark.parametrize("b", RECORDS, ids=lambda b: b.name)
def test_dockerfile_follows_the_record(b):
    text = render_text(BuildSpec())[b.dockerfile]
    assert f"ARG {b.base_arg}={b.base_image}" in text
    assert f"FROM ${{{b.base_arg}}} AS runtime" in text
    assert f"EXPOSE {b.port}\n" in text
    h = b.healthcheck
    assert (f"HEALTHCHECK --interval={h.interval} --timeout={h.timeout} --start-period={h.start_period} "
            f"--retries={h.retries}") in text  # fmt: skip
    assert f"CMD {json.dumps(list(h.test))}" in text


@pytest.mark.parametrize("b", RECORDS, ids=lambda b: b.name)
def test_compose_service_follows_the_record(b):
    service = yaml.safe_load(render_text(BuildSpec())["compose.yaml"])["services"][b.name]
    assert service["profiles"] == [b.name]
    assert service["ports"] == [f"127.0.0.1:${{{b.name.upper()}_PORT:-{b.port}}}:{b.port}"]
    assert service["healthcheck"]["test"] == ["CMD", *b.healthcheck.test]
    assert service["environment"][b.api_key_var] == "${API_KEY:-}"
    assert ("deploy" in service) == b.gpu
    assert ("volumes" in service) == bool(b.cache_volume)


def test_build_args_name_the_record_base_arg():
    spec = BuildSpec(model="org/x", quant="q8_0")
    for b in RECORDS:
        args = build_args(spec, b.name)
        assert args[b.base_arg] == b.base_image
        assert args["QUANT"] == ("q8_0" if b.quant_types(spec) else "")
        assert ("LLAMACPP_BASE" in args) == b.serves_gguf(spec)


def test_unset_quant_takes_each_format_default():
    """GGUF q4_k_m, chatglm.cpp's GGML q8_0 (measured, docs/quality.md); merged-weight images none; QUANT wins."""
    spec = BuildSpec(model="org/x")
    expected = {"llamacpp": "q4_k_m", "xinference": "q4_k_m", "chatglmcpp": "q8_0", "vllm": None}
    assert {name: backends.get(name).quant_for(spec) for name in expected} == expected
    assert build_args(spec, "chatglmcpp")["QUANT"] == "q8_0" and build_args(spec, "vllm")["QUANT"] == ""
    text = render_text(spec)
    assert "ARG QUANT=q4_k_m" in text["Dockerfile.llamacpp"] and "ARG QUANT=q8_0" in text["Dockerfile.chatglmcpp"]
    assert backends.get("chatglmcpp").quant_for(BuildSpec(model="org/x", quant="q4_0")) == "q4_0"
    assert backends.get("xinference").quant_for(BuildSpec(model="org/x", xinference_engine="transformers")) is None


def test_gguf_backends_share_the_llamacpp_build():
    """llama.cpp, and Xinference on its llama.cpp engine, quantize GGUF and compile on the llama.cpp base."""
    spec = BuildSpec(model="org/x", quant="q4_k_m")
    for name in ("llamacpp", "xinference"):
        assert build_args(spec, name)["LLAMACPP_BASE"] == "debian:bookworm-slim"
        assert build_args(spec, name)["QUANT"] == "q4_k_m"
        text = render_text(spec)[f"Dockerfile.{name}"]
        assert "FROM ${LLAMACPP_BASE} AS llamacpp-build" in text and "'-DGGML_CPU_ALL_VARIANTS=ON'" in text
    other = BuildSpec(model="org/x", xinference_engine="transformers")
    assert "LLAMACPP_BASE" not in build_args(other, "xinference") and build_args(other, "xinference")["QUANT"] == ""
    assert "llamacpp-build" not in render_text(other)["Dockerfile.xinference"]
    quick = render_text(BuildSpec(llamacpp_cpu="avx2"))["Dockerfile.llamacpp"]
    assert "'-DGGML_AVX2=ON'" in quick and "ALL_VARIANTS" not in quick and "BACKEND_DL" not in quick
    cuda = render_text(BuildSpec(cuda=True, cuda_architectures="86;90"))["Dockerfile.llamacpp"]
    assert "FROM ${BUILD_BASE} AS llamacpp-build" in cuda and "'-DCMAKE_CUDA_ARCHITECTURES=86;90'" in cuda


def test_llamacpp_tunables_reach_image_and_compose():
    b = backends.get("llamacpp")
    text = render_text(BuildSpec())
    service = yaml.safe_load(text["compose.yaml"])["services"]["llamacpp"]
    for name, value in b.tunables:
        assert f"    {name}={value} \\\n" in text["Dockerfile.llamacpp"]
        assert service["environment"][name] == f"${{{name}:-{value}}}"
    assert 'ENTRYPOINT ["/opt/llama.cpp/llama-server"]' in text["Dockerfile.llamacpp"]
    runtime = text["Dockerfile.llamacpp"].split(" AS runtime", 1)[1]
    # nothing but llama.cpp's binaries and the GGUF: no builder code, no pip, no apt, no compiler
    assert "src/builder" not in runtime and "pip" not in runtime and "apt-get" not in runtime
    assert runtime.count("COPY --from=") == 2


def test_xllamacpp_pin_is_the_makefiles():
    from pathlib import Path

    mk = (Path(__file__).resolve().parents[1] / "mk" / "xllamacpp.mk").read_text()
    assert f"XLLAMACPP_VERSION := {backends.get('xinference').template_values['xllamacpp_version']}\n" in mk


FIFTH_RECORD = """
from typing import Literal

from pydantic import Field

from builder.backends import Backend, Healthcheck, NoOptions, http_probe


class FifthOptions(NoOptions):
    threads: Literal["1", "2", "4"] = Field("2", description="server threads")


BACKEND = Backend(
    name="fifth",
    title="Fifth",
    description="a test backend added from outside the checkout",
    base_image="python:3.12-slim",
    base_arg="FIFTH_BASE",
    port=8555,
    health_path="/health",
    healthcheck=Healthcheck(http_probe(8555, "/health"), "2s", "5s", 3, "30s"),
    api_key_var="FIFTH_API_KEY",
    options=FifthOptions,
    runtime_modules=("smoke.py",),
)
"""
FIFTH_TEMPLATE = """{% extends "_runtime.Dockerfile.j2" %}
{% block about %}
# Fifth runtime, threads {{ spec.fifth_threads }}.
{% endblock %}
{% block runtime %}
{{ m.runtime_code(backend.runtime_modules) }}
{% endblock %}
{% block weights %}
{{ m.weights("model", "/out/model", "/models/model") }}
{% endblock %}
{% block entrypoint %}
ENTRYPOINT ["python3", "-m", "builder.runtime.smoke"]
{% endblock %}
"""
FIFTH_CHECKS = """
import json, sys
from pathlib import Path
import yaml
from builder.cli import SPEC_OPTIONS
from builder.image.build import build_args, write_env
from builder.image.k8s import render_k8s_text
from builder.image.render import render_text
from builder.spec import load_spec

out = Path(sys.argv[1])
spec = load_spec({"model": "org/x", "backends": "fifth,llamacpp", "fifth_threads": "4"}, resolve=False)
files = render_text(spec)
service = yaml.safe_load(files["compose.yaml"])["services"]["fifth"]
write_env(spec, ["fifth", "llamacpp"], out / ".env")
k8s = render_k8s_text(spec)
print(json.dumps({
    "dockerfile": files["Dockerfile.fifth"],
    "service": service,
    "env": (out / ".env").read_text(),
    "k8s": sorted(k8s),
    "deployment": k8s["fifth/deployment.yaml"],
    "build_args": build_args(spec, "fifth"),
    "flags": [flag for flag, *_ in SPEC_OPTIONS],
}))
"""


def test_a_fifth_backend_is_a_record_and_a_template(tmp_path):
    """A backend added from outside the checkout ($BUILDER_BACKENDS_PATH: one record, one template) gets its
    Dockerfile, compose service, .env entries, build args, option flag and k8s base, and no file of the
    checkout changes."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "fifth.py").write_text(FIFTH_RECORD)
    (plugins / "fifth.Dockerfile.j2").write_text(FIFTH_TEMPLATE)
    before = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True).stdout
    env = {"PATH": "/usr/bin:/bin", "BUILDER_BACKENDS_PATH": str(plugins), "PYTHONPATH": str(root)}
    res = subprocess.run([sys.executable, "-c", FIFTH_CHECKS, str(tmp_path)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert "# Fifth runtime, threads 4." in got["dockerfile"]
    assert (
        "ARG FIFTH_BASE=python:3.12-slim" in got["dockerfile"] and "FROM ${FIFTH_BASE} AS runtime" in got["dockerfile"]
    )
    assert "EXPOSE 8555" in got["dockerfile"] and "USER 10001:10001" in got["dockerfile"]
    assert got["service"]["profiles"] == ["fifth"] and got["service"]["environment"]["FIFTH_API_KEY"] == "${API_KEY:-}"
    assert got["service"]["ports"] == ["127.0.0.1:${FIFTH_PORT:-8555}:8555"]
    for line in (
        "COMPOSE_PROFILES=fifth,llamacpp",
        "FIFTH_IMAGE=llm-fifth:latest",
        "FIFTH_PORT=8555",
        "FIFTH_SMOKE_SKIP=",
    ):
        assert f"\n{line}\n" in got["env"], got["env"]
    assert {"fifth/deployment.yaml", "fifth/service.yaml", "fifth/kustomization.yaml"} <= set(got["k8s"])
    assert "name: FIFTH_API_KEY" in got["deployment"] and "containerPort: 8555" in got["deployment"]
    assert got["build_args"]["FIFTH_BASE"] == "python:3.12-slim"
    assert "--fifth-threads" in got["flags"] and "--fifth-base" in got["flags"]
    after = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True).stdout
    assert after == before
