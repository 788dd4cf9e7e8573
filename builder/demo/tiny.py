"""Tiny, random, transformers-native model folders built in code (no hub, no downloads).

`build_glm_tokenizer` makes a byte-level BPE tokenizer laid out exactly like GLM-4's tiktoken
tokenizer (regular ranks 0..N-1, the 14 GLM-4 special tokens at N..N+13, GLM-4's split regex and
chat template), so chatglm.cpp's ChatGLM4Tokenizer reproduces its ids after GGML conversion.
`make_random_glm` saves a random `GlmForCausalLM` with that tokenizer: tests, demos and benches
import both.
`make_random_llama` and `make_random_qwen2` do the same for the Llama-3 and Qwen2 layouts.
"""

from __future__ import annotations

import json
from pathlib import Path

from builder.model.convert.vocab import (  # noqa: F401 (re-exported)
    GLM4_CHAT_TEMPLATE,
    GLM4_PAT_STR,
    GLM4_SPECIAL_TOKENS,
    bytes_to_unicode,
    tiktoken_merges,
)

DEFAULT_CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away again and again.",
    "Hello, world! How are you today? I'm fine, thanks. We'll see what they've done and what you'd like.",
    "Machine learning models are trained on data, then evaluated, then deployed into production servers.",
    "Please summarize the following paragraph in one sentence, and answer the question that comes after it.",
    "In 2024 there were 1234567 requests, 89.5% of them succeeded and 10.5% failed with error 503.",
    "你好，世界！今天天气很好，我们一起去公园散步吧。",
    "机器学习模型需要大量的数据来训练，然后部署到服务器上提供推理服务。",
    "请用一句话总结下面的段落，并回答后面的问题。中文分词和英文分词不一样。",
    "def fibonacci(n: int) -> int:\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    'for (int i = 0; i < 10; ++i) {\n\tprintf("%d\\n", i);\n}\n',
    "import torch\nx = torch.randn(4, 4)\nprint(x @ x.T)  # matrix product\n",
    '{"name": "glm", "layers": [1, 2, 3], "ok": true}\n<html><body>Hi</body></html>\n',
    "Emoji time 😀😃😄 🚀🔥✨ 👍🏽 ❤️ 🇨🇳 🎉 — café naïve résumé Ünïcödé ß ø å",
    "Mixed 中英文 text with code `x = 1` and emoji 🙂 in one line.\r\nWindows newline above.",
    "   leading spaces, trailing tabs\t\t and   multiple   spaces   inside.\n\n\nBlank lines above.",
]


def build_glm_tokenizer(out_dir: Path, corpus: list[str] | None = None, vocab_size: int = 600):
    """Train a GLM-4-layout byte-level BPE tokenizer on `corpus`, save it to `out_dir` and return it."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = list(corpus) if corpus else DEFAULT_CORPUS
    pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(GLM4_PAT_STR), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )

    # 1. Train merges (no special tokens, so regular ids are exactly the BPE ranks).
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre_tokenizer
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=max(vocab_size, 257),
        min_frequency=1,
        initial_alphabet=alphabet,
        show_progress=False,
        special_tokens=[],
    )
    trainer_tok.train_from_iterator(corpus * 3, trainer=trainer)
    trained = trainer_tok.get_vocab()  # token -> id, merged tokens in merge order after the alphabet

    # 2. Ranks: the 256 single bytes first (by byte value), then merged tokens in training order.
    byte_chars = [bytes_to_unicode()[b] for b in range(256)]
    vocab = {ch: i for i, ch in enumerate(byte_chars)}
    for token, _ in sorted(trained.items(), key=lambda kv: kv[1]):
        if token not in vocab:
            vocab[token] = len(vocab)

    # 3. Rebuild the BPE with tiktoken-equivalent merges so HF and chatglm.cpp split identically.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=tiktoken_merges(vocab), fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in GLM4_SPECIAL_TOKENS])
    n = len(vocab)
    assert tok.token_to_id(GLM4_SPECIAL_TOKENS[0]) == n and tok.token_to_id(GLM4_SPECIAL_TOKENS[-1]) == n + 13
    # Like chatglm.cpp's encode(): plain text gets the [gMASK]<sop> prefix (chat templates don't double it).
    tok.post_processor = processors.TemplateProcessing(
        single="[gMASK]:0 <sop>:0 $A:0",
        pair="[gMASK]:0 <sop>:0 $A:0 $B:1",
        special_tokens=[("[gMASK]", n + 2), ("<sop>", n + 4)],
    )

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=GLM4_SPECIAL_TOKENS[1:],
        clean_up_tokenization_spaces=False,
        padding_side="left",
        model_max_length=2048,
    )
    fast.chat_template = GLM4_CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    # Keep the template inside tokenizer_config.json too (older readers look only there).
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = GLM4_CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    return fast


def make_random_glm(
    out_dir: Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    intermediate_size: int = 128,
    seed: int = 0,
    dtype=None,
    tokenizer_dir: Path | None = None,
) -> Path:
    """Save a random GlmForCausalLM (safetensors, config, generation config, GLM-4 tokenizer) to `out_dir`."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, GlmConfig, GlmForCausalLM

    dtype = torch.float32 if dtype is None else dtype
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if hidden_size % num_heads or (hidden_size // num_heads) % 2 or num_heads % num_kv_heads:
        raise ValueError("need hidden_size % num_heads == 0, an even head_dim and num_heads % num_kv_heads == 0")

    if tokenizer_dir is not None:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        tokenizer.save_pretrained(str(out_dir))
        src_cfg = Path(tokenizer_dir) / "tokenizer_config.json"
        if src_cfg.is_file():  # keep chat_template and friends exactly
            (out_dir / "tokenizer_config.json").write_bytes(src_cfg.read_bytes())
    else:
        tokenizer = build_glm_tokenizer(out_dir)
    vocab = len(tokenizer)
    eos = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|user|>", "<|observation|>"])

    config = GlmConfig(
        vocab_size=vocab,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=2048,
        rms_norm_eps=1.5625e-07,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        attention_bias=True,
        tie_word_embeddings=False,
        pad_token_id=eos[0],
        eos_token_id=eos,
        initializer_range=0.02,
    )
    config.architectures = ["GlmForCausalLM"]
    model = _randomized(GlmForCausalLM, config, seed).to(dtype)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=eos[0], bos_token_id=None)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


def _randomized(model_class, config, seed: int):
    """A model of `model_class` with random weights chosen so that conversion mistakes show up."""
    import torch

    torch.manual_seed(seed)
    model = model_class(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # non-trivial norms and biases so conversion mistakes show up
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
            else:  # wide enough logits that greedy picks are far from ties
                p.copy_(0.08 * torch.randn(p.shape, generator=gen))
    return model.eval()


# -- other families: Llama-3 and Qwen2 layouts, for the GGUF (llama.cpp) tests --------------------------

LLAMA3_PAT_STR = GLM4_PAT_STR  # Llama-3 and GLM-4 split text the same way (cl100k style)
QWEN2_PAT_STR = GLM4_PAT_STR.replace(r"\p{N}{1,3}", r"\p{N}")  # single digits
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
QWEN2_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_bpe_tokenizer(
    out_dir: Path,
    pattern: str,
    specials: list[str],
    *,
    eos: str,
    chat_template: str,
    bos: str | None = None,
    ignore_merges: bool = False,
    vocab_size: int = 600,
):
    """A trained byte-level BPE tokenizer with `pattern` as its split regex (Llama-3 or Qwen2 style), saved."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        special_tokens=[],
    )
    tok.train_from_iterator(DEFAULT_CORPUS * 3, trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=eos,
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
    )
    fast.chat_template = chat_template
    fast.save_pretrained(str(out_dir))
    return fast


def make_random_llama(
    out_dir: Path, *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
    intermediate_size: int = 128, seed: int = 0, dtype=None,
) -> Path:  # fmt: skip
    """Save a random LlamaForCausalLM with a Llama-3 style tokenizer and chat template to `out_dir`."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = build_bpe_tokenizer(
        out_dir, LLAMA3_PAT_STR, LLAMA3_SPECIAL_TOKENS, bos="<|begin_of_text|>", eos="<|eot_id|>",
        chat_template=LLAMA3_CHAT_TEMPLATE, ignore_merges=True,
    )  # fmt: skip
    bos, end, *_, eot = tok.convert_tokens_to_ids(LLAMA3_SPECIAL_TOKENS)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        bos_token_id=bos, eos_token_id=[end, eot], pad_token_id=end,
    )  # fmt: skip
    config.architectures = ["LlamaForCausalLM"]
    model = _randomized(LlamaForCausalLM, config, seed)
    if dtype is not None:
        model = model.to(dtype)
    model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=[end, eot], pad_token_id=end)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return Path(out_dir)


def make_random_qwen2(
    out_dir: Path, *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
    intermediate_size: int = 128, seed: int = 0, tie: bool = True,
) -> Path:  # fmt: skip
    """Save a random Qwen2ForCausalLM (qkv biases, tied embeddings) with a ChatML tokenizer to `out_dir`."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tok = build_bpe_tokenizer(
        out_dir, QWEN2_PAT_STR, QWEN2_SPECIAL_TOKENS, eos="<|im_end|>", chat_template=CHATML_TEMPLATE
    )
    end, _, im_end = tok.convert_tokens_to_ids(QWEN2_SPECIAL_TOKENS)
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=tie,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        bos_token_id=end, eos_token_id=[im_end, end], pad_token_id=end,
    )  # fmt: skip
    config.architectures = ["Qwen2ForCausalLM"]
    model = _randomized(Qwen2ForCausalLM, config, seed)
    model.generation_config = GenerationConfig(bos_token_id=None, eos_token_id=[im_end, end], pad_token_id=end)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return Path(out_dir)
