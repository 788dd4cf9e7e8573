"""builder.runtime.vllm_boot without vLLM: the architecture check (supported set injected) and `vllm serve` argv."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from builder.runtime import vllm_boot
from builder.runtime.vllm_boot import check_config, load_config, serve_argv, serve_env

SUPPORTED = {
    "LlamaForCausalLM",
    "GlmForCausalLM",
    "ChatGLMModel",
    "InternLM2ForCausalLM",
    "InternLM3ForCausalLM",
    "Qwen2ForCausalLM",
}


def test_supported_architecture_passes():
    assert check_config({"architectures": ["GlmForCausalLM"], "model_type": "glm"}, SUPPORTED, "0.33.0") is None
    # any one of several listed architectures is enough
    assert check_config({"architectures": ["Nope", "LlamaForCausalLM"]}, SUPPORTED) is None


@pytest.mark.parametrize("arch", ["BaichuanForCausalLM", "InternLMForCausalLM"])
def test_unsupported_architecture_names_it_and_the_alternatives(arch):
    msg = check_config({"architectures": [arch], "model_type": "x"}, SUPPORTED, "0.33.0")
    assert msg is not None
    assert f"vLLM 0.33.0 cannot serve {arch}" in msg
    assert f"{len(SUPPORTED)} supported architectures" in msg
    for alternative in ("BACKEND=xinference", "BACKEND=chatglmcpp", "newer vLLM base image", "--vllm-base"):
        assert alternative in msg


def test_unsupported_message_suggests_similar_names():
    msg = check_config({"architectures": ["InternLMForCausalLM"]}, SUPPORTED, "0.33.0")
    assert "Similar names vLLM knows: InternLM2ForCausalLM, InternLM3ForCausalLM." in msg
    assert "Similar names" not in check_config({"architectures": ["BaichuanForCausalLM"]}, SUPPORTED)


def test_config_without_architectures_is_refused_by_model_type():
    msg = check_config({"model_type": "mystery"}, SUPPORTED, "0.33.0")
    assert "model_type mystery (no `architectures` in config.json)" in msg


def test_remote_code_falls_back_to_the_transformers_backend_only_when_trusted_and_available():
    remote = {"architectures": ["BaichuanForCausalLM"], "auto_map": {"AutoModelForCausalLM": "modeling.Baichuan"}}
    with_fallback = SUPPORTED | {"TransformersForCausalLM"}
    assert check_config(remote, with_fallback, "0.33.0", trust_remote_code=True) is None
    assert check_config(remote, with_fallback, "0.33.0", trust_remote_code=False) is not None
    assert check_config(remote, SUPPORTED, "0.33.0", trust_remote_code=True) is not None  # no fallback in vLLM
    native = {"architectures": ["BaichuanForCausalLM"]}  # not remote code: the fallback does not apply
    assert check_config(native, with_fallback, "0.33.0", trust_remote_code=True) is not None


def test_serve_argv_defaults():
    assert serve_argv({}) == [
        "vllm",
        "serve",
        "/models/model",
        "--served-model-name",
        "model",
        "--host",
        "0.0.0.0",
        "--port",
        "8000",
    ]


def test_serve_argv_from_env():
    argv = serve_argv(
        {"VLLM_MODEL_PATH": "/m", "SERVED_MODEL_NAME": "glm-demo", "PORT": "9000", "VLLM_TRUST_REMOTE_CODE": "0"}
    )
    assert argv[:3] == ["vllm", "serve", "/m"]
    assert argv[argv.index("--served-model-name") + 1] == "glm-demo"
    assert argv[argv.index("--port") + 1] == "9000"
    assert "--trust-remote-code" not in argv


@pytest.mark.parametrize(
    "value,expected", [("1", True), ("true", True), ("YES", True), ("0", False), ("", False), ("false", False)]
)
def test_trust_remote_code_only_when_set(value, expected):
    assert ("--trust-remote-code" in serve_argv({"VLLM_TRUST_REMOTE_CODE": value})) is expected


def test_extra_args_are_split_like_a_shell():
    argv = serve_argv(
        {"VLLM_EXTRA_ARGS": "--max-model-len 4096 --chat-template '/t/my template.jinja' --enforce-eager"}
    )
    assert argv[-5:] == ["--max-model-len", "4096", "--chat-template", "/t/my template.jinja", "--enforce-eager"]
    assert serve_argv({"VLLM_EXTRA_ARGS": "   "}) == serve_argv({})


def test_api_key_never_on_the_command_line():
    env = {"VLLM_API_KEY": "sekrit-1", "API_KEY": "sekrit-2"}
    argv = serve_argv(env)
    assert not any("sekrit" in a for a in argv) and "--api-key" not in argv
    assert serve_env(env)["VLLM_API_KEY"] == "sekrit-1"  # an explicit VLLM_API_KEY wins
    assert serve_env({"API_KEY": "sekrit-2"})["VLLM_API_KEY"] == "sekrit-2"  # API_KEY reaches vLLM via env
    assert "VLLM_API_KEY" not in serve_env({})


def test_serve_print_shows_the_command(monkeypatch):
    res = subprocess.run(
        [sys.executable, "-m", "builder.runtime.vllm_boot", "serve", "--print"],
        capture_output=True,
        text=True,
        env={
            "SERVED_MODEL_NAME": "demo",
            "VLLM_EXTRA_ARGS": "--max-model-len 512",
            "VLLM_TRUST_REMOTE_CODE": "1",
            "VLLM_API_KEY": "k-123",
            "PYTHONPATH": str(Path(vllm_boot.__file__).parents[2]),
        },
        check=True,
    )
    assert shlex.split(res.stdout) == [
        "vllm",
        "serve",
        "/models/model",
        "--served-model-name",
        "demo",
        "--host",
        "0.0.0.0",
        "--port",
        "8000",
        "--trust-remote-code",
        "--max-model-len",
        "512",
    ]
    assert "k-123" not in res.stdout


def test_load_config_local(tmp_path: Path):
    cfg = {"architectures": ["GlmForCausalLM"], "model_type": "glm"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert load_config("local", tmp_path, "", "") == cfg


def test_load_config_missing_or_unknown_source(tmp_path: Path):
    with pytest.raises(FileNotFoundError):
        load_config("local", tmp_path, "", "")
    with pytest.raises(SystemExit, match="unknown model source"):
        load_config("s3", tmp_path, "x", "")


def test_check_command_fails_with_the_message(tmp_path: Path, monkeypatch, capsys):
    """`check` end to end, with a stand-in vllm module (vLLM is not installed on the host)."""
    import types

    fake = types.ModuleType("vllm")
    fake.__version__ = "0.33.0"
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setattr(vllm_boot, "supported_architectures", lambda: SUPPORTED)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BaichuanForCausalLM"]}))
    assert vllm_boot.main(["check", "--local", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: vLLM 0.33.0 cannot serve BaichuanForCausalLM") and "BACKEND=xinference" in err
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GlmForCausalLM"]}))
    assert vllm_boot.main(["check", "--local", str(tmp_path)]) == 0
    assert "vLLM 0.33.0 supports GlmForCausalLM" in capsys.readouterr().out
    remote = {"architectures": ["BaichuanForCausalLM"], "auto_map": {"AutoModelForCausalLM": "m.B"}}
    (tmp_path / "config.json").write_text(json.dumps(remote))
    monkeypatch.setattr(vllm_boot, "supported_architectures", lambda: SUPPORTED | {"TransformersForCausalLM"})
    assert vllm_boot.main(["check", "--local", str(tmp_path), "--trust-remote-code", "1"]) == 0
    assert "Transformers backend (TransformersForCausalLM)" in capsys.readouterr().err
