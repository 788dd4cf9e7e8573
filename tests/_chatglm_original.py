"""Original THUDM ChatGLM folders (model_type "chatglm") built in code from a native GLM's weights,
shared by the GGML (test_convert.py) and GGUF (test_gguf.py) conversion tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import GlmConfig, GlmForCausalLM

REMOTE_CODE = 'raise RuntimeError("remote code from the model folder was executed")\n'


def _random_glm(vocab: int, seed: int = 0) -> GlmForCausalLM:
    cfg = GlmConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        rms_norm_eps=1e-5,
        max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 20000.0, "partial_rotary_factor": 0.5},
        attention_bias=True,
        pad_token_id=0,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = GlmForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.08 * torch.randn_like(p))
    return model.eval()


def _chatglm_state(model: GlmForCausalLM) -> dict:
    sd, out = model.state_dict(), {}
    out["transformer.embedding.word_embeddings.weight"] = sd["model.embed_tokens.weight"]
    for i in range(model.config.num_hidden_layers):
        s, d = f"model.layers.{i}.", f"transformer.encoder.layers.{i}."
        out[d + "input_layernorm.weight"] = sd[s + "input_layernorm.weight"]
        for kind in ("weight", "bias"):
            out[d + f"self_attention.query_key_value.{kind}"] = torch.cat(
                [sd[s + f"self_attn.{p}_proj.{kind}"] for p in "qkv"]
            )
        out[d + "self_attention.dense.weight"] = sd[s + "self_attn.o_proj.weight"]
        out[d + "post_attention_layernorm.weight"] = sd[s + "post_attention_layernorm.weight"]
        out[d + "mlp.dense_h_to_4h.weight"] = sd[s + "mlp.gate_up_proj.weight"]
        out[d + "mlp.dense_4h_to_h.weight"] = sd[s + "mlp.down_proj.weight"]
        out[d + "self_attention.rotary_emb.inv_freq"] = torch.ones(8)  # present in real checkpoints, unused
    out["transformer.encoder.final_layernorm.weight"] = sd["model.norm.weight"]
    out["transformer.output_layer.weight"] = sd["lm_head.weight"]
    return {k: v.contiguous().clone() for k, v in out.items()}


def _chatglm_config(vocab: int, eos, **kw) -> dict:
    cfg = {
        "_name_or_path": "local/finetune",
        "model_type": "chatglm",
        "architectures": ["ChatGLMModel"],
        "auto_map": {
            "AutoConfig": "configuration_chatglm.ChatGLMConfig",
            "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
        },
        "add_bias_linear": False,
        "add_qkv_bias": True,
        "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False,
        "attention_softmax_in_fp32": True,
        "ffn_hidden_size": 128,
        "fp32_residual_connection": False,
        "hidden_size": 64,
        "kv_channels": 32,
        "layernorm_epsilon": 1e-5,
        "multi_query_attention": True,
        "multi_query_group_num": 1,
        "num_attention_heads": 2,
        "num_layers": 2,
        "original_rope": True,
        "padded_vocab_size": vocab,
        "post_layer_norm": True,
        "rmsnorm": True,
        "rope_ratio": 2,
        "seq_length": 2048,
        "torch_dtype": "float32",
        "eos_token_id": eos,
        "pad_token_id": 0,
        "pre_seq_len": None,
        "prefix_projection": False,
    }
    cfg.update(kw)
    return cfg


def make_glm4_original(native_dir: Path, model: GlmForCausalLM, out: Path) -> Path:
    """A GLM-4 original folder: tiktoken tokenizer.model rebuilt from the native tokenizer, the native
    model's weights in THUDM names, and remote-code files that raise if anything runs them."""
    from safetensors.torch import save_file

    from builder.model.convert.vocab import vocab_from_tokenizer_json

    text, n, _ = vocab_from_tokenizer_json(Path(native_dir) / "tokenizer.json")
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(text)
    (out / "tokenization_chatglm.py").write_text(REMOTE_CODE)
    (out / "modeling_chatglm.py").write_text(REMOTE_CODE)
    cfg = _chatglm_config(model.config.vocab_size, [n, n + 7, n + 9], rope_ratio=1, layernorm_epsilon=1.5625e-07)
    cfg["hidden_size"], cfg["ffn_hidden_size"] = model.config.hidden_size, model.config.intermediate_size
    cfg["num_attention_heads"], cfg["multi_query_group_num"] = (
        model.config.num_attention_heads,
        model.config.num_key_value_heads,
    )
    cfg["kv_channels"], cfg["num_layers"] = model.config.head_dim, model.config.num_hidden_layers
    (out / "config.json").write_text(json.dumps(cfg))
    save_file(_chatglm_state(model), out / "model.safetensors")
    return out
