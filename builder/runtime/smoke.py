"""API smoke check and a tiny client for any OpenAI-compatible server (ours, vLLM, Xinference).

Standard library only (urllib), so it runs on a bare host or in any image. Only plain OpenAI API
behaviour is checked, nothing specific to `builder serve`:

* GET  /v1/models lists the model;
* POST /v1/completions returns choices[0].text (a string) and usage;
* POST /v1/chat/completions returns an assistant message;
* the same with "stream": true returns SSE `data:` chunks with a finish_reason, ending `data: [DONE]`.

`chat()` / `complete()` are the reusable client: ask a question, get the answer text.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Optional


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a local server this process starts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SmokeError(RuntimeError):
    """The server answered something an OpenAI-compatible server should not."""


def base_url(url: str) -> str:
    """`http://h:p`, `http://h:p/` and `http://h:p/v1` all mean the same server."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def _headers(api_key: Optional[str], stream: bool = False) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream" if stream else "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def _open(url: str, path: str, body: Optional[dict], api_key: Optional[str], timeout: float, stream: bool = False):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        base_url(url) + path, data=data, headers=_headers(api_key, stream), method="GET" if body is None else "POST"
    )
    try:
        return urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        detail = e.read()[:500].decode("utf-8", "replace")
        raise SmokeError(f"{req.method} {path}: HTTP {e.code}: {detail}") from None
    except urllib.error.URLError as e:
        raise SmokeError(f"{req.method} {path}: cannot connect to {base_url(url)}: {e.reason}") from None
    except (TimeoutError, OSError) as e:
        raise SmokeError(f"{req.method} {path}: {e}") from None


def request_json(
    url: str, path: str, body: Optional[dict] = None, *, api_key: Optional[str] = None, timeout: float = 120.0
) -> dict:
    """GET (body None) or POST JSON to `url + path`; the decoded JSON object, or SmokeError."""
    with _open(url, path, body, api_key, timeout) as r:
        raw = r.read()
    try:
        obj = json.loads(raw)
    except ValueError:
        raise SmokeError(f"{path}: response is not JSON: {raw[:200]!r}") from None
    if not isinstance(obj, dict):
        raise SmokeError(f"{path}: response is not a JSON object: {raw[:200]!r}")
    return obj


def stream_events(
    url: str, path: str, body: dict, *, api_key: Optional[str] = None, timeout: float = 120.0
) -> Iterator[str]:
    """POST with "stream": true and yield each SSE `data:` payload as text ("[DONE]" included)."""
    with _open(url, path, {**body, "stream": True}, api_key, timeout, stream=True) as r:
        ctype = r.headers.get("Content-Type", "")
        if "text/event-stream" not in ctype:
            raise SmokeError(f"{path}: streaming Content-Type is {ctype!r}, not text/event-stream")
        for raw in r:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if line.startswith("data:"):
                yield line[5:].lstrip(" ")


def list_models(url: str, *, api_key: Optional[str] = None, timeout: float = 30.0) -> list[str]:
    obj = request_json(url, "/v1/models", api_key=api_key, timeout=timeout)
    data = obj.get("data")
    if not isinstance(data, list):
        raise SmokeError(f"/v1/models: no 'data' list in {obj!r:.200}")
    return [m.get("id") for m in data if isinstance(m, dict)]


def wait_ready(url: str, *, api_key: Optional[str] = None, timeout: float = 300.0, interval: float = 1.0) -> list[str]:
    """Poll GET /v1/models until the server answers (a freshly started container); its model ids."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return list_models(url, api_key=api_key, timeout=min(10.0, timeout))
        except SmokeError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(interval)


def chat(
    url: str,
    model: str,
    messages: list[dict] | str,
    *,
    api_key: Optional[str] = None,
    max_tokens: int = 64,
    temperature: float = 0.0,
    timeout: float = 120.0,
    **extra: Any,
) -> str:
    """Ask a chat question (a string is one user message) and return the assistant's text."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature, **extra}
    obj = request_json(url, "/v1/chat/completions", body, api_key=api_key, timeout=timeout)
    message = _first_choice(obj, "/v1/chat/completions").get("message")
    if not isinstance(message, dict) or not isinstance(message.get("content"), str):
        raise SmokeError(f"/v1/chat/completions: choices[0].message has no string content: {obj!r:.300}")
    return message["content"]


