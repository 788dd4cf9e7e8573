"""Eval prompts and calibration text from the files people fine-tune with.

Accepted as they are, one record per JSONL line (or one JSON list): the formats ms-swift's
AutoPreprocessor reads and the chat format peft / TRL users keep their data in:

- messages: `{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}`
- ShareGPT: `{"system": ..., "conversations": [{"from": "human"|"gpt", "value": ...}]}`, and SWIFT's
  `{"system": ..., "conversation": [{"human": ..., "assistant": ...}]}`
- query/response: `{"system": ..., "query": ..., "response": ..., "history": [[q, r], ...]}`
  (also `prompt`/`completion`, `question`/`answer`)
- Alpaca: `{"system": ..., "instruction": ..., "input": ..., "output": ...}`
- plain text: `{"text": ...}` (calibration text only; it has no question to ask)

An eval prompt is the conversation up to its last user turn; the assistant turn after it, or an
explicit `"expected"` field, is the expected answer. A record with SWIFT's `"images"` list is an image
prompt for a vision-language model (builder/model/quality/images.py: `<image>` placeholders, paths
relative to the file or data: URLs).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from builder.errors import BuilderError
from builder.files import write_atomic
from builder.model.quality.images import content_text, load_images, with_images

USER_ROLES = {"user", "human"}
ASSISTANT_ROLES = {"assistant", "gpt", "bot", "model"}
QUERY_KEYS = ("query", "prompt", "question")
RESPONSE_KEYS = ("response", "completion", "answer")
BUILTIN_TEXT = Path(__file__).with_name("sample.txt")


@dataclass(frozen=True)
class EvalPrompt:
    messages: tuple[dict, ...]  # chat messages, the last one the user's
    expected: str | None = None
    images: tuple[str, ...] = ()  # data: URLs of the images its messages show (image_url parts), in order

    @property
    def question(self) -> str:
        return content_text(self.messages[-1]["content"])


# A small default set: facts, arithmetic, instructions, code, a non-English prompt.
BUILTIN_PROMPTS = tuple(
    EvalPrompt(({"role": "user", "content": q},), expected)
    for q, expected in (
        ("What is the capital of France?", "Paris"),
        ("What is 12 plus 30?", "42"),
        ("Name the three primary colours.", None),
        ("Write a Python function that returns the square of a number.", "def"),
        ("Translate 'good morning' into Spanish.", "Buenos"),
        ("Write one sentence about the sea.", None),
    )
)


def _text(content) -> str:
    """Message content as text: a string, or the text parts of a multimodal content list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def _role(raw: str) -> str:
    raw = str(raw).lower()
    if raw in USER_ROLES:
        return "user"
    if raw in ASSISTANT_ROLES:
        return "assistant"
    return raw  # system, tool, ...


def _from_turns(turns: list) -> list[dict]:
    """ShareGPT turns ({from, value} or {role, content}) and SWIFT's {human, assistant} pairs."""
    out: list[dict] = []
    for t in turns:
        if not isinstance(t, dict):
            raise ValueError("a conversation turn is not an object")
        if "human" in t or ("assistant" in t and "role" not in t and "from" not in t):
            out.append({"role": "user", "content": _text(t.get("human"))})
            if t.get("assistant") is not None:
                out.append({"role": "assistant", "content": _text(t["assistant"])})
            continue
        role = t.get("role", t.get("from"))
        if role is None:
            raise ValueError("a conversation turn has neither role nor from")
        out.append({"role": _role(role), "content": _text(t.get("content", t.get("value")))})
    return out


def _first(record: dict, keys: tuple[str, ...]):
    return next((record[k] for k in keys if record.get(k) is not None), None)


def record_messages(record: dict) -> list[dict] | None:
    """The conversation of one data record as chat messages; None for a plain-text record."""
    if "messages" in record:
        messages = _from_turns(record["messages"])
    elif "conversations" in record or "conversation" in record:
        messages = _from_turns(record.get("conversations") or record.get("conversation") or [])
    elif _first(record, QUERY_KEYS) is not None or "instruction" in record:
        query = _first(record, QUERY_KEYS)
        if query is None:
            query = "\n".join(s for s in (record.get("instruction"), record.get("input")) if s)
        messages = []
        for pair in record.get("history") or []:
            messages += [{"role": "user", "content": _text(pair[0])}, {"role": "assistant", "content": _text(pair[1])}]
        messages.append({"role": "user", "content": _text(query)})
        response = _first(record, (*RESPONSE_KEYS, "output"))
        if response is not None:
            messages.append({"role": "assistant", "content": _text(response)})
    elif "text" in record:
        return None
    else:
        raise ValueError("none of messages, conversations, query/response, instruction/output or text")
    if record.get("system") and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": _text(record["system"])})
    return messages


