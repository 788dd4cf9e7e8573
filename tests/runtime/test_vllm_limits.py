"""builder.runtime.vllm_limits driven as plain ASGI: a real inner ASGI app records what reaches it (the
scope, every message its receive() returns) and answers, so each test sees both what the client got and
what vLLM would have got. tests/runtime/test_vllm_limits_server.py runs the same middleware inside a real
vLLM server."""

from __future__ import annotations

import asyncio
import json

import pytest

from builder.runtime import vllm_limits
from builder.runtime.vllm_limits import GENERATION_ROUTES, Limits, RequestLimits

DEFAULTS = Limits()


class Recorder:
    """An ASGI app standing in for vLLM: it reads the whole body as Starlette does (until more_body is
    false), then asks receive() once more (as vLLM's disconnect watcher does) and answers 200, in two
    body messages when `chunks` > 1 (a streamed answer)."""

    def __init__(self, chunks: int = 1, listen: bool = True):
        self.calls: list[dict] = []
        self.chunks, self.listen = chunks, listen

    async def __call__(self, scope, receive, send):
        call = {"scope": scope, "messages": [], "receive": receive, "send": send}
        self.calls.append(call)
        if scope["type"] != "http":
            return
        while True:
            message = await receive()
            call["messages"].append(message)
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        if self.listen:
            call["after"] = await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x-inner", b"yes")]})
        for i in range(self.chunks):
            await send({"type": "http.response.body", "body": b"part%d" % i, "more_body": i < self.chunks - 1})

    @property
    def body(self) -> bytes:
        (call,) = self.calls
        return b"".join(m.get("body", b"") for m in call["messages"] if m["type"] == "http.request")


def http_scope(path="/v1/completions", method="POST", headers=(), root_path=""):
    return {
        "type": "http",
        "method": method,
        "path": path,
        "root_path": root_path,
        "headers": [(k.encode(), v.encode()) for k, v in headers],
    }


def run(app, scope, messages: list[dict]):
    """Send `messages` to `app`; after them the connection reports a disconnect (what a server's receive
    returns once the client is gone). Returns (what was sent, how many messages were read)."""
    sent: list[dict] = []
    queue = list(messages)
    read = 0

    async def receive():
        nonlocal read
        read += 1
        return queue.pop(0) if queue else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent, read


