"""The backend registry is the one place a backend is described: spec, render, compose, build args and
smoke all follow it, so they cannot drift apart."""

from __future__ import annotations

import json

import pytest
import yaml

from builder import backends
from builder.image.build import build_args, resolve_backends
from builder.image.render import OUTPUTS, TEMPLATES, render_text
from builder.spec import BaseImages, BuildSpec, Ports

RECORDS = list(backends.REGISTRY.values())


def test_every_backend_has_a_template_and_an_output():
    for b in RECORDS:
        assert (TEMPLATES / b.template).is_file(), b.template
        assert b.dockerfile in OUTPUTS
    assert set(OUTPUTS) == {b.dockerfile for b in RECORDS} | {"compose.yaml", "compose.xinference-cluster.yaml"}


def test_spec_fields_come_from_the_registry():
    assert set(Ports.model_fields) == set(backends.NAMES)
    assert {n for n in BaseImages.model_fields if n != "build"} == set(backends.NAMES) | {
        f"{b.name}_cuda" for b in RECORDS if b.cuda_base
    }
    spec = BuildSpec()
    for b in RECORDS:
        assert getattr(spec.ports, b.name) == b.port
        assert spec.runtime_base(b.name) == b.base_image
        if b.cuda_base:
            assert BuildSpec(cuda=True).runtime_base(b.name) == b.cuda_base


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


def test_auto_picks_llamacpp_for_any_registered_architecture():
    spec = BuildSpec(model="org/x", quant="q4_k_m")
    llama = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    assert resolve_backends(spec, llama) == ["vllm", "llamacpp", "xinference"]
    glm = {"architectures": ["GlmForCausalLM"], "model_type": "glm", "num_hidden_layers": 2, "hidden_size": 128,
           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "intermediate_size": 256,
           "vocab_size": 300}  # fmt: skip
    with pytest.raises(Exception, match=r"QUANT=q4_k_m: chatglm.cpp cannot produce it .*BACKEND=llamacpp,xinference"):
        resolve_backends(BuildSpec(model="org/x", backends="chatglmcpp", quant="q4_k_m"), glm)
    assert resolve_backends(spec, glm) == ["vllm", "llamacpp", "xinference"]  # auto: chatglm.cpp skipped
    odd = {"architectures": ["NoSuchForCausalLM"], "model_type": "x"}
    with pytest.raises(Exception, match="llama.cpp 0c1e570's converter does not register NoSuchForCausalLM"):
        resolve_backends(BuildSpec(model="org/x", backends="llamacpp"), odd)


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
    assert f"XLLAMACPP_VERSION := {backends.XLLAMACPP_VERSION}\n" in mk


def test_quant_a_backend_cannot_build_names_the_ones_that_can(monkeypatch):
    monkeypatch.setattr(backends, "REGISTRY", {**backends.REGISTRY})
    spec = BuildSpec(model="org/x", backends="chatglmcpp", quant="q4_0")
    glm = {"architectures": ["GlmForCausalLM"], "model_type": "glm", "num_hidden_layers": 2, "hidden_size": 128,
           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "intermediate_size": 256,
           "vocab_size": 300}  # fmt: skip
    assert resolve_backends(spec, glm) == ["chatglmcpp"]
    chatglm = backends.REGISTRY["chatglmcpp"]
    monkeypatch.setitem(backends.REGISTRY, "chatglmcpp", type(chatglm)(**{**chatglm.__dict__, "quants": ("q8_0",)}))
    with pytest.raises(Exception, match=r"QUANT=q4_0: chatglm.cpp cannot produce it \(it builds q8_0\)"):
        resolve_backends(spec, glm)
