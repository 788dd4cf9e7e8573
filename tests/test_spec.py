"""The build spec: precedence, defaults, validation of everything that reaches a template."""

import re
from pathlib import Path

import pytest

from builder.errors import BuilderError
from builder.spec import BuildSpec, load_spec


def test_defaults_are_real_public_images():
    spec = BuildSpec()
    assert spec.base_images.build.startswith("nvidia/cuda:") and "devel" in spec.base_images.build
    assert spec.base_images.vllm.startswith("vllm/vllm-openai:v")
    assert spec.base_images.xinference.startswith("xprobe/xinference:v")
    assert spec.quant is None and spec.backends is None  # QUANT unset: each format's default (test_backends)
    assert (spec.ports.vllm, spec.ports.chatglmcpp, spec.ports.xinference) == (8000, 8001, 9997)


def test_precedence_flags_over_yaml_over_defaults(tmp_path: Path):
    yaml_file = tmp_path / "build.yaml"
    yaml_file.write_text(
        "model: org/base\nquant: q8_0\ntag: v1\nbackend: chatglmcpp,xinference\nbase_images:\n  build: local/python:bookworm\n"
    )
    spec = load_spec({"spec_file": yaml_file, "tag": "v2", "quant": None}, resolve=False)
    assert spec.tag == "v2"  # flag wins
    assert spec.quant == "q8_0"  # YAML wins over default
    assert spec.backends == ["chatglmcpp", "xinference"]
    assert spec.base_images.build == "local/python:bookworm"
    assert spec.base_images.vllm == BuildSpec().base_images.vllm  # default kept


def test_nested_flag_sets_base_image():
    spec = load_spec({"base_images__xinference": "local/xinference:latest"}, resolve=False)
    assert spec.base_images.xinference == "local/xinference:latest"


def test_image_reference_and_served_name():
    spec = BuildSpec(model="/data/my-model_v2", registry="127.0.0.1:5000/team", tag="t1")
    assert spec.image("chatglmcpp") == "127.0.0.1:5000/team/llm-chatglmcpp:t1"
    assert spec.served_model_name == "my-model_v2"
    assert BuildSpec(model="THUDM/glm-4-9b-chat-hf").served_model_name == "glm-4-9b-chat-hf"


def test_model_source_and_revision(tmp_path: Path):
    (tmp_path / "config.json").write_text("{}")
    assert BuildSpec(model=str(tmp_path)).model_source == "local"
    hub = BuildSpec(model="THUDM/chatglm3-6b")
    assert hub.model_source == "huggingface" and hub.hub_revision == "main"
    ms = BuildSpec(model="ZhipuAI/chatglm3-6b", model_hub="modelscope")
    assert ms.hub_revision == "master"
    with pytest.raises(BuilderError, match="neither an existing folder nor a hub id"):
        _ = BuildSpec(model="./missing/dir").model_source


@pytest.mark.parametrize(
    "field, value",
    [
        ("model", "org/name\nRUN rm -rf /"),
        ("model", 'my"model'),
        ("model", "$(curl evil)"),
        ("model", "`id`"),
        ("served_model_name", "name --build-arg X=1"),
        ("served_model_name", "a'b"),
        ("tag", "latest\nUSER root"),
        ("tag", "--build-arg=FOO"),
        ("name", "Bad/Name"),
        ("registry", 'host:5000/ns"x'),
        ("revision", "main; rm -rf /"),
        ("base_images__build", "ubuntu:22.04\nRUN evil"),
        ("base_images__vllm", "--build-arg X=y"),
        ("base_images__xinference", "x:${EVIL}"),
        ("api_key_env", "API_KEY}\nfoo: ${BAR"),
        ("cuda_architectures", "80;$(id)"),
        ("adapter", "adapter\n/evil"),
    ],
)
def test_injections_are_rejected_naming_the_field(field, value):
    with pytest.raises(BuilderError) as err:
        load_spec({field: value}, resolve=False)
    assert field.replace("__", ".") in str(str(err.value))


def test_unknown_backend_and_duplicate():
    with pytest.raises(BuilderError, match="backends"):
        load_spec({"backends": "vllm,tgi"}, resolve=False)
    with pytest.raises(BuilderError, match="twice"):
        load_spec({"backends": "vllm,vllm"}, resolve=False)


def test_yaml_errors_are_clear(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(BuilderError, match="mapping"):
        load_spec({"spec_file": bad}, resolve=False)
    typo = tmp_path / "typo.yaml"
    typo.write_text("modle: x\n")
    with pytest.raises(BuilderError, match="modle"):
        load_spec({"spec_file": typo}, resolve=False)


def test_resolve_checks_inputs(tmp_path: Path):
    with pytest.raises(BuilderError, match="no model given"):
        load_spec({})
    with pytest.raises(BuilderError, match="config.json"):
        load_spec({"model": str(tmp_path)})
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(BuilderError, match="adapter"):
        load_spec({"model": str(tmp_path), "adapter": str(tmp_path / "nope")})


def test_adapter_takes_one_path_or_named_adapters(tmp_path: Path):
    one = load_spec({"model": "org/x", "adapter": "out/checkpoint-100"}, resolve=False)
    assert one.adapter == Path("out/checkpoint-100") and one.adapters == {}
    named = load_spec({"model": "org/x", "adapter": "sql=out/a, chat = out/b"}, resolve=False)
    assert named.adapter is None and named.adapters == {"sql": Path("out/a"), "chat": Path("out/b")}
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text("model: org/x\nadapters:\n  sql: out/a\nlora_mode: serve\n")
    from_yaml = load_spec({"spec_file": spec_file}, resolve=False)
    assert from_yaml.adapters == {"sql": Path("out/a")} and from_yaml.lora_mode == "serve"
    assert load_spec({"spec_file": spec_file, "lora_mode": "merge"}, resolve=False).lora_mode == "merge"


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"adapter": "sql=out/a,out/b"}, "name each adapter"),
        ({"adapter": "bad name=out/a"}, "adapter name"),
        ({"adapter": "sql=out/$(reboot)"}, "adapter path"),
        ({"adapter": "x=out/a", "adapters": {"y": "out/b"}}, "once"),
        ({"adapter": "out/a", "adapters": {"y": "out/b"}}, "not both"),
        ({"adapter": "x=out/a", "served_model_name": "x"}, "base model's served name"),
        ({"lora_mode": "sometimes"}, "lora_mode"),
    ],
)
def test_bad_adapter_input_is_refused_with_what_to_do(flags, message):
    with pytest.raises(BuilderError, match=re.escape(message)):
        load_spec({"model": "org/x", **flags}, resolve=False)


def test_named_adapter_folders_must_exist(tmp_path: Path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(BuilderError, match=r"adapter sql=.*nope is not a folder"):
        load_spec({"model": str(tmp_path), "adapter": f"sql={tmp_path / 'nope'}"})
