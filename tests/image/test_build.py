"""builder build without Docker: backend choice, build context, build args, secrets, .env."""

import json
import os
import stat
from pathlib import Path

from builder.image.build import (
    build_args,
    build_secrets,
    digest_dir,
    mounted_targets,
    prepare_context,
    read_env,
    write_env,
)
from builder.image.render import render_text
from builder.selection import LoraPlan, Selection
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


# -- the images beside a mounted_weights backend's runtime (engine, weights, adapters) ---------------------


def _stage(text: str, name: str) -> list[str]:
    """The instructions of one stage of a rendered Dockerfile (continuation lines joined, comments dropped)."""
    body = text[text.index(f" AS {name}\n") :].split("\nFROM ", 1)[0]
    lines = body.replace("\\\n", " ").splitlines()[1:]
    return [line for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _layers(instructions: list[str]) -> list[str]:
    return [i for i in instructions if i.split(" ", 1)[0] in ("RUN", "COPY", "ADD")]


def _env(instructions: list[str]) -> str:
    """A stage's ENV instructions, as one string."""
    return " ".join(i for i in instructions if i.startswith("ENV "))


def test_mounted_targets_are_stages_holding_the_runtime_layers():
    adapters = {"sql": Path("/a/sql"), "chat": Path("/a/chat")}
    spec = BuildSpec(adapters={k: str(v) for k, v in adapters.items()}, backends=["llamacpp"], name="m", tag="t")
    served = Selection(["llamacpp"], lora={"llamacpp": LoraPlan("serve", "")}, adapters=adapters)
    targets = mounted_targets(spec, "llamacpp", served)
    assert targets == {"engine": spec.engine_image("llamacpp"), "weights": "m-weights:t",
                       "lora-weights-0": "m-lora:t-sql", "lora-weights-1": "m-lora:t-chat"}  # fmt: skip
    assert spec.engine_image("llamacpp").startswith("llamacpp-engine:")  # one per engine pin, not per model
    merged = Selection(["llamacpp"], lora={"llamacpp": LoraPlan("merge", "")}, adapters=adapters)
    assert set(mounted_targets(spec, "llamacpp", merged)) == {"engine", "weights"}

    text = render_text(spec, served)["Dockerfile.llamacpp"]
    runtime = _layers(_stage(text, "runtime"))
    engine = _layers(_stage(text, "engine"))
    # the engine's layers are the runtime's first ones (same instructions on the same base: the same layers);
    # the runtime's other layers are the weights, each adapter and the router preset
    assert engine and runtime[: len(engine)] == engine
    weights = [_stage(text, t) for t in targets if t != "engine"]
    assert text.count("FROM scratch AS weights\n") == 1 and all(len(w) == 1 for w in weights)
    assert [w[0] for w in weights] == runtime[len(engine) : len(engine) + 3]
    assert runtime[len(engine) + 3 :] == ["COPY llamacpp/preset.ini /models/preset.ini"]
    # the engine serves /models/model.gguf, where the weights image puts it
    assert weights[0] == ["COPY --from=gguf /w/ /"] and "--out /w/models/model.gguf" in text
    assert "LLAMA_ARG_MODEL=/models/model.gguf" in " ".join(_stage(text, "engine"))
    assert _stage(text, "runtime")[-1] == _stage(text, "engine")[-1] == 'ENTRYPOINT ["/opt/llama.cpp/llama-server"]'
