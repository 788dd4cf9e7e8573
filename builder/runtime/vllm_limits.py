"""A bound on the work one request may ask of vLLM's OpenAI server: an ASGI middleware.

vLLM takes it as `--middleware builder.runtime.vllm_limits.RequestLimits` (vllm_boot adds the flag): for a
class, vLLM calls `app.add_middleware(RequestLimits)`, which builds it with the app alone, so the limits
come from the environment:

- LLM_MAX_BODY_BYTES (default 4 MiB): a larger body is refused with 413 before more than that is held in
  memory (a declared Content-Length at once; a chunked body once it passes the limit);
- LLM_MAX_N (default 16): `n`, `best_of`, and the sequences a batch asks for (prompts x n on
  /v1/completions, conversations x n on /v1/chat/completions/batch, items on /generative_scoring);
- LLM_MAX_TOKENS (default 4096): `max_tokens`, `max_completion_tokens`, `max_output_tokens`, `min_tokens`;
- LLM_MAX_LOGPROBS (default 20, vLLM's --max-logprobs, which vLLM enforces too): `logprobs` (a number),
  `top_logprobs`, `prompt_logprobs`, so that the refusal names the variable.

0 turns a limit off (for LLM_MAX_LOGPROBS, as in vLLM: -1; 0 allows none). A refusal is vLLM's own
error shape, `{"error": {"message", "type", "param", "code"}}`, with a message that names the limit and
the variable that raises it. Everything else, malformed JSON
included, reaches vLLM untouched (the buffered body is handed on as one message), so vLLM's own
validation answers it. Plain ASGI and the standard library only: it needs nothing from Starlette.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass
from http import HTTPStatus

MIB = 1024 * 1024

# name -> (default, what it bounds): the container's environment; 0 turns that limit off.
LIMIT_ENV = {
    "LLM_MAX_BODY_BYTES": (4 * MIB, "bytes in a request body"),
    "LLM_MAX_N": (16, "sequences one request generates (n, best_of, prompts x n)"),
    "LLM_MAX_TOKENS": (4096, "tokens one sequence may be asked to generate"),
    "LLM_MAX_LOGPROBS": (20, "log probabilities per token"),
}
# vLLM's own --max-logprobs, which the image passes it too: -1 is no limit there, 0 no log probabilities.
NEGATIVE_OFF = {"LLM_MAX_LOGPROBS"}

# The routes that start generation in vLLM 0.32/0.33 (tests/runtime/test_vllm_limits_server.py checks the
# list against a real vLLM server's routes when one is installed). /invocations is SageMaker's alias that hands
# the body to completions, chat or responses by its shape. /generative_scoring runs one prompt per item.
GENERATION_ROUTES = frozenset(
    {
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/chat/completions/batch",
        "/v1/responses",
        "/v1/messages",
        "/inference/v1/generate",
        "/invocations",
        "/generative_scoring",
    }
)
SEQUENCE_FIELDS = ("n", "best_of")
TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens", "min_tokens")
LOGPROB_FIELDS = ("logprobs", "top_logprobs", "prompt_logprobs")  # chat's `logprobs: true` is a bool: not counted

# A refused body still being sent is read and dropped (never kept) for at most this long and this much,
# so the client gets the answer instead of a reset connection; then the connection is closed.
DRAIN_SECONDS = 5.0
DRAIN_BYTES = 64 * MIB

# The error `type` per status, in the style of vLLM's own ("BadRequestError"), the same on every Python
# (HTTPStatus(413).phrase changed between versions).
ERROR_TYPES = {400: "BadRequestError", 413: "RequestTooLargeError"}


@dataclass(frozen=True)
class Limits:
    """The bounds, each 0 for none."""

    max_body_bytes: int = LIMIT_ENV["LLM_MAX_BODY_BYTES"][0]
    max_n: int = LIMIT_ENV["LLM_MAX_N"][0]
    max_tokens: int = LIMIT_ENV["LLM_MAX_TOKENS"][0]
    max_logprobs: int = LIMIT_ENV["LLM_MAX_LOGPROBS"][0]

    @classmethod
    def from_env(cls, env: dict[str, str]) -> Limits:
        """The limits set in `env` (unset or empty: the default); ValueError names a bad one."""
        values = {}
        for name, (default, what) in LIMIT_ENV.items():
            raw = (env.get(name) or "").strip()
            if raw and not (raw.isascii() and (raw.isdigit() or (name in NEGATIVE_OFF and raw == "-1"))):
                off = "-1" if name in NEGATIVE_OFF else "0"
                raise ValueError(f"{name}={raw!r}: give a whole number of {what} ({off}: no limit)")
            values[name.removeprefix("LLM_").lower()] = int(raw) if raw else default
        return cls(**values)


class Refusal(Exception):
    """A request over a limit: the HTTP status, the message and the field it is about."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def quantity(value) -> float | None:
    """The number a field holds as vLLM's validation would read it, else None (left to vLLM to refuse):
    pydantic's lax mode takes numeric strings ("1000") and whole floats (1000.0) for an int field. A bool
    is not counted (True reads as 1, under any limit)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def big_int(digits: str) -> int | float:
    """json's int parser: a number with more digits than any limit reads as infinity, without building
    it (CPython refuses ints of over 4300 digits, which would make the whole body unreadable here)."""
    return int(digits) if len(digits) <= 30 else float("inf")


# field -> what one entry of it is, for a body that asks for several prompts at once
BATCH_FIELDS = {"prompt": "prompts", "messages": "conversations", "items": "items"}


def batch_size(body: dict) -> tuple[str, int] | None:
    """(field, how many) for a body that asks for several prompts at once: a list of prompts (strings or
    token-id lists; a flat list of ids is one prompt), a list of conversations, or a list of items to
    score (each one prompt)."""
    for field in ("prompt", "items"):
        value = body.get(field)
        if isinstance(value, list) and value and not all(isinstance(p, int) for p in value):
            return field, len(value)
    messages = body.get("messages")
    if isinstance(messages, list) and messages and all(isinstance(m, list) for m in messages):
        return "messages", len(messages)
    return None


def over_limit(name: str, value: float, limit: int, what: str, env: str) -> Refusal:
    shown = "a number too large to read" if value == float("inf") else f"{value:g}"
    off = "-1" if env in NEGATIVE_OFF else "0"
    return Refusal(
        400,
        f"{name} is {shown}, over this server's limit of {limit} {what}; "
        f"the server's {env} environment variable raises it ({off}: no limit).",
        name,
    )


def _sequences(part: dict, limits: Limits) -> int:
    """The sequences each prompt of `part` asks for (n / best_of), after checking each field."""
    most = 1
    for name in SEQUENCE_FIELDS:
        value = quantity(part.get(name))
        if value is None:
            continue
        if limits.max_n and value > limits.max_n:
            raise over_limit(name, value, limits.max_n, "sequences per request", "LLM_MAX_N")
        if value == value and value != float("inf"):
            most = max(most, int(value))
    return most


def check_body(body, limits: Limits) -> None:
    """Raise a Refusal for a generation request over a limit; anything else (not an object, no such
    fields, values vLLM itself will refuse) passes."""
    if not isinstance(body, dict):
        return
    parts = [body]
    if isinstance(body.get("sampling_params"), dict):  # /inference/v1/generate
        parts.append(body["sampling_params"])
    sequences = max(_sequences(part, limits) for part in parts)
    for part in parts:
        for name in TOKEN_FIELDS:
            value = quantity(part.get(name))
            if value is not None and limits.max_tokens and value > limits.max_tokens:
                raise over_limit(name, value, limits.max_tokens, "tokens per sequence", "LLM_MAX_TOKENS")
        for name in LOGPROB_FIELDS:
            value = quantity(part.get(name))
            if value is not None and limits.max_logprobs >= 0 and value > limits.max_logprobs:
                raise over_limit(name, value, limits.max_logprobs, "log probabilities per token", "LLM_MAX_LOGPROBS")
    batch = batch_size(body)
    if batch and limits.max_n and batch[1] * sequences > limits.max_n:
        field, count = batch
        raise Refusal(
            400,
            f"{field} holds {count} {BATCH_FIELDS[field]} x {sequences} "
            f"sequences each = {count * sequences}, over this server's limit of {limits.max_n} sequences per "
            "request; send fewer at once, or raise the server's LLM_MAX_N environment variable (0: no limit).",
            field,
        )


def route_path(scope) -> str:
    """The path the app routes on (without the proxy's root path) and without a trailing slash."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and (path == root or path.startswith(root + "/")):
        path = path[len(root) :]
    return path.rstrip("/") or "/"


def declared_length(scope) -> int | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == b"content-length" and value.strip().isdigit():
            return int(value)
    return None


def expects_continue(scope) -> bool:
    return any(k.lower() == b"expect" and v.lower() == b"100-continue" for k, v in scope.get("headers", ()))


async def send_error(send, error: Refusal, close: bool = False) -> None:
    kind = ERROR_TYPES.get(error.status) or HTTPStatus(error.status).phrase
    body = json.dumps(
        {"error": {"message": error.message, "type": kind, "param": error.param, "code": error.status}}
    ).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def drain(receive, more: bool) -> None:
    """Read and drop what is left of a refused body, within DRAIN_SECONDS and DRAIN_BYTES."""
    loop = asyncio.get_running_loop()
    deadline, dropped = loop.time() + DRAIN_SECONDS, 0
    while more and dropped < DRAIN_BYTES:
        left = deadline - loop.time()
        if left <= 0:
            return
        try:
            message = await asyncio.wait_for(receive(), left)
        except asyncio.TimeoutError:
            return
        if message["type"] != "http.request":
            return
        dropped += len(message.get("body", b""))
        more = message.get("more_body", False)


class RequestLimits:
    """ASGI middleware: the request body is read (up to LLM_MAX_BODY_BYTES, never more), a generation
    request's JSON is checked against the limits, and the app gets the same bytes as one message, with the
    connection's later messages (a disconnect) passed on as they come."""

    def __init__(self, app, limits: Limits | None = None):
        self.app = app
        self.limits = limits if limits is not None else Limits.from_env(dict(os.environ))

    def too_large(self) -> Refusal:
        return Refusal(
            413,
            f"request body over this server's limit of {self.limits.max_body_bytes} bytes; the server's "
            "LLM_MAX_BODY_BYTES environment variable raises it (0: no limit).",
        )

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limits.max_body_bytes
        declared = declared_length(scope)
        if limit and declared is not None and declared > limit:
            # With `Expect: 100-continue` the client waits to be asked before sending: it never is.
            if not expects_continue(scope):
                await drain(receive, True)
            return await send_error(send, self.too_large(), close=True)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left before the body was complete
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            more = message.get("more_body", False)
            if limit and size > limit:
                await drain(receive, more)
                return await send_error(send, self.too_large(), close=True)
            chunks.append(chunk)
        body = b"".join(chunks)
        if body and route_path(scope) in GENERATION_ROUTES:
            try:
                check_body(self.parse(body), self.limits)
            except Refusal as refusal:
                return await send_error(send, refusal)
        await self.app(scope, replay(body, receive), send)

    @staticmethod
    def parse(body: bytes):
        """The body as vLLM will read it (json.loads on the bytes: UTF-8/16/32 and a BOM alike); None when
        it is not JSON, which vLLM then refuses itself."""
        try:
            return json.loads(body, parse_int=big_int)
        except (ValueError, RecursionError):
            return None


def replay(body: bytes, receive):
    """A receive() that gives the buffered body first, then whatever the connection sends next."""
    given = False

    async def replayed():
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
