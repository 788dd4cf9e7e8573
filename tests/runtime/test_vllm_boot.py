"""builder.runtime.vllm_boot without vLLM: the architecture check (supported set and registry facts
injected; tests/e2e/test_vllm.py asks the real pinned vLLM), the chat-template check and `vllm serve` argv."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from builder.runtime import vllm_boot
from builder.runtime.vllm_boot import (
    MAX_LORA_RANKS,
    ArchInfo,
    check_chat_template,
    check_config,
    load_config,
    max_lora_rank,
    renamed_env,
    serve_argv,
    serve_env,
    serving_refusals,
)

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


def test_the_transformers_model_fallback_name_is_gone():
    """vLLM 0.33 has no `TransformersModel`: a registry holding only that name gives no fallback."""
    assert "TransformersModel" not in vllm_boot.TRANSFORMERS_FALLBACKS
    remote = {"architectures": ["BaichuanForCausalLM"], "auto_map": {"AutoModelForCausalLM": "modeling.Baichuan"}}
    assert check_config(remote, SUPPORTED | {"TransformersModel"}, "0.33.0", trust_remote_code=True) is not None


def test_serve_argv_defaults():
    """--max-model-len auto by default (vLLM's own default sizes for the full context)."""
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
        "--max-model-len",
        "auto",
        "--middleware",
        "builder.runtime.vllm_limits.RequestLimits",
        "--max-logprobs",
        "20",
        "--override-generation-config",
        '{"max_new_tokens": 4096}',
    ]


def test_serve_argv_from_env():
    argv = serve_argv(
        {
            "LLM_MODEL_PATH": "/m",
            "SERVED_MODEL_NAME": "glm-demo",
            "PORT": "9000",
            "LLM_TRUST_REMOTE_CODE": "0",
            "LLM_MAX_MODEL_LEN": "32k",
        }
    )
    assert argv[:3] == ["vllm", "serve", "/m"]
    assert argv[argv.index("--served-model-name") + 1] == "glm-demo"
    assert argv[argv.index("--port") + 1] == "9000"
    assert argv[argv.index("--max-model-len") + 1] == "32k"
    assert "--trust-remote-code" not in argv


def test_empty_max_model_len_leaves_vllms_default():
    assert "--max-model-len" not in serve_argv({"LLM_MAX_MODEL_LEN": ""})


@pytest.mark.parametrize(
    "value,expected", [("1", True), ("true", True), ("YES", True), ("0", False), ("", False), ("false", False)]
)
def test_trust_remote_code_only_when_set(value, expected):
    assert ("--trust-remote-code" in serve_argv({"LLM_TRUST_REMOTE_CODE": value})) is expected


def test_extra_args_are_split_like_a_shell():
    argv = serve_argv({"LLM_EXTRA_ARGS": "--max-model-len 4096 --chat-template '/t/my template.jinja' --enforce-eager"})
    assert argv[-5:] == ["--max-model-len", "4096", "--chat-template", "/t/my template.jinja", "--enforce-eager"]
    # after ours, so it wins (vLLM's parser keeps a flag's last value)
    assert argv.index("4096") > argv.index("auto")
    assert serve_argv({"LLM_EXTRA_ARGS": "   "}) == serve_argv({})


def test_api_key_never_on_the_command_line():
    env = {"VLLM_API_KEY": "sekrit-1", "API_KEY": "sekrit-2"}
    argv = serve_argv(env)
    assert not any("sekrit" in a for a in argv) and "--api-key" not in argv
    assert serve_env(env)["VLLM_API_KEY"] == "sekrit-1"  # an explicit VLLM_API_KEY wins
    assert serve_env({"API_KEY": "sekrit-2"})["VLLM_API_KEY"] == "sekrit-2"  # API_KEY reaches vLLM via env
    assert "VLLM_API_KEY" not in serve_env({})


def run_serve_print(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "builder.runtime.vllm_boot", "serve", "--print"],
        capture_output=True,
        text=True,
        env={**env, "PYTHONPATH": str(Path(vllm_boot.__file__).parents[2])},
        check=True,
    )