def post(body, path="/v1/completions", limits: Limits = DEFAULTS, headers=(), inner: Recorder | None = None):
    """One request with `body` (a dict: JSON; bytes: as they are) in one message."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    inner = inner or Recorder()
    sent, _ = run(
        RequestLimits(inner, limits),
        http_scope(path, headers=[("content-length", str(len(raw))), *headers]),
        [{"type": "http.request", "body": raw, "more_body": False}],
    )
    return sent, inner


def status(sent) -> int:
    return sent[0]["status"]


def error(sent) -> dict:
    assert sent[0]["type"] == "http.response.start"
    headers = dict(sent[0]["headers"])
    assert headers[b"content-type"] == b"application/json"
    body = b"".join(m.get("body", b"") for m in sent[1:])
    assert int(headers[b"content-length"]) == len(body)
    assert sent[-1].get("more_body", False) is False
    return json.loads(body)["error"]


def assert_refused(sent, inner, param, env, limit, status_code=400):
    assert status(sent) == status_code
    err = error(sent)
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == status_code
    assert err["type"] == ("BadRequestError" if status_code == 400 else "RequestTooLargeError")
    assert err["param"] == param
    assert env in err["message"] and f"limit of {limit} " in err["message"]
    assert inner.calls == [], "a refused request must not reach vLLM"


# ---- the limits -------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["n", "best_of"])
def test_sequences_over_the_limit_are_refused_with_the_variable_named(field):
    sent, inner = post({"prompt": "hi", field: 17})
    assert_refused(sent, inner, field, "LLM_MAX_N", 16)
    assert f"{field} is 17" in error(sent)["message"]


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens", "max_output_tokens", "min_tokens"])
def test_tokens_over_the_limit_are_refused_with_the_variable_named(field):
    sent, inner = post({"messages": [{"role": "user", "content": "hi"}], field: 4097}, "/v1/chat/completions")
    assert_refused(sent, inner, field, "LLM_MAX_TOKENS", 4096)


@pytest.mark.parametrize("field", ["logprobs", "top_logprobs", "prompt_logprobs"])
def test_logprobs_over_the_limit_are_refused_with_the_variable_named(field):
    sent, inner = post({"prompt": "hi", field: 21})
    assert_refused(sent, inner, field, "LLM_MAX_LOGPROBS", 20)
    assert "(-1: no limit)" in error(sent)["message"]


def test_chat_logprobs_true_is_not_a_count():
    sent, inner = post({"messages": [], "logprobs": True, "top_logprobs": 20}, "/v1/chat/completions")
    assert status(sent) == 200


def test_logprobs_limit_follows_vllms_meaning_of_minus_one_and_zero():
    sent, inner = post({"prompt": "hi", "logprobs": 10**6}, limits=Limits(max_logprobs=-1))
    assert status(sent) == 200
    sent, inner = post({"prompt": "hi", "logprobs": 1}, limits=Limits(max_logprobs=0))
    assert_refused(sent, inner, "logprobs", "LLM_MAX_LOGPROBS", 0)


def test_at_the_limit_reaches_vllm_byte_for_byte_in_one_message():
    raw = json.dumps({"prompt": "hi", "n": 16, "best_of": 16, "max_tokens": 4096, "min_tokens": 4096}).encode()
    sent, inner = post(raw)
    assert status(sent) == 200 and dict(sent[0]["headers"]) == {b"x-inner": b"yes"}
    (call,) = inner.calls
    assert call["messages"] == [{"type": "http.request", "body": raw, "more_body": False}]
    assert call["after"] == {"type": "http.disconnect"}, "the connection's later messages reach vLLM"


@pytest.mark.parametrize("value", ['"1000"', '" 1000 "', "1000.0", "1e300", "Infinity", "9" * 5000])
def test_values_vllm_would_read_as_numbers_count(value):
    """JSON text as vLLM's parser reads it: numeric strings, floats, Infinity, a 5000-digit number."""
    sent, inner = post(b'{"prompt": "hi", "n": ' + value.encode() + b"}")
    assert_refused(sent, inner, "n", "LLM_MAX_N", 16)


@pytest.mark.parametrize("value", [True, None, "many", [1000], {"n": 1000}, -5, float("nan")], ids=repr)
def test_values_that_are_not_counts_are_left_to_vllm(value):
    sent, inner = post(json.dumps({"prompt": "hi", "n": value, "max_tokens": value}).encode())
    assert status(sent) == 200 and len(inner.calls) == 1


def test_a_huge_number_is_named_without_being_built():
    sent, inner = post(b'{"prompt": "hi", "max_tokens": ' + b"9" * 6000 + b"}")
    assert_refused(sent, inner, "max_tokens", "LLM_MAX_TOKENS", 4096)
    assert "a number too large to read" in error(sent)["message"]


def test_prompts_times_n_is_bounded_on_completions():
    sent, inner = post({"prompt": ["a"] * 9, "n": 2})
    assert_refused(sent, inner, "prompt", "LLM_MAX_N", 16)
    assert "9 prompts x 2 sequences each = 18" in error(sent)["message"]
    sent, inner = post({"prompt": [[1, 2], [3]] * 8, "n": 1})  # 16 token-id prompts
    assert status(sent) == 200
    sent, inner = post({"prompt": list(range(100)), "n": 16})  # one prompt of 100 token ids
    assert status(sent) == 200


def test_conversations_times_n_is_bounded_on_the_chat_batch_route():
    convo = [{"role": "user", "content": "hi"}]
    sent, inner = post({"messages": [convo] * 4, "n": 5}, "/v1/chat/completions/batch")
    assert_refused(sent, inner, "messages", "LLM_MAX_N", 16)
    assert "4 conversations x 5 sequences each = 20" in error(sent)["message"]
    sent, inner = post({"messages": convo * 40, "n": 16}, "/v1/chat/completions")  # one long conversation
    assert status(sent) == 200


def test_items_to_score_are_bounded_on_generative_scoring():
    sent, inner = post({"query": "q", "items": ["a"] * 17, "label_token_ids": [1]}, "/generative_scoring")
    assert_refused(sent, inner, "items", "LLM_MAX_N", 16)
    assert "17 items x 1 sequences each = 17" in error(sent)["message"]
    sent, inner = post({"query": "q", "items": [[1, 2]] * 16, "label_token_ids": [1]}, "/generative_scoring")
    assert status(sent) == 200


def test_the_generate_route_sampling_params_are_bounded():
    sent, inner = post({"token_ids": [1, 2], "sampling_params": {"n": 64}}, "/inference/v1/generate")
    assert_refused(sent, inner, "n", "LLM_MAX_N", 16)
    sent, inner = post({"token_ids": [1], "sampling_params": {"max_tokens": 10**6}}, "/inference/v1/generate")
    assert_refused(sent, inner, "max_tokens", "LLM_MAX_TOKENS", 4096)


@pytest.mark.parametrize("path", sorted(GENERATION_ROUTES))
def test_every_generation_route_is_bounded(path):
    sent, inner = post({"prompt": "hi", "input": "hi", "n": 100}, path)
    assert_refused(sent, inner, "n", "LLM_MAX_N", 16)


@pytest.mark.parametrize(
    "scope_path,root", [("/v1/completions/", ""), ("/api/v1/completions", "/api"), ("/api/v1/completions/", "/api")]
)
def test_a_trailing_slash_or_proxy_root_path_does_not_skip_the_check(scope_path, root):
    inner = Recorder()
    raw = json.dumps({"prompt": "hi", "n": 100}).encode()
    sent, _ = run(
        RequestLimits(inner, DEFAULTS),
        http_scope(scope_path, root_path=root),
        [{"type": "http.request", "body": raw, "more_body": False}],
    )
    assert_refused(sent, inner, "n", "LLM_MAX_N", 16)


@pytest.mark.parametrize("path", ["/tokenize", "/v1/completions/render", "/v1/messages/count_tokens", "/v1/models"])
def test_other_routes_get_the_body_untouched(path):
    raw = json.dumps({"prompt": "hi", "n": 1000, "max_tokens": 10**9}).encode()
    sent, inner = post(raw, path)
    assert status(sent) == 200
    assert inner.calls[0]["messages"] == [{"type": "http.request", "body": raw, "more_body": False}]


@pytest.mark.parametrize("raw", [b"{nope", b"[1, 2]", b'"n"', b"5", b"\xff\xfe{", b"[" * 100000, b"", b"null"])
def test_bodies_that_are_not_a_json_object_reach_vllm_untouched(raw):
    sent, inner = post(raw)
    assert status(sent) == 200, "vLLM answers these with its own 400"
    assert inner.body == raw


def test_a_zero_limit_is_off():
    off = Limits(max_body_bytes=0, max_n=0, max_tokens=0)
    raw = json.dumps({"prompt": ["a"] * 50, "n": 1000, "max_tokens": 10**9}).encode() + b" " * 5_000_000
    sent, inner = post(raw, limits=off)
    assert status(sent) == 200 and inner.body == raw


# ---- streaming, methods, scopes ---------------------------------------------------------------------


def test_a_streaming_request_under_the_limits_streams_through():
    inner = Recorder(chunks=3)
    sent, _ = post({"prompt": "hi", "n": 2, "stream": True}, inner=inner)
    assert [m.get("body") for m in sent[1:]] == [b"part0", b"part1", b"part2"]
    assert [m.get("more_body") for m in sent[1:]] == [True, True, False]
    sent, inner = post({"prompt": "hi", "n": 1000, "stream": True})
    assert_refused(sent, inner, "n", "LLM_MAX_N", 16)


def test_a_get_without_body_reaches_vllm():
    inner = Recorder()
    sent, _ = run(
        RequestLimits(inner, DEFAULTS),
        http_scope("/v1/models", method="GET"),
        [{"type": "http.request", "body": b"", "more_body": False}],
    )
    assert status(sent) == 200
    assert inner.calls[0]["messages"] == [{"type": "http.request", "body": b"", "more_body": False}]


@pytest.mark.parametrize("kind", ["lifespan", "websocket"])
def test_other_scopes_are_handed_on_as_they_are(kind):
    inner = Recorder()
    scope = {"type": kind, "path": "/v1/completions", "headers": []}

    async def receive():
        raise AssertionError("the middleware must not read a non-http connection")

    async def send(message):
        raise AssertionError("the middleware must not answer a non-http connection")

    asyncio.run(RequestLimits(inner, DEFAULTS)(scope, receive, send))
    (call,) = inner.calls
    assert call["scope"] is scope and call["receive"] is receive and call["send"] is send


# ---- bodies in several messages, the byte cap, clients that leave -----------------------------------


def chunked(raw: bytes, size: int) -> list[dict]:
    parts = [raw[i : i + size] for i in range(0, len(raw), size)] or [b""]
    return [{"type": "http.request", "body": p, "more_body": i < len(parts) - 1} for i, p in enumerate(parts)]


def test_a_body_in_several_messages_reaches_vllm_whole_in_one():
    raw = json.dumps({"prompt": "x" * 5000, "n": 2}).encode()
    inner = Recorder()
    sent, _ = run(RequestLimits(inner, DEFAULTS), http_scope(), chunked(raw, 700))
    assert status(sent) == 200
    assert inner.calls[0]["messages"] == [{"type": "http.request", "body": raw, "more_body": False}]


def test_limits_are_checked_on_a_body_in_several_messages():
    raw = json.dumps({"prompt": "x" * 5000, "n": 200}).encode()
    inner = Recorder()
    sent, _ = run(RequestLimits(inner, DEFAULTS), http_scope(), chunked(raw, 700))
    assert_refused(sent, inner, "n", "LLM_MAX_N", 16)


def test_a_declared_length_over_the_cap_is_refused_413_and_the_connection_closed():
    limits = Limits(max_body_bytes=1000)
    inner = Recorder()
    messages = chunked(b"a" * 3000, 500)
    sent, read = run(RequestLimits(inner, limits), http_scope(headers=[("content-length", "3000")]), messages)
    assert_refused(sent, inner, None, "LLM_MAX_BODY_BYTES", 1000, status_code=413)
    assert dict(sent[0]["headers"])[b"connection"] == b"close"
    assert read == len(messages), "the rest of the body is read and dropped, so the client gets the answer"


def test_a_body_without_length_is_cut_off_once_it_passes_the_cap():
    limits = Limits(max_body_bytes=1000)
    inner = Recorder()
    messages = chunked(b"a" * 3000, 300)
    sent, read = run(RequestLimits(inner, limits), http_scope(), messages)
    assert_refused(sent, inner, None, "LLM_MAX_BODY_BYTES", 1000, status_code=413)
    assert dict(sent[0]["headers"])[b"connection"] == b"close"
    assert read == len(messages), "the rest of the body is read and dropped, so the client gets the answer"


def test_a_body_of_exactly_the_cap_passes():
    limits = Limits(max_body_bytes=1000)
    inner = Recorder()
    sent, _ = run(RequestLimits(inner, limits), http_scope(), chunked(b"a" * 1000, 300))
    assert status(sent) == 200 and inner.body == b"a" * 1000


def test_the_default_cap_is_four_mib():
    sent, inner = post(b" " * (4 * 1024 * 1024 + 1))
    assert_refused(sent, inner, None, "LLM_MAX_BODY_BYTES", 4 * 1024 * 1024, status_code=413)
    sent, inner = post(b" " * (4 * 1024 * 1024))
    assert status(sent) == 200


def test_expect_continue_over_the_cap_is_answered_without_reading_the_body():
    inner = Recorder()
    scope = http_scope(headers=[("content-length", "5000000"), ("expect", "100-continue")])
    sent, read = run(RequestLimits(inner, Limits()), scope, [])
    assert_refused(sent, inner, None, "LLM_MAX_BODY_BYTES", 4 * 1024 * 1024, status_code=413)
    assert read == 0