def read_numbered(path: Path) -> list[tuple[str, dict]]:
    """The records of a JSONL file (or of a JSON file holding a list), each a JSON object, with where it is
    ("line 3" of a JSONL file, "record 3" of a JSON list)."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BuilderError(f"cannot read {path}: {e}") from None
    if raw.lstrip().startswith("["):
        try:
            records = json.loads(raw)
        except json.JSONDecodeError as e:
            raise BuilderError(f"{path} is not valid JSON ({e}); give JSONL, one record per line") from None
        numbered = [(f"record {n}", r) for n, r in enumerate(records, 1)]
    else:
        numbered = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                numbered.append((f"line {n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise BuilderError(f"{path} line {n} is not JSON ({e.msg}); give JSONL, one record per line") from None
    for n, (_, record) in enumerate(numbered, 1):
        if not isinstance(record, dict):
            raise BuilderError(f"{path} record {n} is not a JSON object")
    return numbered


def read_records(path: Path) -> list[dict]:
    """The records of a JSONL file (or of a JSON file holding a list), each a JSON object."""
    return [r for _, r in read_numbered(path)]


def _prompt_of(messages: list[dict], expected: str | None, images: tuple[str, ...] = ()) -> EvalPrompt | None:
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last_user is None:
        return None
    after = messages[last_user + 1 :]
    if expected is None and after and after[0]["role"] == "assistant":
        expected = content_text(after[0]["content"])
    return EvalPrompt(tuple(messages[: last_user + 1]), expected, images)


def _image_prompt(path: Path, where: str, record: dict, messages: list[dict]) -> EvalPrompt | None:
    """The prompt of a record with SWIFT's `images`: each image read and checked, `<image>` placeholders as
    image_url parts; BuilderError naming the line and the image."""
    try:
        urls = load_images(record["images"], Path(path).parent)
        messages = with_images(messages, urls)
    except ValueError as e:
        raise BuilderError(f"EVAL file {path} {where}: {e}") from None
    return _prompt_of(messages, record.get("expected"), tuple(urls))


def load_eval(path: Path | None, limit: int = 32) -> list[EvalPrompt]:
    """Eval prompts from `path` (any format above; at most `limit`), else the built-in set."""
    if path is None:
        return list(BUILTIN_PROMPTS)
    prompts = []
    for n, (where, record) in enumerate(read_numbered(path), 1):
        try:
            messages = record_messages(record)
        except (ValueError, TypeError, IndexError, AttributeError) as e:
            raise BuilderError(
                f"EVAL file {path} record {n}: {e}; see `python -m builder.model.quality --help`"
            ) from None
        if messages and record.get("images"):
            prompt = _image_prompt(path, where, record, messages)
        else:
            prompt = _prompt_of(messages, record.get("expected")) if messages else None
        if prompt is not None:
            prompts.append(prompt)
    if not prompts:
        raise BuilderError(f"EVAL file {path} holds no record with a user message to ask")
    return prompts[:limit]


def copy_eval(source: Path, dest: Path) -> Path:
    """EVAL into a build context: the file as it is, or, when records show images, each record with its
    `images` read, checked and written inline as data: URLs (the build never reads a path outside the
    context, nor fetches anything)."""
    import shutil

    source, dest = Path(source), Path(dest)
    numbered = read_numbered(source)
    if not any(r.get("images") for _, r in numbered):
        shutil.copy2(source, dest)
        return dest
    lines = []
    for where, record in numbered:
        if record.get("images"):
            try:
                record = {**record, "images": load_images(record["images"], source.parent)}
            except ValueError as e:
                raise BuilderError(f"EVAL file {source} {where}: {e}") from None
        lines.append(json.dumps(record, ensure_ascii=False))
    return write_atomic(dest, "\n".join(lines) + "\n")


def render_messages(messages: list[dict]) -> str:
    """A conversation as plain text (for calibration and KL text: the same words the model sees)."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def calibration_text(path: Path) -> str:
    """Text for the importance matrix (or the KL sample): a text file as it is, JSONL/JSON data rendered."""
    path = Path(path)
    if path.suffix.lower() not in (".jsonl", ".json"):
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise BuilderError(f"cannot read calibration text {path}: {e}") from None
    parts = []
    for n, record in enumerate(read_records(path), 1):
        try:
            messages = record_messages(record)
        except (ValueError, TypeError, IndexError, AttributeError) as e:
            raise BuilderError(f"{path} record {n}: {e}") from None
        parts.append(_text(record.get("text")) if messages is None else render_messages(messages))
    return "\n\n".join(parts)


def builtin_text() -> str:
    return BUILTIN_TEXT.read_text(encoding="utf-8")