def test_serve_print_shows_the_command():
    res = run_serve_print(
        {
            "SERVED_MODEL_NAME": "demo",
            "LLM_EXTRA_ARGS": "--enforce-eager",
            "LLM_TRUST_REMOTE_CODE": "1",
            "LLM_MAX_MODEL_LEN": "512",
            "VLLM_API_KEY": "k-123",
        }
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
        "--max-model-len",
        "512",
        "--middleware",
        "builder.runtime.vllm_limits.RequestLimits",
        "--max-logprobs",
        "20",
        "--override-generation-config",
        '{"max_new_tokens": 4096}',
        "--trust-remote-code",
        "--enforce-eager",
    ]
    assert "k-123" not in res.stdout
    assert res.stderr == ""  # no old names, no warning


def test_old_vllm_names_still_work_with_a_warning_and_never_reach_vllm():
    """Our variables are LLM_*; the old VLLM_* names are read, warned about and removed, so
    vLLM never logs "Unknown vLLM environment variable" (or fails under --fail-on-environ-validation)."""
    res = run_serve_print(
        {"VLLM_EXTRA_ARGS": "--enforce-eager", "VLLM_TRUST_REMOTE_CODE": "1", "VLLM_MODEL_PATH": "/m"}
    )
    argv = shlex.split(res.stdout)
    assert argv[2] == "/m" and "--trust-remote-code" in argv and argv[-1] == "--enforce-eager"
    for old, new in vllm_boot.RENAMED_ENV.items():
        assert f"warning: {old} is renamed {new}" in res.stderr
    env, warnings = renamed_env({"VLLM_EXTRA_ARGS": "--old", "LLM_EXTRA_ARGS": "--new", "VLLM_API_KEY": "k"})
    assert env == {"LLM_EXTRA_ARGS": "--new", "VLLM_API_KEY": "k"}  # vLLM's own VLLM_API_KEY stays
    assert warnings == [
        "warning: VLLM_EXTRA_ARGS is renamed LLM_EXTRA_ARGS (vLLM reserves VLLM_*): ignored, LLM_EXTRA_ARGS is set"
    ]
    # the image sets LLM_EXTRA_ARGS="": an old name given at run time still counts
    env, _ = renamed_env({"VLLM_EXTRA_ARGS": "--old", "LLM_EXTRA_ARGS": ""})
    assert env == {"LLM_EXTRA_ARGS": "--old"}
    assert not [k for k in renamed_env({k: "1" for k in vllm_boot.RENAMED_ENV})[0] if k.startswith("VLLM_")]