def test_draining_a_refused_body_stops_after_its_time(monkeypatch):
    monkeypatch.setattr(vllm_limits, "DRAIN_SECONDS", 0.2)
    inner, sent = Recorder(), []

    async def receive():  # the client sends a first part, then nothing more
        if not hasattr(receive, "done"):
            receive.done = True
            return {"type": "http.request", "body": b"a" * 10, "more_body": True}
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    async def main():
        app = RequestLimits(inner, Limits(max_body_bytes=5))
        await asyncio.wait_for(app(http_scope(headers=[("content-length", "100")]), receive, send), 5)

    asyncio.run(main())
    assert_refused(sent, inner, None, "LLM_MAX_BODY_BYTES", 5, status_code=413)


def test_a_client_that_leaves_mid_body_reaches_nothing_and_gets_nothing():
    inner = Recorder()
    messages = [{"type": "http.request", "body": b'{"prompt": "a', "more_body": True}, {"type": "http.disconnect"}]
    sent, _ = run(RequestLimits(inner, DEFAULTS), http_scope(), messages)
    assert sent == [] and inner.calls == []


def test_a_disconnect_during_generation_reaches_vllm():
    """vLLM aborts a generation when its receive() reports the client gone: after the replayed body,
    receive() is the connection's own."""
    seen = []

    async def app(scope, receive, send):
        seen.append(await receive())
        seen.append(await receive())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    raw = json.dumps({"prompt": "hi"}).encode()
    run(RequestLimits(app, DEFAULTS), http_scope(), [{"type": "http.request", "body": raw, "more_body": False}])
    assert seen == [{"type": "http.request", "body": raw, "more_body": False}, {"type": "http.disconnect"}]


# ---- the environment --------------------------------------------------------------------------------


def test_limits_come_from_the_environment():
    assert Limits.from_env({}) == Limits(4 * 1024 * 1024, 16, 4096, 20)
    env = {"LLM_MAX_N": " 64 ", "LLM_MAX_TOKENS": "0", "LLM_MAX_BODY_BYTES": "", "LLM_MAX_LOGPROBS": "-1"}
    assert Limits.from_env(env) == Limits(4 * 1024 * 1024, 64, 0, -1)
    with pytest.raises(ValueError, match=r"^LLM_MAX_LOGPROBS='-2'.*\(-1: no limit\)"):
        Limits.from_env({"LLM_MAX_LOGPROBS": "-2"})


def test_the_images_defaults_are_the_middlewares():
    """The vLLM image sets each variable (compose and Kubernetes pass them on): the same defaults."""
    from builder.backends.vllm import BACKEND

    tunables = dict(BACKEND.tunables)
    assert {name: tunables.get(name) for name in vllm_limits.LIMIT_ENV} == {
        name: str(default) for name, (default, _) in vllm_limits.LIMIT_ENV.items()
    }


@pytest.mark.parametrize("value", ["-1", "1e3", "16.0", "lots", "١٦"])
def test_a_bad_value_is_refused_with_its_name(value):
    with pytest.raises(ValueError, match=r"^LLM_MAX_N=.*whole number"):
        Limits.from_env({"LLM_MAX_N": value})


def test_the_middleware_built_by_vllm_reads_the_environment(monkeypatch):
    """vLLM builds it as RequestLimits(app), nothing else."""
    monkeypatch.setenv("LLM_MAX_N", "2")
    monkeypatch.setenv("LLM_MAX_TOKENS", "10")
    inner = Recorder()
    app = RequestLimits(inner)
    sent, _ = run(app, http_scope(), [{"type": "http.request", "body": b'{"prompt": "a", "n": 3}', "more_body": False}])
    assert_refused(sent, inner, "n", "LLM_MAX_N", 2)
    sent, _ = run(
        app, http_scope(), [{"type": "http.request", "body": b'{"prompt": "a", "max_tokens": 11}', "more_body": False}]
    )
    assert_refused(sent, inner, "max_tokens", "LLM_MAX_TOKENS", 10)
