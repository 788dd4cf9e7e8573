"""Backend selection: the spec's list or BACKEND=auto, each refusal with its reason, QUANT checked
against every chosen backend."""

import dataclasses

import pytest

from builder import backends
from builder.errors import BuilderError
from builder.selection import select_backends
from builder.spec import BuildSpec

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


def chosen(spec, config):
    return select_backends(spec, config).backends


def test_auto_returns_its_reasons_instead_of_printing(capsys):
    llama = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    selection = select_backends(BuildSpec(model="org/x"), llama)
    assert selection.backends == ["vllm", "llamacpp", "xinference"]
    assert list(selection.skipped) == ["chatglmcpp"] and "chatglm" in selection.skipped["chatglmcpp"].lower()
    assert capsys.readouterr() == ("", "")


def test_auto_backends_follow_the_architecture():
    spec = BuildSpec(model="org/x")
    assert chosen(spec, GLM) == ["vllm", "chatglmcpp", "llamacpp", "xinference"]
    llama = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    assert chosen(spec, llama) == ["vllm", "llamacpp", "xinference"]
    # GGUF conversion runs no model code, so remote-code models still get the GGUF backends
    baichuan = {"architectures": ["BaichuanForCausalLM"], "model_type": "baichuan", "auto_map": {"AutoModel": "x"}}
    assert chosen(spec, baichuan) == ["llamacpp", "xinference"]
    merged_weights = BuildSpec(model="org/x", xinference_engine="transformers")
    assert chosen(merged_weights, baichuan) == ["llamacpp"]
    odd = {"architectures": ["InternLMForCausalLM"], "model_type": "internlm", "auto_map": {"AutoModel": "x"}}
    with pytest.raises(BuilderError, match="remote code"):
        chosen(merged_weights, odd)
    trusted = BuildSpec(model="org/x", xinference_engine="transformers", trust_remote_code=True)
    assert chosen(trusted, odd) == ["xinference"]


def test_explicit_backends_and_hub_auto():
    assert chosen(BuildSpec(model="org/x", backends="xinference,vllm"), None) == ["vllm", "xinference"]
    with pytest.raises(BuilderError, match="BACKEND=auto"):
        chosen(BuildSpec(model="org/x"), None)


def test_chatglmcpp_refuses_llama_before_any_build():
    with pytest.raises(BuilderError, match="chatglm"):
        chosen(
            BuildSpec(model="org/x", backends="chatglmcpp"),
            {"architectures": ["LlamaForCausalLM"], "model_type": "llama"},
        )


def test_auto_picks_llamacpp_for_any_registered_architecture():
    spec = BuildSpec(model="org/x", quant="q4_k_m")
    llama = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    assert chosen(spec, llama) == ["vllm", "llamacpp", "xinference"]
    glm = {"architectures": ["GlmForCausalLM"], "model_type": "glm", "num_hidden_layers": 2, "hidden_size": 128,
           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "intermediate_size": 256,
           "vocab_size": 300}  # fmt: skip
    with pytest.raises(Exception, match=r"QUANT=q4_k_m: chatglm.cpp cannot produce it .*BACKEND=llamacpp,xinference"):
        chosen(BuildSpec(model="org/x", backends="chatglmcpp", quant="q4_k_m"), glm)
    assert chosen(spec, glm) == ["vllm", "llamacpp", "xinference"]  # auto: chatglm.cpp skipped
    odd = {"architectures": ["NoSuchForCausalLM"], "model_type": "x"}
    with pytest.raises(Exception, match="llama.cpp 0c1e570's converter does not register NoSuchForCausalLM"):
        chosen(BuildSpec(model="org/x", backends="llamacpp"), odd)


def test_quant_a_backend_cannot_build_names_the_ones_that_can(monkeypatch):
    monkeypatch.setattr(backends, "REGISTRY", {**backends.REGISTRY})
    spec = BuildSpec(model="org/x", backends="chatglmcpp", quant="q4_0")
    glm = {"architectures": ["GlmForCausalLM"], "model_type": "glm", "num_hidden_layers": 2, "hidden_size": 128,
           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "intermediate_size": 256,
           "vocab_size": 300}  # fmt: skip
    assert chosen(spec, glm) == ["chatglmcpp"]
    chatglm = backends.REGISTRY["chatglmcpp"]
    monkeypatch.setitem(backends.REGISTRY, "chatglmcpp", dataclasses.replace(chatglm, quants=("q8_0",)))
    with pytest.raises(Exception, match=r"QUANT=q4_0: chatglm.cpp cannot produce it \(it builds q8_0\)"):
        chosen(spec, glm)
