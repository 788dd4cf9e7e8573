"""Original THUDM ChatGLM folders for llama.cpp's converter, without their tokenizer code.

llama.cpp's converter reads a ChatGLM folder's tokenizer through transformers with the folder's own
tokenization_chatglm.py (trust_remote_code), which builder never runs. For GLM-4 originals the
tokenizer is a tiktoken vocab (`tokenizer.model`): a shadow folder of links to the weights and
configs, plus a tokenizer.json built from that vocab (GLM-4's split regex, its 14 special tokens
after the N regular ones), gives the converter the same tokens through transformers' own fast
tokenizer. ChatGLM2/3 keep their sentencepiece tokenizer behind code only, so they are refused
with what to use instead. Every other folder is converted as it is.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from builder.errors import BuilderError
from builder.model.convert.vocab import (
    GLM4_CHAT_TEMPLATE,
    GLM4_PAT_STR,
    GLM4_SPECIAL_TOKENS,
    bytes_to_unicode,
    is_tiktoken_file,
    tiktoken_merges,
    tiktoken_vocab_size,
)

TOKENIZER_FILES = {"tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}


def converter_folder(model: Path, work: Path) -> Path:
    """The folder to hand the converter: `model` itself, or a shadow of a GLM-4 original."""
    config = json.loads((model / "config.json").read_text())
    if config.get("model_type") != "chatglm" or (model / "tokenizer.json").is_file():
        return model
    tm = model / "tokenizer.model"
    if not (tm.is_file() and is_tiktoken_file(tm)):
        raise BuilderError(
            f"{model} is a ChatGLM2/3 original folder: its sentencepiece tokenizer is defined by the folder's own "
            "code, which builder does not run, so llama.cpp's converter cannot read it. Serve it with "
            "BACKEND=chatglmcpp (chatglm.cpp reads the tokenizer file itself), vllm or xinference."
        )
    shadow = work / "glm4-original"
    shadow.mkdir()
    for f in model.iterdir():
        if f.is_file() and f.name not in TOKENIZER_FILES | {"config.json"} and f.suffix != ".py":
            (shadow / f.name).symlink_to(f.resolve())
    # The converter reads hparams["vocab_size"] even when padded_vocab_size is there (an eager default).
    config.setdefault("vocab_size", config.get("padded_vocab_size"))
    (shadow / "config.json").write_text(json.dumps(config, indent=2))
    _write_glm4_tokenizer(tm.read_bytes(), model, shadow)
    return shadow


def _write_glm4_tokenizer(vocab_text: bytes, model: Path, out: Path) -> None:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    n = tiktoken_vocab_size(vocab_text)
    byte_chars = bytes_to_unicode()
    vocab: dict[str, int] = {}
    for line in vocab_text.split(b"\n"):
        if line.strip():
            token, rank = line.split()
            vocab["".join(byte_chars[b] for b in base64.b64decode(token))] = int(rank)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=tiktoken_merges(vocab), fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(GLM4_PAT_STR), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in GLM4_SPECIAL_TOKENS])
    if tok.token_to_id(GLM4_SPECIAL_TOKENS[0]) != n:
        raise BuilderError(f"{model}/tokenizer.model: GLM-4 special tokens would not start at id {n}")
    tok.save(str(out / "tokenizer.json"))
    original = {}
    if (model / "tokenizer_config.json").is_file():
        original = json.loads((model / "tokenizer_config.json").read_text())
    config = {k: v for k, v in original.items() if k not in ("auto_map", "tokenizer_class", "added_tokens_decoder")}
    config.update(
        tokenizer_class="PreTrainedTokenizerFast",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
    )
    config.setdefault("chat_template", GLM4_CHAT_TEMPLATE)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
