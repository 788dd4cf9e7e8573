"""Tiny, random, transformers-native GLM model folders built in code (no hub, no downloads).

`build_glm_tokenizer` makes a byte-level BPE tokenizer laid out exactly like GLM-4's tiktoken
tokenizer (regular ranks 0..N-1, the 14 GLM-4 special tokens at N..N+13, GLM-4's split regex and
chat template), so chatglm.cpp's ChatGLM4Tokenizer reproduces its ids after GGML conversion.
`make_random_glm` saves a random `GlmForCausalLM` with that tokenizer: tests, demos and benches
import both.
"""

from __future__ import annotations

import json
from pathlib import Path

from builder.model.convert.vocab import GLM4_SPECIAL_TOKENS, bytes_to_unicode  # noqa: F401 (re-exported)

# GLM-4's tiktoken split regex (cl100k style, digits in runs of 1..3), as in tokenization_chatglm.py.
GLM4_PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# GLM-4's chat format as chatglm.cpp's ChatGLM4Tokenizer::apply_chat_template builds it:
# [gMASK]<sop> then <|role|>\n{content} per message, then <|assistant|> to prompt a reply.
GLM4_CHAT_TEMPLATE = (
    "[gMASK]<sop>"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
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


def _tiktoken_merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every (left, right) split of every token, ordered by the merged token's rank (tiktoken's BPE rule)."""
    merges = []
    for token, rank in vocab.items():
        if len(token) < 2:
            continue
        local = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab]
        local.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        merges.extend((left, right, rank) for left, right in local)
    merges.sort(key=lambda m: m[2])
    return [(left, right) for left, right, _ in merges]


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
    tok = Tokenizer(models.BPE(vocab=vocab, merges=_tiktoken_merges(vocab), fuse_unk=False, byte_fallback=False))
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
    torch.manual_seed(seed)
    model = GlmForCausalLM(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # non-trivial norms and biases so conversion mistakes show up
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
            else:  # wide enough logits that greedy picks are far from ties
                p.copy_(0.08 * torch.randn(p.shape, generator=gen))
    model = model.to(dtype).eval()
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=eos[0], bos_token_id=None)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir
