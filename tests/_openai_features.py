"""The OpenAI API features users rely on, probed with the official `openai` Python client.

`probe(url, model, key)` returns {feature: (ok, detail)} for: chat, streaming chat, stop strings,
max_tokens ending with finish_reason "length", completions and usage. Tests assert on it per backend
against the gaps its record states (`Backend.openai_gaps`, which the docs' feature table is generated
from), so a fixed gap shows up as a failing "expected gap" too.
"""

from __future__ import annotations

from collections.abc import Callable

FEATURES = ("chat", "chat_stream", "stop", "max_tokens_length", "completions", "usage")


def _client(url: str, key: str | None):
    import openai

    return openai.OpenAI(base_url=url.rstrip("/") + "/v1", api_key=key or "none", timeout=120, max_retries=0)


def probe(url: str, model: str, key: str | None, prompt: str = "Who are you?") -> dict[str, tuple[bool, str]]:
    client = _client(url, key)
    messages = [{"role": "user", "content": prompt}]
    results: dict[str, tuple[bool, str]] = {}

    def check(name: str, fn: Callable[[], str]) -> None:
        try:
            results[name] = (True, fn())
        except Exception as e:  # noqa: BLE001 - any failure is a missing feature
            results[name] = (False, f"{type(e).__name__}: {str(e)[:200]}")

    def chat() -> str:
        r = client.chat.completions.create(model=model, messages=messages, max_tokens=32, temperature=0)
        text = r.choices[0].message.content
        assert isinstance(text, str) and text.strip(), r
        assert r.choices[0].finish_reason == "stop", r.choices[0].finish_reason
        return repr(text)

    def chat_stream() -> str:
        parts, finish = [], None
        for chunk in client.chat.completions.create(
            model=model, messages=messages, max_tokens=32, temperature=0, stream=True
        ):
            for c in chunk.choices:
                parts.append(c.delta.content or "")
                finish = c.finish_reason or finish
        assert len([p for p in parts if p]) > 1 and finish == "stop", (parts, finish)
        return f"{len(parts)} chunks, finish {finish}"

    def stop() -> str:
        full = client.chat.completions.create(model=model, messages=messages, max_tokens=32, temperature=0)
        text = full.choices[0].message.content.strip()
        word = text.split()[1] if len(text.split()) > 1 else text[1:3]
        r = client.chat.completions.create(model=model, messages=messages, max_tokens=32, temperature=0, stop=[word])
        got = r.choices[0].message.content
        assert word not in got and len(got) < len(full.choices[0].message.content), (word, got)
        assert r.choices[0].finish_reason == "stop", r.choices[0].finish_reason
        return f"stop={word!r} -> {got!r}"

    def max_tokens_length() -> str:
        r = client.chat.completions.create(model=model, messages=messages, max_tokens=2, temperature=0)
        assert r.choices[0].finish_reason == "length", r.choices[0].finish_reason
        assert r.usage is None or r.usage.completion_tokens == 2, r.usage
        return "finish 'length' after 2 tokens"

    def completions() -> str:
        r = client.completions.create(model=model, prompt="Hello", max_tokens=4, temperature=0)
        assert isinstance(r.choices[0].text, str), r
        return repr(r.choices[0].text)

    def usage() -> str:
        r = client.chat.completions.create(model=model, messages=messages, max_tokens=32, temperature=0)
        u = r.usage
        assert u is not None and u.prompt_tokens > 0 and 0 < u.completion_tokens <= 32, u
        assert u.total_tokens == u.prompt_tokens + u.completion_tokens, u
        return f"{u.prompt_tokens}+{u.completion_tokens}"

    for name, fn in (
        ("chat", chat),
        ("chat_stream", chat_stream),
        ("stop", stop),
        ("max_tokens_length", max_tokens_length),
        ("completions", completions),
        ("usage", usage),
    ):
        check(name, fn)
    return results


def back_to_back_failures(client, names: list[str], requests: int) -> list[str]:
    """`requests` one-token chats on one keep-alive `client` (max_retries=0), naming each of `names` in turn:
    the connection errors as "i: cause" (a server that closes a kept-alive socket unannounced fails here)."""
    import openai

    failed = []
    for i in range(requests):
        try:
            client.chat.completions.create(
                model=names[i % len(names)], messages=[{"role": "user", "content": "hi"}], max_tokens=1
            )
        except openai.APIConnectionError as e:
            failed.append(f"{i}: {e.__cause__!r}")
    return failed
