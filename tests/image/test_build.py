"""builder build without Docker: backend choice, build context, build args, secrets, .env."""

import json
import os
import stat
from pathlib import Path

from builder.image.build import (
    build_args,
    build_secrets,
    digest_dir,
    prepare_context,
    read_env,
    write_env,
)
from builder.spec import BuildSpec


def _model(tmp_path: Path, **config) -> Path:
    d = tmp_path / "m"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(config))
    (d / "model.safetensors").write_bytes(b"weights")
    return d


GLM = {
    "architectures": ["GlmForCausalLM"],
    "model_type": "glm",
    "hidden_size": 64,
    "num_attention_heads": 2,
    "head_dim": 32,
    "intermediate_size": 128,
    "partial_rotary_factor": 0.5,
    "num_hidden_layers": 2,
    "num_key_value_heads": 1,
    "vocab_size": 600,
}


def test_context_is_minimal_and_links_weights(tmp_path: Path):
    model = _model(tmp_path, **GLM)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    spec = BuildSpec(model=str(model), adapter=adapter)
    ctx = prepare_context(spec, tmp_path / "build", adapter)
    assert sorted(p.name for p in ctx.iterdir()) == [".dockerignore", "adapter", "model", "quality", "src", "wheels"]
    assert (ctx / "adapter" / "adapter_config.json").is_file()
    assert (ctx / "src" / "builder" / "__main__.py").is_file()
    assert not list((ctx / "src").rglob("__pycache__"))
    assert os.stat(ctx / "model" / "model.safetensors").st_ino == os.stat(model / "model.safetensors").st_ino
    assert list((ctx / "wheels").iterdir()) == []


def test_build_args_carry_per_model_values(tmp_path: Path):
    model = _model(tmp_path, **GLM)
    spec = BuildSpec(model=str(model), quant="q8_0", served_model_name="demo")
    args = build_args(spec, "chatglmcpp")
    assert args["MODEL_SOURCE"] == "local" and args["MODEL_ID"] == "" and args["QUANT"] == "q8_0"
    assert args["ADAPTER_DIGEST"] == "" and build_args(spec, "chatglmcpp", model)["ADAPTER_DIGEST"].startswith(
        "sha256:"
    )
    assert args["RUNTIME_BASE"] == spec.base_images.chatglmcpp and args["SERVED_MODEL_NAME"] == "demo"
    hub = build_args(BuildSpec(model="THUDM/glm-4-9b-chat-hf", revision="v1"), "vllm")
    assert (hub["MODEL_SOURCE"], hub["MODEL_ID"], hub["MODEL_REVISION"]) == (
        "huggingface",
        "THUDM/glm-4-9b-chat-hf",
        "v1",
    )
    assert hub["VLLM_BASE"] == "vllm/vllm-openai:v0.33.0" and hub["QUANT"] == ""
    assert all("\n" not in v for v in args.values())


def test_adapter_digest_changes_with_content(tmp_path: Path):
    a = tmp_path / "a"
    a.mkdir()
    (a / "w.bin").write_bytes(b"1")
    first = digest_dir(a)
    (a / "w.bin").write_bytes(b"2")
    assert first.startswith("sha256:") and digest_dir(a) != first and digest_dir(None) == ""


def test_hub_token_secret_file_is_private_and_removed(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    ca = tmp_path / "ca.pem"
    ca.write_text("CA")
    with build_secrets(BuildSpec(model="org/x", ca_bundle=ca)) as found:
        token = found["hub_token"]
        assert token.read_text() == "hf_secret"
        assert stat.S_IMODE(token.stat().st_mode) == 0o600
        assert found["ca"] == ca.resolve()
    assert not token.exists()


def test_env_file_keeps_key_and_lists_profiles(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("API_KEY", raising=False)
    env = tmp_path / ".env"
    spec = BuildSpec(model="org/x", registry="127.0.0.1:5000", tag="t")
    write_env(spec, ["chatglmcpp", "xinference"], env)
    first = read_env(env)
    assert first["COMPOSE_PROFILES"] == "chatglmcpp,xinference"
    assert first["CHATGLMCPP_IMAGE"] == "127.0.0.1:5000/llm-chatglmcpp:t"
    assert len(first["API_KEY"]) >= 24 and stat.S_IMODE(env.stat().st_mode) == 0o600
    write_env(spec, ["vllm"], env)
    assert read_env(env)["API_KEY"] == first["API_KEY"], "a rebuild keeps the key clients already use"
    monkeypatch.setenv("API_KEY", "mine")
    write_env(spec, ["vllm"], env)
    assert read_env(env)["API_KEY"] == "mine"


def test_env_file_names_the_smoke_checks_each_build_cannot_pass(tmp_path: Path):
    """Xinference's transformers engine has no /v1/completions; on its llama.cpp engine nothing is skipped."""
    env = tmp_path / ".env"
    write_env(BuildSpec(model="org/x", xinference_engine="transformers"), ["chatglmcpp", "xinference"], env)
    values = read_env(env)
    assert values["XINFERENCE_SMOKE_SKIP"] == "completions" and values["CHATGLMCPP_SMOKE_SKIP"] == ""
    write_env(BuildSpec(model="org/x"), ["xinference"], env)
    assert read_env(env)["XINFERENCE_SMOKE_SKIP"] == "" and "CHATGLMCPP_SMOKE_SKIP" not in read_env(env)
