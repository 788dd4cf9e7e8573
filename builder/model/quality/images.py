"""Images of eval prompts for vision-language models, in SWIFT's layout:
`{"messages": [{"role": "user", "content": "<image>What is in it?"}, ...], "images": ["cat.png", ...]}`.

Each entry of `images` is a path relative to the EVAL file (or absolute), or a `data:image/...;base64,` URL;
nothing is fetched from the network. Each `<image>` in the messages' text takes the next image, in order; a
record without any `<image>` gets its images at the start of its first user message (what SWIFT's templates
do). Every image is read, checked to be a PNG/JPEG/GIF/BMP/WebP of at most `MAX_BYTES`, and carried inline as
a data: URL from then on: the build context and the requests hold the bytes, never a path.
"""

from __future__ import annotations

import base64
import binascii
import re
from pathlib import Path

PLACEHOLDER = "<image>"
MAX_BYTES = 20 * 1024 * 1024  # the served llama-server's default LLAMA_MEDIA_MAX_BYTES
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
)
_DATA_URL = re.compile(r"data:(image/[a-z0-9.+-]+);base64,(.*)", re.DOTALL | re.IGNORECASE)


def image_type(data: bytes) -> str | None:
    """The MIME type of image bytes from their signature; None when they are no image this step sends."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return next((mime for magic, mime in _SIGNATURES if data.startswith(magic)), None)


def _decode(ref: str) -> bytes:
    m = _DATA_URL.fullmatch(ref.strip())
    if not m:
        raise ValueError("is not a data:image/<type>;base64,<bytes> URL")
    try:
        return base64.b64decode(m.group(2), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("is a data: URL that is not valid base64") from None


def _read(ref: str, base: Path) -> bytes:
    if re.match(r"[a-z][a-z0-9+.-]*://", ref, re.IGNORECASE):
        raise ValueError(
            "is a network URL, and images are never fetched: give a path relative to the EVAL file, or a "
            "data:image/...;base64 URL"
        )
    path = Path(ref) if Path(ref).is_absolute() else base / ref
    if not path.is_file():
        raise ValueError(f"not found at {path}")
    if path.stat().st_size > MAX_BYTES:
        raise ValueError(f"{path.stat().st_size} bytes, over the limit of {MAX_BYTES} the server takes")
    try:
        return path.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot be read ({e.strerror})") from None


def load_image(ref, base: Path) -> str:
    """One entry of a record's `images` (a path relative to `base`, or a data: URL; SWIFT's {"path": ...} too)
    as a checked data: URL; ValueError saying what is wrong with it."""
    if isinstance(ref, dict):
        ref = ref.get("path") or ref.get("url") or ref.get("bytes")
    if not isinstance(ref, str) or not ref.strip():
        raise ValueError("is not a path or a data: URL")
    data = _decode(ref) if ref.strip().lower().startswith("data:") else _read(ref, base)
    if len(data) > MAX_BYTES:
        raise ValueError(f"{len(data)} bytes, over the limit of {MAX_BYTES} the server takes")
    mime = image_type(data)
    if mime is None:
        raise ValueError("is not a PNG, JPEG, GIF, BMP or WebP image")
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def load_images(refs, base: Path) -> list[str]:
    """A record's `images` as data: URLs; ValueError naming the image (1-based) and the reason."""
    if not isinstance(refs, list):
        raise ValueError("`images` is not a list")
    out = []
    for i, ref in enumerate(refs, 1):
        try:
            out.append(load_image(ref, base))
        except ValueError as e:
            shown = ref if isinstance(ref, str) and not ref.lower().startswith("data:") else "data: URL"
            raise ValueError(f"image {i} ({shown!r}) {e}") from None
    return out


def _parts(text: str, urls: list[str]) -> list[dict]:
    """Text with `<image>` placeholders as OpenAI content parts, each placeholder taking the next URL."""
    parts = []
    for i, piece in enumerate(text.split(PLACEHOLDER)):
        if i:
            parts.append({"type": "image_url", "image_url": {"url": urls.pop(0)}})
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def with_images(messages: list[dict], urls: list[str]) -> list[dict]:
    """The messages with each `<image>` replaced by the next image as an `image_url` part (no `<image>` at all:
    every image at the start of the first user message); ValueError when the counts differ."""
    count = sum(m["content"].count(PLACEHOLDER) for m in messages if isinstance(m["content"], str))
    if count == 0:
        first = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
        if first is None:
            raise ValueError("images but no user message to show them in")
        messages = list(messages)
        messages[first] = {**messages[first], "content": PLACEHOLDER * len(urls) + messages[first]["content"]}
    elif count != len(urls):
        raise ValueError(f"{count} {PLACEHOLDER} placeholder(s) for {len(urls)} image(s)")
    left = list(urls)
    out = []
    for m in messages:
        has = isinstance(m["content"], str) and PLACEHOLDER in m["content"]
        out.append({**m, "content": _parts(m["content"], left)} if has else m)
    return out


def content_text(content) -> str:
    """Message content as text, an image part shown as `<image>` (for the report)."""
    if isinstance(content, str):
        return content
    return "".join(PLACEHOLDER if p.get("type") == "image_url" else p.get("text", "") for p in content)
