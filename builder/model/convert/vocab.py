"""Tokenizer data for chatglm.cpp, read from files only (no tokenizer code from the model folder runs).

* ChatGLM2/3: the sentencepiece `tokenizer.model`, stored verbatim; ChatGLM3 is told from ChatGLM2 by
  its `<|system|>` role token (which only the tokenizer's text files mention).
* GLM-4: a tiktoken vocab (`base64(bytes) rank` per line, ranks 0..N-1); chatglm.cpp puts the 14
  GLM-4 special tokens at N..N+13. Original folders ship it as `tokenizer.model`; transformers-native
  (-hf) folders only have a byte-level BPE `tokenizer.json`, from which the same text is rebuilt.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

from builder.errors import BuilderError

GLM4_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
]

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

_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]*={0,2} \d+$")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable unicode char map, the alphabet of byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _byte_decoder() -> dict[str, int]:
    """Inverse of bytes_to_unicode: vocabulary characters back to bytes."""
    return {c: b for b, c in bytes_to_unicode().items()}


def is_tiktoken_file(path: Path) -> bool:
    """True when `path` looks like a tiktoken vocab (text lines of `base64 rank`), not a sentencepiece proto."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    lines = [ln for ln in head.split(b"\n")[:-1] if ln.strip()]  # drop a possibly cut last line
    return bool(lines) and all(_TIKTOKEN_LINE.match(ln.strip()) for ln in lines)


def tiktoken_vocab_size(vocab_text: bytes) -> int:
    """Number of regular tokens in tiktoken vocab text; checks ranks are exactly 0..N-1 as chatglm.cpp needs."""
    ranks = []
    for ln in vocab_text.split(b"\n"):
        if not ln.strip():
            continue
        parts = ln.split()
        if len(parts) != 2:
            raise BuilderError(f"bad tiktoken vocab line {ln[:60]!r}; the GLM-4 tokenizer.model looks corrupt.")
        ranks.append(int(parts[1]))
    if sorted(ranks) != list(range(len(ranks))):
        raise BuilderError(
            "the tiktoken vocab ranks are not exactly 0..N-1, so chatglm.cpp would give special tokens the "
            "wrong ids; use the original GLM-4 tokenizer files."
        )
    return len(ranks)


def vocab_from_tokenizer_json(path: Path) -> tuple[bytes, int, list[str]]:
    """Rebuild GLM-4's tiktoken vocab text from a byte-level BPE tokenizer.json.

    Returns (vocab_text, N, warnings). Raises BuilderError when chatglm.cpp could not reproduce the ids.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BuilderError(f"cannot read {path} ({e}); re-save the tokenizer with save_pretrained.") from e
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise BuilderError(
            f"{path} is not a BPE tokenizer; chatglm.cpp's GLM-4 runtime needs GLM-4's byte-level BPE tokenizer."
        )
    dec = _byte_decoder()
    vocab: dict[str, int] = model["vocab"]
    added = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
    regular = {tok: i for tok, i in vocab.items() if tok not in added}
    n = len(regular)
    if sorted(regular.values()) != list(range(n)):
        raise BuilderError(
            f"{path}: regular token ids are not exactly 0..{n - 1}; chatglm.cpp assigns ids by rank, so "
            "this tokenizer cannot be reproduced. Use GLM-4's own tokenizer."
        )
    lines: list[bytes] = [b""] * n
    for tok, i in regular.items():
        try:
            raw = bytes(dec[ch] for ch in tok)
        except KeyError:
            raise BuilderError(
                f"{path}: token {tok!r} is not byte-level BPE; chatglm.cpp's GLM-4 runtime needs GLM-4's "
                "byte-level tokenizer."
            ) from None
        lines[i] = base64.b64encode(raw) + b" " + str(i).encode()
    if len(set(lines)) != n:
        raise BuilderError(f"{path}: two tokens decode to the same bytes; not a GLM-4 style tokenizer.")
    bad = [t for k, t in enumerate(GLM4_SPECIAL_TOKENS) if added.get(t) != n + k]
    if bad:
        raise BuilderError(
            f"{path}: GLM-4 special tokens must sit at ids {n}..{n + 13} in GLM-4's order; "
            f"wrong or missing: {', '.join(bad)}. chatglm.cpp would use different ids."
        )
    warnings = []
    extra = sorted(t for t, i in added.items() if t not in GLM4_SPECIAL_TOKENS)
    if extra:
        warnings.append(f"added tokens unknown to chatglm.cpp are ignored: {', '.join(extra[:8])}")
    return b"\n".join(lines) + b"\n", n, warnings


def glm4_vocab(model_dir: Path) -> tuple[bytes, int, list[str]]:
    """GLM-4 tiktoken vocab text of a folder: its tiktoken tokenizer.model, else rebuilt from tokenizer.json."""
    tm = model_dir / "tokenizer.model"
    if tm.is_file() and is_tiktoken_file(tm):
        text = tm.read_bytes()
        return text, tiktoken_vocab_size(text), []
    tj = model_dir / "tokenizer.json"
    if tj.is_file():
        return vocab_from_tokenizer_json(tj)
    raise BuilderError(
        f"{model_dir} has no GLM-4 tokenizer (tokenizer.model in tiktoken format or tokenizer.json); "
        "copy the tokenizer files from the base model into the folder."
    )


def sentencepiece_proto(model_dir: Path) -> bytes:
    """The serialized sentencepiece model of a ChatGLM2/3 folder (validated when sentencepiece is installed)."""
    tm = model_dir / "tokenizer.model"
    if not tm.is_file():
        raise BuilderError(
            f"{model_dir} has no tokenizer.model; copy it (and tokenizer_config.json) from the base ChatGLM model."
        )
    data = tm.read_bytes()
    try:
        import sentencepiece as spm
    except ImportError:
        return data
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(data)
    except Exception as e:  # noqa: BLE001
        raise BuilderError(f"{tm} is not a sentencepiece model ({e}).") from e
    return sp.serialized_model_proto()


def has_system_role(model_dir: Path, config: dict) -> bool:
    """ChatGLM3 (with <|system|>) vs ChatGLM2, judged from the folder's text files without running them."""
    for name in ("tokenization_chatglm.py", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"):
        p = model_dir / name
        if p.is_file():
            try:
                if "<|system|>" in p.read_text(encoding="utf-8", errors="replace"):
                    return True
            except OSError:
                pass
    hint = " ".join(str(config.get(k, "")) for k in ("_name_or_path", "name_or_path")).lower()
    if "chatglm2" in hint:
        return False
    if "chatglm3" in hint:
        return True
    # Files present but none mention <|system|>: ChatGLM2. Nothing to go on: assume the newer ChatGLM3.
    return not any((model_dir / n).is_file() for n in ("tokenization_chatglm.py", "tokenizer_config.json"))


def tiktoken_merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
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
