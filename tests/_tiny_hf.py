"""Tiny random HF model folders and real-peft adapters for the merge tests (no hub, a few hundred KB each)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

TOKENIZER_FILES = {
    "tokenizer_config.json": {"model_max_length": 64, "chat_template": "{{ messages }}", "origin": "base"},
    "special_tokens_map.json": {"eos_token": "</s>"},
}


# Prompts for token-for-token equivalence checks: scripts, emoji, code, digits, JSON.
PROMPTS = [
    "Hello world",
    "The quick brown fox",
    "你好，世界！",
    "机器学习模型需要数据",
    "def fibonacci(n):\n    return n",
    "for (int i = 0; i < 10; ++i) {",
    "emoji 😀🚀✨ time",
    "Mixed 中英文 text with `code` 🙂",
    "In 2024 there were 1234567 requests",
    '{"name": "glm", "ok": true}',
    "Please summarize the following paragraph.",
    "café naïve résumé",
]


def tiny_config(arch: str = "llama", *, vocab: int = 256, hidden: int = 64, layers: int = 2, tie: bool = False):
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie,
        )  # fmt: skip
    if arch == "glm":
        from transformers import GlmConfig

        return GlmConfig(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=64,
            attention_bias=True, tie_word_embeddings=tie, pad_token_id=0, eos_token_id=[1], bos_token_id=None,
        )  # fmt: skip
    if arch == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=64)
    raise ValueError(arch)


def make_model(arch: str = "llama", seed: int = 0, dtype=torch.bfloat16, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **kw))
    return model.to(dtype)


def save_base(model, path: Path, *, max_shard_size: str | None = None, safe: bool = True) -> Path:
    """save_pretrained plus the files a real model folder has: tokenizer, chat template, remote code."""
    kwargs = {"safe_serialization": safe}
    if max_shard_size:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(path, **kwargs)
    for name, data in TOKENIZER_FILES.items():
        (path / name).write_text(json.dumps(data))
    (path / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    (path / "configuration_custom.py").write_text("# remote code stays with the model\n")
    return path


def randomize_adapter(peft_model, seed: int = 1) -> None:
    """Give every adapter parameter random, non-trivial values so each delta is non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g).to(p.dtype))
            elif "lora_" in name or "modules_to_save" in name:
                p.copy_((0.05 * torch.randn(p.shape, generator=g)).to(p.dtype))


def make_adapter(
    model, path: Path, *, seed: int = 1, safe: bool = True, base_path: str | None = None, **lora_kw
) -> Path:
    """A real peft LoRA adapter on `model` (which it wraps in place), random weights, saved with save_pretrained."""
    from peft import LoraConfig, get_peft_model

    lora_kw.setdefault("r", 4)
    lora_kw.setdefault("lora_alpha", 8)
    lora_kw.setdefault("target_modules", ["q_proj", "k_proj", "v_proj", "o_proj"])
    pm = get_peft_model(model, LoraConfig(**lora_kw))
    randomize_adapter(pm, seed)
    pm.save_pretrained(path, safe_serialization=safe)
    cfg_path = path / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = base_path
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return path


def peft_merged(base: Path, adapter: Path, dtype, vocab: int | None = None):
    """The reference: transformers load + PeftModel.from_pretrained + merge_and_unload."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    if vocab is not None:
        model.resize_token_embeddings(vocab)
    return PeftModel.from_pretrained(model, adapter).merge_and_unload()


def load_folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out