def test_load_config_local(tmp_path: Path):
    cfg = {"architectures": ["GlmForCausalLM"], "model_type": "glm"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert load_config("local", tmp_path, "", "") == cfg


def test_load_config_missing_or_unknown_source(tmp_path: Path):
    with pytest.raises(FileNotFoundError):
        load_config("local", tmp_path, "", "")
    with pytest.raises(SystemExit, match="unknown model source"):
        load_config("s3", tmp_path, "x", "")


GENERATE = ArchInfo("GlmForCausalLM", "TransformersForCausalLM", True, False, True)
EMBED = ArchInfo("BertModel", "BertEmbeddingModel", False, True, False)


def stand_in_vllm(monkeypatch, supported: set[str], infos: dict[str, ArchInfo]) -> None:
    """vLLM is not installed on the host: its version, registry keys and _ModelInfo facts stand in
    (tests/e2e/test_vllm.py reads the real ones from the pinned vLLM)."""
    import types

    fake = types.ModuleType("vllm")
    fake.__version__ = "0.33.0"
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setattr(vllm_boot, "supported_architectures", lambda: supported)
    monkeypatch.setattr(vllm_boot, "inspect_architecture", lambda arch, registry_arch: infos[registry_arch])


def test_check_command_fails_with_the_message(tmp_path: Path, monkeypatch, capsys):
    stand_in_vllm(monkeypatch, SUPPORTED, {"GlmForCausalLM": GENERATE})
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BaichuanForCausalLM"]}))
    assert vllm_boot.main(["check", "--local", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: vLLM 0.33.0 cannot serve BaichuanForCausalLM") and "BACKEND=xinference" in err
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GlmForCausalLM"]}))
    assert vllm_boot.main(["check", "--local", str(tmp_path)]) == 0
    assert "vLLM 0.33.0 supports GlmForCausalLM (text generation)" in capsys.readouterr().out
    remote = {"architectures": ["BaichuanForCausalLM"], "auto_map": {"AutoModelForCausalLM": "m.B"}}
    (tmp_path / "config.json").write_text(json.dumps(remote))
    stand_in_vllm(monkeypatch, SUPPORTED | {"TransformersForCausalLM"}, {"TransformersForCausalLM": GENERATE})
    assert vllm_boot.main(["check", "--local", str(tmp_path), "--trust-remote-code", "1"]) == 0
    assert "Transformers backend (TransformersForCausalLM)" in capsys.readouterr().err


def test_check_command_refuses_a_pooling_model_and_a_lora_it_cannot_serve(tmp_path: Path, monkeypatch, capsys):
    """An embedding model is in vLLM's registry, yet it would serve no chat/completions."""
    stand_in_vllm(monkeypatch, SUPPORTED | {"BertModel"}, {"BertModel": EMBED, "GlmForCausalLM": GENERATE})
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    assert vllm_boot.main(["check", "--local", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: vLLM 0.33.0 cannot serve BertModel: BertModel (vLLM class BertEmbeddingModel)")
    assert "pooling model computing embeddings" in err and "no /v1/chat/completions" in err
    assert "BACKEND=xinference" in err
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GlmForCausalLM"]}))
    assert vllm_boot.main(["check", "--local", str(tmp_path), "--lora-rank", "12"]) == 0
    assert "serve with --enable-lora --max-lora-rank 16" in capsys.readouterr().out
    assert vllm_boot.main(["check", "--local", str(tmp_path), "--lora-rank", "600"]) == 1
    assert "above vLLM's largest --max-lora-rank (512)" in capsys.readouterr().err
    assert vllm_boot.main(["check", "--local", str(tmp_path), "--lora-rank", ""]) == 0  # empty: merged, no check


def test_text_generation_is_served():
    assert serving_refusals(GENERATE) == []
    assert serving_refusals(GENERATE, lora_rank=64) == []


@pytest.mark.parametrize(
    "arch,cls,kind",
    [
        ("BertModel", "BertEmbeddingModel", "embeddings (/v1/embeddings, /pooling)"),
        ("Qwen2ForRewardModel", "Qwen2ForRewardModel", "reward scores"),
        ("BertForSequenceClassification", "BertForSequenceClassification", "sequence classification"),
        ("BertForTokenClassification", "BertForTokenClassification", "token classification"),
    ],
)
def test_pooling_models_are_refused_naming_what_vllm_would_do(arch, cls, kind):
    (reason,) = serving_refusals(ArchInfo(arch, cls, False, True, False))
    assert reason.startswith(f"{arch} (vLLM class {cls}) is not a text-generation model in vLLM")
    assert f"pooling model computing {kind}" in reason
    assert "no /v1/chat/completions or /v1/completions" in reason


def test_pooling_wins_over_text_generation_as_in_vllm():
    """vLLM picks the pooling runner first (config/model.py _get_default_runner_type)."""
    assert serving_refusals(ArchInfo("X", "X", True, True, True))


def test_a_draft_model_is_refused():
    (reason,) = serving_refusals(ArchInfo("DeepSeekMTPModel", "DeepSeekMTP", True, False, False, is_draft_model=True))
    assert "speculative-decoding draft model" in reason and "--speculative-config" in reason


def test_lora_needs_support_and_an_allowed_rank():
    no_lora = ArchInfo("FooForCausalLM", "FooForCausalLM", True, False, False)
    (reason,) = serving_refusals(no_lora, lora_rank=8)
    assert (
        reason
        == "FooForCausalLM (vLLM class FooForCausalLM) does not support LoRA in vLLM (--enable-lora): merge the adapter instead"
    )
    assert serving_refusals(no_lora) == []  # merged adapters need no LoRA support
    assert "above vLLM's largest --max-lora-rank (512)" in serving_refusals(GENERATE, lora_rank=513)[0]
    assert "is not a rank" in serving_refusals(GENERATE, lora_rank=0)[0]


@pytest.mark.parametrize(
    "rank,allowed",
    [(1, 1), (2, 8), (8, 8), (9, 16), (64, 64), (65, 128), (300, 320), (321, 512), (512, 512), (513, None)],
)
def test_max_lora_rank_is_the_smallest_allowed_value_that_holds_it(rank, allowed):
    assert max_lora_rank(rank) == allowed
    assert MAX_LORA_RANKS == (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm/config/lora.py MaxLoRARanks


# ---- the chat template -------------------------------------------------------


@pytest.mark.parametrize(
    "files,source",
    [
        ({"tokenizer_config.json": json.dumps({"chat_template": "{{ messages }}"})}, "tokenizer_config.json"),
        ({"tokenizer_config.json": "{}", "chat_template.jinja": "{{ messages }}"}, "chat_template.jinja"),
        ({"chat_template.json": json.dumps({"chat_template": "{{ messages }}"})}, "chat_template.json"),
    ],
)
def test_chat_template_found(tmp_path: Path, files, source):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    assert check_chat_template(tmp_path) == (True, f"chat template: {source}")


def test_no_chat_template_warns_how_to_give_one(tmp_path: Path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    (tmp_path / "chat_template.jinja").write_text("")  # empty is none
    ok, line = check_chat_template(tmp_path)
    assert not ok and line.startswith("warning: the model has no chat template")
    assert "/v1/chat/completions will fail" in line and "--chat-template" in line and "LLM_EXTRA_ARGS" in line
    assert vllm_boot.main(["chat-template", str(tmp_path)]) == 0  # a warning, never a failed build
    assert capsys.readouterr().err.startswith("warning: the model has no chat template")


def test_check_command_warns_and_builds_when_vllm_cannot_inspect_the_class(tmp_path: Path, monkeypatch, capsys):
    """An inspection error (vLLM's subprocess could not import the class on this machine) must not break
    every build: the name check stands, with a warning (tests/e2e/test_vllm.py fails if that happens there)."""
    stand_in_vllm(monkeypatch, SUPPORTED, {})

    def broken(arch, registry_arch):
        raise RuntimeError("Error raised in subprocess:\nImportError: libcuda.so.1")

    monkeypatch.setattr(vllm_boot, "inspect_architecture", broken)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert vllm_boot.main(["check", "--local", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "could not inspect LlamaForCausalLM (RuntimeError: ImportError: libcuda.so.1)" in err
    assert "checks were skipped" in err


# ---- adapters served unmerged (--enable-lora) -------------------------------------------------


def test_lora_modules_become_vllms_lora_flags():
    env = {
        "SERVED_MODEL_NAME": "support",
        "LLM_LORA_MODULES": "sql=/models/lora/sql chat=/models/lora/chat",
        "LLM_MAX_LORAS": "2",
        "LLM_MAX_LORA_RANK": "64",
        "LLM_EXTRA_ARGS": "--max-loras 1",
    }
    argv = serve_argv(env)
    assert argv[argv.index("--served-model-name") + 1] == "support"  # named adapters: the base keeps the name
    # $LLM_EXTRA_ARGS last: it wins
    assert argv[argv.index("--enable-lora") :] == [
        "--enable-lora", "--lora-modules", "sql=/models/lora/sql", "chat=/models/lora/chat",
        "--max-loras", "2", "--max-lora-rank", "64", "--max-loras", "1",
    ]  # fmt: skip


def test_an_adapter_under_the_served_name_moves_the_base_to_name_base():
    argv = serve_argv({"SERVED_MODEL_NAME": "support", "LLM_LORA_MODULES": "support=/models/lora/support"})
    assert argv[argv.index("--served-model-name") + 1] == "support-base"
    assert argv[argv.index("--lora-modules") + 1] == "support=/models/lora/support"
    assert argv[argv.index("--max-loras") + 1] == "1"  # unset: every adapter in one batch
    assert "--max-lora-rank" not in argv  # unset: vLLM's default


@pytest.mark.parametrize("rank,passed", [("12", "16"), ("64", "64"), ("320", "320"), ("600", "600")])
def test_max_lora_rank_is_rounded_up_to_a_value_vllm_allows(rank, passed):
    argv = serve_argv({"LLM_LORA_MODULES": "a=/models/lora/a", "LLM_MAX_LORA_RANK": rank})
    assert argv[argv.index("--max-lora-rank") + 1] == passed  # above 512: as given, vLLM's error says why


def test_without_lora_modules_there_is_no_lora_flag():
    for env in ({}, {"LLM_LORA_MODULES": "  ", "LLM_MAX_LORA_RANK": "16", "LLM_MAX_LORAS": "2"}):
        argv = serve_argv(env)
        assert not any("lora" in a for a in argv) and argv[argv.index("--served-model-name") + 1] == "model"


@pytest.mark.parametrize("bad", ["sql", "=/models/lora/sql", "sql="])
def test_a_malformed_lora_module_says_what_it_takes(bad):
    with pytest.raises(SystemExit, match="is not NAME=PATH"):
        serve_argv({"LLM_LORA_MODULES": bad})


def test_serve_print_shows_the_lora_flags():
    res = run_serve_print({"LLM_LORA_MODULES": "a=/models/lora/a", "LLM_MAX_LORAS": "1", "LLM_MAX_LORA_RANK": "8"})
    assert shlex.split(res.stdout)[-7:] == [
        "--enable-lora", "--lora-modules", "a=/models/lora/a", "--max-loras", "1", "--max-lora-rank", "8"
    ]  # fmt: skip


# ---- the bound on one request's work -----------------------------------------------------------------


def test_limits_argv_defaults_and_overrides(tmp_path):
    from builder.runtime.vllm_boot import limits_argv

    assert limits_argv({}, str(tmp_path)) == [
        "--middleware",
        "builder.runtime.vllm_limits.RequestLimits",
        "--max-logprobs",
        "20",
        "--override-generation-config",
        '{"max_new_tokens": 4096}',
    ]
    env = {"LLM_MAX_LOGPROBS": "5", "LLM_MAX_NUM_SEQS": "8", "LLM_MAX_TOKENS": "100"}
    assert limits_argv(env, str(tmp_path))[2:] == [
        "--max-logprobs",
        "5",
        "--max-num-seqs",
        "8",
        "--override-generation-config",
        '{"max_new_tokens": 100}',
    ]
    # no output bound: vLLM's own default output length (the rest of the context)
    assert "--override-generation-config" not in limits_argv({"LLM_MAX_TOKENS": "0"}, str(tmp_path))


def test_limits_argv_keeps_a_smaller_default_of_the_model(tmp_path):
    from builder.runtime.vllm_boot import limits_argv

    (tmp_path / "generation_config.json").write_text(json.dumps({"max_new_tokens": 256}))
    assert limits_argv({}, str(tmp_path))[-1] == '{"max_new_tokens": 256}'
    (tmp_path / "generation_config.json").write_text(json.dumps({"max_new_tokens": 100000}))
    assert limits_argv({}, str(tmp_path))[-1] == '{"max_new_tokens": 4096}'


@pytest.mark.parametrize(
    "env,name",
    [({"LLM_MAX_N": "ten"}, "LLM_MAX_N"), ({"LLM_MAX_BODY_BYTES": "4M"}, "LLM_MAX_BODY_BYTES"),
     ({"LLM_MAX_LOGPROBS": "x"}, "LLM_MAX_LOGPROBS"), ({"LLM_MAX_NUM_SEQS": "1;rm"}, "LLM_MAX_NUM_SEQS")],
)  # fmt: skip
def test_limits_argv_stops_the_start_on_a_bad_value_with_its_name(tmp_path, env, name):
    from builder.runtime.vllm_boot import limits_argv

    with pytest.raises(SystemExit, match=rf"^error: {name}="):
        limits_argv(env, str(tmp_path))
