"""builder.runtime.xinference.registration: the custom-LLM registration and launch request made from a model folder.

Registering with a real xinference-local is in test_xinference_process.py (and the GGUF form in
test_xinference_engines.py).
"""

from __future__ import annotations

import json

import pytest

from builder.runtime.xinference import config, process, registration
from builder.runtime.xinference.__main__ import main

MODEL = "tiny-glm"


def test_spec_from_model_folder(tiny_model):
    cfg, _ = config.parse_args([], {"MODEL_PATH": str(tiny_model), "SERVED_MODEL_NAME": MODEL})
    spec = registration.model_spec(cfg)
    tok_cfg = json.loads((tiny_model / "tokenizer_config.json").read_text())
    gen = json.loads((tiny_model / "generation_config.json").read_text())
    assert spec["version"] == 2 and spec["model_name"] == MODEL and spec["model_family"] == MODEL
    assert spec["model_ability"] == ["generate", "chat"]
    assert spec["chat_template"] == tok_cfg["chat_template"]
    assert spec["stop_token_ids"] == gen["eos_token_id"]
    assert spec["stop"] == ["<|endoftext|>", "<|user|>", "<|observation|>"]
    assert spec["context_length"] == 2048  # config.json max_position_embeddings
    assert spec["architectures"] == ["GlmForCausalLM"]
    (s,) = spec["model_specs"]
    assert s["model_format"] == "pytorch" and s["quantization"] == "none"
    assert s["model_uri"] == f"file://{tiny_model.resolve()}"
    assert s["model_size_in_billions"] == "0_1"  # tiny: the smallest label Xinference accepts
    # A context length from the environment wins over config.json.
    cfg, _ = config.parse_args([], {"MODEL_PATH": str(tiny_model), "XINFERENCE_CONTEXT_LENGTH": "1024"})
    assert registration.model_spec(cfg)["context_length"] == 1024 and cfg.model_name == "model"


def test_chat_template_fallbacks(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    assert registration.chat_template(tmp_path) is None
    (tmp_path / "chat_template.jinja").write_text("{{ messages }}")
    assert registration.chat_template(tmp_path) == "{{ messages }}"
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]})
    )
    assert registration.chat_template(tmp_path) == "D"
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 2, "seq_length": 8192}))
    assert registration.context_length(tmp_path) == 8192
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>"}}))
    assert registration.stop_tokens(tmp_path) == ([2], ["</s>"])


def test_model_spec_rejects_non_hf_folder(tmp_path):
    cfg, _ = config.parse_args(["--model-path", str(tmp_path)], {})
    with pytest.raises(config.BootError, match="no config.json"):
        registration.model_spec(cfg)
    assert main(["--model-path", str(tmp_path)], {"XINFERENCE_AUTH": "off"}) == 2


def test_launch_request_engines_and_remote_code(tiny_model):
    env = {"MODEL_PATH": str(tiny_model), "SERVED_MODEL_NAME": MODEL}
    cfg, _ = config.parse_args([], env)
    launch = registration.launch_request(cfg, registration.model_spec(cfg))
    assert launch["model_engine"] == "Transformers" and launch["model_uid"] == MODEL
    assert "trust_remote_code" not in launch and "n_gpu" not in launch
    cfg, _ = config.parse_args(
        [],
        {
            **env,
            "XINFERENCE_ENGINE": "vllm",
            "TRUST_REMOTE_CODE": "1",
            "XINFERENCE_N_GPU": "2",
            "XINFERENCE_LAUNCH_ARGS": '{"gpu_memory_utilization": 0.8}',
        },
    )
    launch = registration.launch_request(cfg, registration.model_spec(cfg))
    assert launch["model_engine"] == "vLLM" and launch["trust_remote_code"] is True
    assert launch["n_gpu"] == 2 and launch["gpu_memory_utilization"] == 0.8
    assert process.xinference_env(cfg, {})["XINFERENCE_TRUST_REMOTE_CODE"] == "1"
    with pytest.raises(config.BootError, match="XINFERENCE_ENGINE"):
        config.parse_args([], {"XINFERENCE_ENGINE": "sglang"})


def test_same_registration_detects_changes(tiny_model):
    cfg, _ = config.parse_args([], {"MODEL_PATH": str(tiny_model), "SERVED_MODEL_NAME": MODEL})
    spec = registration.model_spec(cfg)
    # What GET /v1/model_registrations/LLM/NAME returns: the spec plus server-side fields.
    echoed = json.loads(json.dumps({**spec, "is_builtin": False, "cache_config": None}))
    echoed["model_specs"][0]["model_size_in_billions"] = "0_1"
    assert registration._same_registration(echoed, spec)
    changed = json.loads(json.dumps(echoed))
    changed["chat_template"] = "{{ messages }}"
    assert not registration._same_registration(changed, spec)
    moved = json.loads(json.dumps(echoed))
    moved["model_specs"][0]["model_uri"] = "file:///elsewhere"
    assert not registration._same_registration(moved, spec)
    assert not registration._same_registration("not found", spec)


def _gguf_alone(folder, template: str | None = "{{ messages[0]['content'] }}"):
    """A folder holding one GGUF and nothing else (a weights image mounted on the engine image), written by
    llama.cpp's own gguf-py writer with the metadata its converter records."""
    import numpy as np

    from builder.model.gguf.convert import _gguf_module

    gguf = _gguf_module()
    w = gguf.GGUFWriter(str(folder / "model.gguf"), "llama")
    w.add_context_length(4096)
    w.add_token_list(["<s>", "</s>", "<|im_end|>", "a"])
    w.add_array("tokenizer.ggml.token_type", [3, 3, 3, 1])
    w.add_eos_token_id(2)
    w.add_uint32("tokenizer.ggml.eot_token_id", 1)
    if template:
        w.add_chat_template(template)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return folder


def test_spec_from_a_gguf_alone_reads_its_metadata(tmp_path):
    folder = _gguf_alone(tmp_path)
    env = {"SERVED_MODEL_NAME": MODEL, "XINFERENCE_ENGINE": "llama.cpp", "XINFERENCE_QUANTIZATION": "q8_0"}
    cfg, _ = config.parse_args(["--model-path", str(folder)], env)
    spec = registration.model_spec(cfg)
    assert spec["chat_template"] == "{{ messages[0]['content'] }}" and spec["model_ability"] == ["generate", "chat"]
    assert spec["stop_token_ids"] == [2, 1] and spec["stop"] == ["<|im_end|>", "</s>"]
    assert spec["context_length"] == 4096 and spec["architectures"] is None
    (s,) = spec["model_specs"]
    assert s["model_format"] == "ggufv2" and s["model_file_name_template"] == "model.gguf"
    assert s["quantization"] == "q8_0" and s["model_uri"] == f"file://{folder.resolve()}"
    # no chat template in the GGUF: generate only, as for a folder without one
    (tmp_path / "bare").mkdir()
    cfg, _ = config.parse_args(["--model-path", str(_gguf_alone(tmp_path / "bare", None))], env)
    assert registration.model_spec(cfg)["model_ability"] == ["generate"]


def test_a_gguf_alone_needs_the_llamacpp_engine(tmp_path):
    cfg, _ = config.parse_args(["--model-path", str(_gguf_alone(tmp_path))], {"XINFERENCE_ENGINE": "transformers"})
    with pytest.raises(config.BootError, match="no config.json"):
        registration.model_spec(cfg)