def complete(
    url: str,
    model: str,
    prompt: str,
    *,
    api_key: Optional[str] = None,
    max_tokens: int = 16,
    temperature: float = 0.0,
    timeout: float = 120.0,
    **extra: Any,
) -> str:
    """Plain completion: the generated text of choices[0]."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature, **extra}
    obj = request_json(url, "/v1/completions", body, api_key=api_key, timeout=timeout)
    text = _first_choice(obj, "/v1/completions").get("text")
    if not isinstance(text, str):
        raise SmokeError(f"/v1/completions: choices[0].text is not a string: {obj!r:.300}")
    return text


def _first_choice(obj: dict, path: str) -> dict:
    choices = obj.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise SmokeError(f"{path}: no choices in {obj!r:.300}")
    return choices[0]


def _check_usage(obj: dict, path: str, max_tokens: int) -> str:
    usage = obj.get("usage")
    if not isinstance(usage, dict):
        raise SmokeError(f"{path}: no usage object")
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if prompt == completion == usage.get("total_tokens") == -1:
        # Xinference's transformers engine answers with -1 for "not counted": no numbers to check.
        return "usage not counted by the server (-1)"
    if not isinstance(prompt, int) or not isinstance(completion, int) or prompt < 1 or completion < 0:
        raise SmokeError(f"{path}: bad usage {usage}")
    if completion > max_tokens:
        raise SmokeError(f"{path}: {completion} completion tokens for max_tokens={max_tokens}")
    return f"usage {prompt}+{completion}"


# --------------------------------------------------------------------------------------------------
# The smoke run
# --------------------------------------------------------------------------------------------------

PROMPT = "What is the capital of France?"


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    seconds: float
    skipped: bool = False


def _short(text: str, n: int = 48) -> str:
    text = text.replace("\n", "\\n")
    return repr(text if len(text) <= n else text[: n - 1] + "…")


def _check_models(url, model, api_key, timeout, max_tokens) -> str:
    ids = list_models(url, api_key=api_key, timeout=timeout)
    if model not in ids:
        raise SmokeError(f"{model!r} not in {ids}")
    return f"lists {model!r}"


def _check_completion(url, model, api_key, timeout, max_tokens) -> str:
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}
    obj = request_json(url, "/v1/completions", body, api_key=api_key, timeout=timeout)
    text = _first_choice(obj, "/v1/completions").get("text")
    if not isinstance(text, str):
        raise SmokeError(f"choices[0].text is {type(text).__name__}, not a string")
    return f"text {_short(text)}, {_check_usage(obj, '/v1/completions', max_tokens)}"


def _chat_body(model: str, max_tokens: int) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }


def _check_chat(url, model, api_key, timeout, max_tokens) -> str:
    body = _chat_body(model, max_tokens)
    obj = request_json(url, "/v1/chat/completions", body, api_key=api_key, timeout=timeout)
    message = _first_choice(obj, "/v1/chat/completions").get("message")
    if (
        not isinstance(message, dict)
        or message.get("role") != "assistant"
        or not isinstance(message.get("content"), str)
    ):
        raise SmokeError(f"choices[0].message is not an assistant message: {message!r:.200}")
    return f"assistant {_short(message['content'])}, {_check_usage(obj, '/v1/chat/completions', max_tokens)}"


def _check_chat_stream(url, model, api_key, timeout, max_tokens) -> str:
    body = _chat_body(model, max_tokens)
    payloads = list(stream_events(url, "/v1/chat/completions", body, api_key=api_key, timeout=timeout))
    if not payloads or payloads[-1] != "[DONE]":
        raise SmokeError(f"stream does not end with 'data: [DONE]' (last: {payloads[-1:]!r:.100})")
    if "[DONE]" in payloads[:-1]:
        raise SmokeError("data after 'data: [DONE]'")
    chunks, text, finish = 0, "", None
    for payload in payloads[:-1]:
        try:
            obj = json.loads(payload)
        except ValueError:
            raise SmokeError(f"chunk is not JSON: {payload[:100]!r}") from None
        if "error" in obj:
            raise SmokeError(f"error chunk: {obj['error']!r:.200}")
        for choice in obj.get("choices") or []:
            delta = choice.get("delta") or {}
            if not isinstance(delta, dict):
                raise SmokeError(f"delta is not an object: {choice!r:.200}")
            if isinstance(delta.get("content"), str):
                text += delta["content"]
            finish = choice.get("finish_reason") or finish
        chunks += 1
    if chunks == 0:
        raise SmokeError("no chunks before [DONE]")
    if finish is None:
        raise SmokeError("no chunk carries a finish_reason")
    return f"{chunks} chunks + [DONE], finish {finish!r}, text {_short(text, 32)}"


# Names `--skip` takes, per check (a backend may lack an endpoint: the registry's `smoke_skip`).
SKIP_NAMES = {
    "GET /v1/models": "models",
    "POST /v1/completions": "completions",
    "POST /v1/chat/completions": "chat",
    "POST /v1/chat/completions stream": "chat-stream",
}

CHECKS: list[tuple[str, Callable[..., str]]] = [
    ("GET /v1/models", _check_models),
    ("POST /v1/completions", _check_completion),
    ("POST /v1/chat/completions", _check_chat),
    ("POST /v1/chat/completions stream", _check_chat_stream),
]


def smoke_checks(
    url: str,
    model: str,
    api_key: Optional[str] = None,
    timeout: float = 120.0,
    max_tokens: int = 16,
    skip: frozenset[str] = frozenset(),
) -> list[Check]:
    """Run every check (none stops the others) and return the results; generations ask for
    `max_tokens` new tokens at temperature 0. Checks named in `skip` are reported as skipped."""
    unknown = set(skip) - set(SKIP_NAMES.values())
    if unknown:
        raise ValueError(
            f"unknown check(s) to skip: {', '.join(sorted(unknown))}; known: {', '.join(SKIP_NAMES.values())}"
        )
    results = []
    for name, fn in CHECKS:
        if SKIP_NAMES[name] in skip:
            results.append(Check(name, True, "skipped on request", 0.0, skipped=True))
            continue
        start = time.monotonic()
        try:
            detail, ok = fn(url, model, api_key, timeout, max_tokens), True
        except SmokeError as e:
            detail, ok = str(e), False
        except Exception as e:  # anything unexpected is a failed check, not a crash
            detail, ok = f"{type(e).__name__}: {e}", False
        results.append(Check(name, ok, detail, time.monotonic() - start))
    return results


def run_smoke(
    url: str,
    model: str,
    api_key: Optional[str] = None,
    timeout: float = 120.0,
    max_tokens: int = 16,
    skip: frozenset[str] = frozenset(),
) -> bool:
    """Check the server at `url` serves `model` over the OpenAI API; print a table; True if all pass."""
    results = smoke_checks(url, model, api_key=api_key, timeout=timeout, max_tokens=max_tokens, skip=skip)
    _print_table(url, model, results)
    return all(r.ok for r in results)


def _print_table(url: str, model: str, results: list[Check]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text
    except ImportError:  # rich is a core dependency, but stay usable without it
        for r in results:
            print(f"{'SKIP' if r.skipped else 'PASS' if r.ok else 'FAIL'}  {r.name:<34} {r.seconds:6.2f}s  {r.detail}")
        return
    table = Table(title=Text(f"smoke: {model} @ {base_url(url)}"), title_justify="left")
    table.add_column("check", no_wrap=True)
    table.add_column("result", no_wrap=True)
    table.add_column("time", justify="right", no_wrap=True)
    table.add_column("detail", overflow="fold")
    for r in results:
        verdict = (
            Text("SKIP", style="yellow")
            if r.skipped
            else Text("PASS", style="green")
            if r.ok
            else Text("FAIL", style="red")
        )
        table.add_row(Text(r.name), verdict, f"{r.seconds:.2f}s", Text(r.detail))
    console = Console(soft_wrap=False)
    console.print(table)
    failed = sum(not r.ok for r in results)
    console.print("[green]all checks passed[/]" if not failed else f"[red]{failed} of {len(results)} checks failed[/]")


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m builder.runtime.smoke`: the same check with the standard library alone (runs inside any image)."""
    import argparse
    import os

    parser = argparse.ArgumentParser(prog="python -m builder.runtime.smoke", description=run_smoke.__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--api-key", default=os.environ.get("API_KEY"))
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--skip", action="append", default=[], choices=sorted(SKIP_NAMES.values()))
    args = parser.parse_args(argv)
    ok = run_smoke(
        url=args.url, model=args.model, api_key=args.api_key, timeout=args.timeout, skip=frozenset(args.skip)
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
