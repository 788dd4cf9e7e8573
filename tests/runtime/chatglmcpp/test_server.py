"""builder.runtime.chatglmcpp: the OpenAI-compatible server over a REAL chatglm_cpp.Pipeline (in its engine
process) on a tiny GLM-4 GGML file: every endpoint, streaming, the official openai client, API key,
404, 503, broken UTF-8, max_tokens, disconnects, the CLI. Greedy references come from an in-process
Engine on the same file.

Token counts stay small on purpose: ggml's thread pool is slow on a loaded 2-core machine.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import threading
import time

import _ggml_fixture
import httpx
import pytest
from _ggml_fixture import ServerThread, frozen

from builder.runtime.chatglmcpp.app import create_app
from builder.runtime.chatglmcpp.engine import Engine, SamplingParams
from builder.runtime.chatglmcpp.settings import Settings

NAME = "tiny-glm"
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def ggml(tmp_path_factory):
    return _ggml_fixture.tiny_ggml(tmp_path_factory)


@pytest.fixture(scope="module")
def engine(ggml):
    return Engine.load(ggml)


@pytest.fixture(scope="module")
def server(ggml):
    app = create_app(Settings(ggml=ggml, served_model_name=NAME, max_queue=4))
    with ServerThread(app) as s:
        s.app = app
        yield s


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def sse_payloads(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.read()
    assert response.headers["content-type"].startswith("text/event-stream")
    return [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]


def stream(client, path, body) -> list:
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        payloads = sse_payloads(r)
    assert payloads[-1] == "[DONE]" and "[DONE]" not in payloads[:-1]
    return [json.loads(p) for p in payloads[:-1]]


def greedy_reference(engine, input_ids, n):
    """What greedy decoding must produce: ids straight from the model (the server worker is idle)."""
    ids = list(engine.generate_ids(input_ids, SamplingParams(temperature=0), n))
    return ids


# --------------------------------------------------------------------------------------------------
# Real pipeline, over HTTP
# --------------------------------------------------------------------------------------------------


def test_health_and_models(client, engine):
    r = client.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    r = client.get("/v1/models")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == [NAME]
    assert body["data"][0]["max_model_len"] == engine.max_length
    assert client.get(f"/v1/models/{NAME}").json()["id"] == NAME


def test_completion_seed_request_and_new_token_count(client, engine):
    # The seed's curl request, with a prompt longer than max_tokens: max_tokens counts NEW tokens
    # (the bundled openai_api treats it as the total length and would return nothing here).
    prompt = "Please summarize the following paragraph in one sentence, and answer the question."
    prompt_ids = engine.encode_prompt(prompt)
    assert len(prompt_ids) > 6
    r = client.post("/v1/completions", json={"model": NAME, "prompt": prompt, "max_tokens": 6, **GREEDY})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == NAME
    choice = body["choices"][0]
    assert isinstance(choice["text"], str)
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(prompt_ids)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    ref = greedy_reference(engine, prompt_ids, 6)
    assert usage["completion_tokens"] == len(ref)
    if ref[-1] in engine.eos_ids:
        assert choice["finish_reason"] == "stop"
        ref = ref[:-1]
    else:
        assert choice["finish_reason"] == "length" and usage["completion_tokens"] == 6
    assert choice["text"] == engine.decode(ref)

    # Streaming gives the same text, chunk by chunk, then a finish_reason.
    chunks = stream(client, "/v1/completions", {"model": NAME, "prompt": prompt, "max_tokens": 6, **GREEDY})
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == choice["finish_reason"]
    assert all(c["object"] == "text_completion" for c in chunks)


def test_chat_plain_with_system_and_history(client, engine):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Who are you?"},
    ]
    body = {"model": NAME, "messages": messages, "max_tokens": 5, **GREEDY}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    msg = out["choices"][0]["message"]
    assert msg["role"] == "assistant" and isinstance(msg["content"], str)
    assert out["choices"][0]["finish_reason"] in ("stop", "length")
    full = engine.encode_chat([(m["role"], m["content"]) for m in messages])
    last_only = engine.encode_chat([("user", "Who are you?")])
    assert out["usage"]["prompt_tokens"] == len(full) > len(last_only)  # system + history were sent
    assert 1 <= out["usage"]["completion_tokens"] <= 5

    # Streaming: role delta first, content deltas, finish_reason at the end, usage on request, [DONE].
    chunks = stream(client, "/v1/chat/completions", {**body, "stream_options": {"include_usage": True}})
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == out["usage"]
    finals = [c for c in chunks[:-1] if c["choices"][0]["finish_reason"]]
    assert finals == [chunks[-2]] and finals[0]["choices"][0]["finish_reason"] == out["choices"][0]["finish_reason"]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert text == msg["content"]  # greedy: same answer both ways


def test_chat_stop_strings(client):
    base = {"model": NAME, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8, **GREEDY}
    full = client.post("/v1/chat/completions", json=base).json()["choices"][0]["message"]["content"]
    if len(full) < 3:
        pytest.skip(f"tiny model answered too little to cut: {full!r}")
    stop = full[1:3]
    expected = full[: full.find(stop)]
    for value in (stop, [stop, "\x00never"]):
        r = client.post("/v1/chat/completions", json={**base, "stop": value})
        choice = r.json()["choices"][0]
        assert (choice["message"]["content"], choice["finish_reason"]) == (expected, "stop")
    chunks = stream(client, "/v1/chat/completions", {**base, "stop": [stop]})
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert streamed == expected and chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_sampling_parameters_are_accepted(client):
    body = {
        "model": NAME,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 3,
        "temperature": 0.9,
        "top_p": 0.8,
        "top_k": 5,
        "repetition_penalty": 1.1,
        "seed": 1,
        "presence_penalty": 0,
    }
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 3


def test_unknown_model_is_404_with_openai_error(client):
    for path, body in [
        ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/completions", {"model": "nope", "prompt": "hi"}),
    ]:
        r = client.post(path, json=body)
        assert r.status_code == 404
        err = r.json()["error"]
        assert "nope" in err["message"] and err["type"] == "NotFoundError" and err["code"] == "model_not_found"
    assert client.get("/v1/models/nope").status_code == 404


def test_bad_requests_are_400(client, engine):
    r = client.post("/v1/chat/completions", json={"model": NAME, "messages": []})
    assert r.status_code == 400 and "error" in r.json()
    r = client.post("/v1/completions", json={"model": NAME, "prompt": "hi", "max_tokens": 0})
    assert r.status_code == 400
    r = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    long_prompt = "a b c d " * engine.max_length
    r = client.post("/v1/completions", json={"model": NAME, "prompt": long_prompt, "max_tokens": 2})
    assert r.status_code == 400 and "context length" in r.json()["error"]["message"]


def test_invalid_utf8_output_becomes_replacement_chars(client, engine):
    """Tiny random models emit broken byte sequences: they come back as U+FFFD, never a 500."""
    prompts = ["Hello", "What is 2 + 2?", "你好", "Say hello.", "x", "The quick brown fox", "emoji 😀", "1234"]
    for prompt in prompts:
        ids = greedy_reference(engine, engine.encode_prompt(prompt), 8)
        raw = engine.decode_bytes([i for i in ids if i not in engine.eos_ids])
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            break
    else:
        pytest.fail("no prompt made the tiny model emit invalid UTF-8; add prompts")
    expected = raw.decode("utf-8", errors="replace")
    assert "\ufffd" in expected

    body = {"model": NAME, "prompt": prompt, "max_tokens": 8, **GREEDY}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == expected
    chunks = stream(client, "/v1/completions", body)
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected


def test_client_disconnect_stops_generation(server):
    scheduler = server.app.state.server.scheduler
    gc.disable()  # stopping must not depend on the garbage collector closing the body iterator
    try:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            body = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "stream": True, "temperature": 0}
            with c.stream("POST", "/v1/chat/completions", json=body) as r:  # no max_tokens: up to the context
                next(r.iter_lines())
        deadline = time.monotonic() + 60
        while scheduler.admitted and time.monotonic() < deadline:
            time.sleep(0.05)
        assert scheduler.admitted == 0 and scheduler.running is None
    finally:
        gc.enable()


def test_api_key_required_on_v1_only(ggml):
    app = create_app(Settings(ggml=ggml, served_model_name=NAME, api_key="s3cret", max_queue=2))
    with ServerThread(app) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        assert c.get("/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = c.get("/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = c.post("/v1/chat/completions", json={"model": NAME, "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 401
        auth = {"Authorization": "Bearer s3cret"}
        assert c.get("/v1/models", headers=auth).status_code == 200
        r = c.post(
            "/v1/chat/completions",
            headers=auth,
            json={"model": NAME, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2, **GREEDY},
        )
        assert r.status_code == 200


def test_full_queue_answers_503_immediately(ggml):
    app = create_app(Settings(ggml=ggml, served_model_name=NAME, max_queue=1, retry_after=3))
    scheduler = app.state.server.scheduler
    body = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **GREEDY}
    results: dict[str, httpx.Response] = {}
    with ServerThread(app) as s, httpx.Client(base_url=s.url, timeout=60) as c:

        def post(key):
            results[key] = c.post("/v1/chat/completions", json=body)

        with frozen(scheduler.engine.pid):  # the engine stalls: one request in it, one waiting
            threads = [threading.Thread(target=post, args=(key,)) for key in ("first", "second")]
            for t in threads:
                t.start()
            deadline = time.monotonic() + 30
            while scheduler.admitted < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert scheduler.admitted == 2

            t0 = time.monotonic()
            r = c.post("/v1/chat/completions", json=body)
            assert r.status_code == 503 and time.monotonic() - t0 < 0.5
            assert r.json()["error"]["type"] == "service_unavailable" and r.headers["retry-after"] == "3"
            with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
                assert r.status_code == 503  # streaming requests are refused before the stream starts
            t0 = time.monotonic()
            assert c.get("/health").status_code == 200 and time.monotonic() - t0 < 0.5  # the loop never waits
            assert "chatglmcpp_requests_rejected_total 2.0" in c.get("/metrics").text
        for t in threads:
            t.join(60)
        assert results["first"].status_code == 200 and results["second"].status_code == 200
        assert scheduler.admitted == 0
        assert c.post("/v1/chat/completions", json=body).status_code == 200


def test_official_openai_client(server, engine):
    """What users of vLLM run, unchanged: chat, streaming, stop, max_tokens, completions, usage."""
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == [NAME]
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                          temperature=0)  # fmt: skip
    text = chat.choices[0].message.content
    assert chat.choices[0].finish_reason in ("stop", "length") and chat.usage.completion_tokens <= 4
    parts = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                           temperature=0, stream=True, stream_options={"include_usage": True})  # fmt: skip
    chunks = list(parts)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    done = client.completions.create(model=NAME, prompt="Hello", max_tokens=5, temperature=0)
    assert done.choices[0].finish_reason == "length" or done.usage.completion_tokens < 5
    assert done.usage.prompt_tokens == len(engine.encode_prompt("Hello"))
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=NAME, prompt="Hello", max_tokens=10**9)
    assert "maximum context length" in err.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "Hi"}])


def test_cli_serve_missing_file_is_a_user_error(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "builder", "serve", "--ggml", str(tmp_path / "missing.ggml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "GGML file not found" in r.stderr


def test_cli_serve_broken_file_is_a_user_error(tmp_path):
    bad = tmp_path / "broken.ggml"
    bad.write_bytes(b"ggml" + b"\x00" * 64)
    r = subprocess.run(
        [sys.executable, "-m", "builder", "serve", "--ggml", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2 and "cannot load" in r.stderr and "Traceback" not in r.stderr


def test_cli_chat_repl(ggml):
    r = subprocess.run(
        [sys.executable, "-m", "builder", "chat", "--ggml", str(ggml), "--max-tokens", "3", "--temperature", "0"],
        input="Hi\nclear\nSay hello.\nstop\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("Prompt") >= 3 and "Traceback" not in r.stderr
