"""The chatglm.cpp server as an attacker and a careless client meet it: each request that once killed,
stalled or confused it, sent to a real `python -m builder.runtime.chatglmcpp serve` process. Every
test asserts the status, the OpenAI error shape, and that the same process then still answers.

Stalls are made deterministic by stopping the engine process (SIGSTOP): the HTTP process must not
care how long the engine takes. Two prefill/cancellation tests use a bigger random GLM so that the
work they race against is seconds long.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import _ggml_fixture
import httpx
import pytest
from _ggml_fixture import frozen

from builder.runtime.chatglmcpp.engine import Engine

NAME = "hostile"
OK_CHAT = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0}


class ServerProcess:
    """`python -m builder.runtime.chatglmcpp serve` on a free loopback port."""

    def __init__(self, ggml: Path, **env: str):
        self.port = _ggml_fixture.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "builder.runtime.chatglmcpp", "serve", "--ggml", str(ggml), "--host", "127.0.0.1",
                "--port", str(self.port), "--served-model-name", NAME, "--log-level", "warning"]  # fmt: skip
        self.proc = subprocess.Popen(argv, env={**os.environ, **env}, stderr=subprocess.PIPE, text=True)
        _ggml_fixture.wait_http(f"{self.url}/health", timeout=120, proc=self.proc)
        self.client = httpx.Client(base_url=self.url, timeout=120)

    @property
    def engine_pid(self) -> int:
        pids = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(pids) == 1, pids
        return int(pids[0])

    def assert_still_serving(self) -> None:
        assert self.proc.poll() is None, "the server process died"
        r = self.client.post("/v1/chat/completions", json=OK_CHAT)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["role"] == "assistant"

    def raw(self, data: bytes, read: bool = True, timeout: float = 10) -> bytes:
        """Send raw bytes on a fresh connection; the whole response (until the server closes)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            s.sendall(data)
            chunks = []
            while read:
                chunk = s.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
            return b"".join(chunks)

    def close(self) -> None:
        self.client.close()
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def assert_openai_error(response: httpx.Response | bytes, status: int) -> dict:
    if isinstance(response, bytes):
        head, _, body = response.partition(b"\r\n\r\n")
        assert head.split()[1] == str(status).encode(), head
        assert b"application/json" in head.lower(), head
        payload = json.loads(body)
    else:
        assert response.status_code == status, response.text
        assert response.headers["content-type"].startswith("application/json")
        payload = response.json()
    error = payload["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and {"param", "code"} <= set(error)
    return error


@pytest.fixture(scope="module")
def ggml(tmp_path_factory):
    return _ggml_fixture.tiny_ggml(tmp_path_factory)


@pytest.fixture(scope="module")
def vocab(ggml) -> int:
    return int(Engine.load(ggml).model.config.vocab_size)


@pytest.fixture(scope="module")
def server(ggml):
    s = ServerProcess(ggml, MAX_QUEUE="16", RETRY_AFTER="2", MAX_BODY_BYTES=str(1 << 20))
    yield s
    s.close()


# -- bad input never reaches chatglm.cpp -----------------------------------------------------------


@pytest.mark.parametrize(
    "body, what",
    [
        ({"prompt": [[]]}, "empty"),  # was: GGML_ASSERT "tensor read out of bounds", SIGABRT
        ({"prompt": []}, "empty"),
        ({"prompt": [[1, 2], []]}, "empty"),
        ({"prompt": [1, 2, 10000000]}, "out of range"),  # was: SIGSEGV
        ({"prompt": [1, 2, 10000000], "echo": True}, "out of range"),
        ({"prompt": [1, 2, -5]}, "out of range"),  # was: 200 with garbage
        ({"prompt": [[1, 2], [3, 1099511627776]]}, "out of range"),  # was: 500 exposing pybind internals
        ({"prompt": "Hi", "max_tokens": 10**9}, "maximum context length"),  # was: 200, silently capped
        ({"prompt": "Hi", "max_tokens": 0}, "max_tokens"),
    ],
)
def test_bad_prompts_are_400(server, body, what):
    error = assert_openai_error(server.client.post("/v1/completions", json={"model": NAME, **body}), 400)
    assert what in error["message"], error
    assert "pybind" not in error["message"] and "TypeError" not in error["message"]
    server.assert_still_serving()


def test_token_id_equal_to_the_vocab_size_is_400(server, vocab):
    error = assert_openai_error(server.client.post("/v1/completions", json={"model": NAME, "prompt": [1, vocab]}), 400)
    assert f"vocabulary has {vocab} tokens" in error["message"]
    r = server.client.post("/v1/completions", json={"model": NAME, "prompt": [1, vocab - 1], "max_tokens": 2})
    assert r.status_code == 200, r.text  # the last id is fine
    server.assert_still_serving()


def test_chat_max_tokens_beyond_the_context_is_400(server):
    error = assert_openai_error(server.client.post("/v1/chat/completions", json={**OK_CHAT, "max_tokens": 10**6}), 400)
    assert "maximum context length" in error["message"] and error["param"] == "max_tokens"


# -- every error is OpenAI-shaped ------------------------------------------------------------------


def test_routing_and_parse_errors_are_openai_shaped(server):
    assert_openai_error(server.client.get("/v1/chat/completions"), 405)
    assert_openai_error(server.client.get("/v1/nowhere"), 404)
    assert_openai_error(server.client.delete("/health"), 405)
    bad_utf8 = b'{"model": "hostile", "prompt": "\xff\xfe"}'
    assert_openai_error(
        server.client.post("/v1/completions", content=bad_utf8, headers={"content-type": "application/json"}), 400
    )
    assert_openai_error(
        server.client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}), 400
    )
    assert_openai_error(server.client.post("/v1/completions", json={"model": NAME}), 400)  # no prompt
    assert_openai_error(server.client.post("/v1/completions", json=[1, 2]), 400)
    server.assert_still_serving()


def test_ten_thousand_headers_get_a_json_400(server):
    headers = "".join(f"X-Flood-{i}: {i}\r\n" for i in range(10_000))
    reply = server.raw(f"GET /health HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
    assert_openai_error(reply, 400)
    server.assert_still_serving()


# -- sizes and time limits -------------------------------------------------------------------------


def _chunked_until_answered(server: ServerProcess, head: bytes, body: bytes) -> bytes:
    """Send `body` chunked, stopping as soon as the server answers; its reply."""
    import select

    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(head)
        for i in range(0, len(body), 256 << 10):
            piece = body[i : i + (256 << 10)]
            try:
                s.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            except OSError:
                break
            if select.select([s], [], [], 0.05)[0]:
                break
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
        return b"".join(chunks)


def test_oversized_body_is_refused_before_it_is_read(server):
    big = json.dumps({"model": NAME, "prompt": "x" * (20 << 20)}).encode()  # 20 MB
    health: list[float] = []
    stop = threading.Event()

    def poll_health():
        while not stop.is_set():
            t0 = time.monotonic()
            assert server.client.get("/health").status_code == 200
            health.append(time.monotonic() - t0)
            time.sleep(0.02)

    poller = threading.Thread(target=poll_health)
    poller.start()
    t0 = time.monotonic()
    try:
        # Declared length: refused from the headers alone, before a byte of the body.
        head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(big)}\r\n\r\n"
        assert_openai_error(server.raw(head.encode()), 413)
        # No length (chunked): counted as it arrives, refused once past MAX_BODY_BYTES (1 MiB here).
        head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        assert_openai_error(_chunked_until_answered(server, head, big), 413)
        elapsed = time.monotonic() - t0
    finally:
        stop.set()
        poller.join()
    assert elapsed < 10, elapsed
    assert health and max(health) < 0.5, health  # nothing big was parsed or tokenized on the event loop
    server.assert_still_serving()


def test_silent_and_trickling_connections_are_closed(ggml):
    server = ServerProcess(ggml, HEADER_TIMEOUT="1")
    t0 = time.monotonic()
    assert server.raw(b"", timeout=10) == b""  # connects, sends nothing: closed after HEADER_TIMEOUT=1
    assert 0.8 < time.monotonic() - t0 < 5
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:  # slowloris
        t0 = time.monotonic()
        closed = False
        for byte in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
            try:
                s.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            time.sleep(0.2)
            s.setblocking(False)
            try:
                closed = s.recv(1) == b""
            except BlockingIOError:
                pass
            s.setblocking(True)
            if closed:
                break
        assert closed and time.monotonic() - t0 < 5
    server.assert_still_serving()
    server.close()


# -- overload --------------------------------------------------------------------------------------


def test_overload_gets_503_at_once_with_retry_after(server):
    """40 requests against a queue of 16 while the engine stalls: 17 are admitted (one in the engine,
    16 waiting), the other 23 get 503 + Retry-After at once; the 17 finish once it moves again."""
    results: list[int] = []

    def post():
        with httpx.Client(base_url=server.url, timeout=120) as c:
            results.append(c.post("/v1/chat/completions", json=OK_CHAT).status_code)

    def admitted() -> float:
        line = next(
            x for x in server.client.get("/metrics").text.splitlines() if x.startswith("chatglmcpp_requests_admitted ")
        )
        return float(line.split()[1])

    with frozen(server.engine_pid):
        threads = [threading.Thread(target=post) for _ in range(17)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while admitted() < 17:
            assert time.monotonic() < deadline, admitted()
            time.sleep(0.05)
        burst = [threading.Thread(target=post) for _ in range(13)]  # 13 at once ...
        for t in burst:
            t.start()
        for t in burst:
            t.join(60)
        for _ in range(10):  # ... and 10 timed one by one
            t0 = time.monotonic()
            r = server.client.post("/v1/chat/completions", json=OK_CHAT)
            assert time.monotonic() - t0 < 0.5
            error = assert_openai_error(r, 503)
            assert error["type"] == "service_unavailable" and r.headers["retry-after"] == "2"
            results.append(r.status_code)
        t0 = time.monotonic()
        assert server.client.get("/health").status_code == 200 and time.monotonic() - t0 < 0.5
        assert admitted() == 17
    for t in threads:
        t.join(120)
    assert sorted(results) == [200] * 17 + [503] * 23
    assert "chatglmcpp_requests_rejected_total 23.0" in server.client.get("/metrics").text
    server.assert_still_serving()


# -- the engine process ----------------------------------------------------------------------------


# -- a bigger model: seconds of prefill and generation ---------------------------------------------


@pytest.fixture(scope="module")
def bigger_ggml(tmp_path_factory) -> Path:
    """A random GLM big enough that a near-context prefill takes seconds on two cores (10 MB, q4_0)."""
    from builder.demo.tiny import make_random_glm
    from builder.model.convert import convert_model

    out = tmp_path_factory.mktemp("bigger")
    folder = make_random_glm(out / "glm", hidden_size=512, num_layers=6, num_heads=8, num_kv_heads=2,
                             intermediate_size=1536)  # fmt: skip
    return convert_model(folder, quant="q4_0", out=out / "bigger.ggml", quiet=True)


@pytest.fixture(scope="module")
def bigger(bigger_ggml):
    s = ServerProcess(bigger_ggml, MAX_QUEUE="16")
    yield s
    s.close()


def test_health_answers_during_a_long_prefill(bigger):
    prompt = [1 + i % 600 for i in range(1790)]  # 1,790 token ids: a prefill near the 2,048 context
    done = {}
    t = threading.Thread(target=lambda: done.setdefault("r", bigger.client.post(
        "/v1/completions", json={"model": NAME, "prompt": prompt, "max_tokens": 1})))  # fmt: skip
    t.start()
    latencies, busy_seen = [], False
    while t.is_alive():
        t0 = time.monotonic()
        r = bigger.client.get("/health")
        latencies.append(time.monotonic() - t0)
        busy_seen |= r.json()["running"] == 1
        time.sleep(0.05)
    t.join()
    assert done["r"].status_code == 200, done["r"].text
    assert busy_seen and len(latencies) >= 5, latencies  # /health was asked while the engine ran
    assert max(latencies) < 0.5, latencies


def _wait_running(server: ServerProcess) -> None:
    deadline = time.monotonic() + 60
    while server.client.get("/health").json()["running"] != 1:
        assert time.monotonic() < deadline, "the engine never started the request"
        time.sleep(0.02)


def test_a_dead_engine_is_restarted(bigger):
    """Kill the engine process mid-generation: that request fails with a 500, /health says so, the
    engine comes back and the next request is answered."""
    body = {**OK_CHAT, "max_tokens": 400}
    holder: dict = {}
    pid = bigger.engine_pid
    t = threading.Thread(target=lambda: holder.setdefault("r", bigger.client.post("/v1/chat/completions", json=body)))
    t.start()
    _wait_running(bigger)
    os.kill(pid, signal.SIGKILL)
    t.join(60)
    error = assert_openai_error(holder["r"], 500)
    assert "engine" in error["message"]
    deadline = time.monotonic() + 60
    while bigger.client.get("/health").status_code != 200:
        assert time.monotonic() < deadline, "the engine did not come back"
        time.sleep(0.1)
    assert bigger.engine_pid != pid
    bigger.assert_still_serving()
    assert "chatglmcpp_engine_restarts_total 1.0" in bigger.client.get("/metrics").text


def _abandon(server: ServerProcess, body: dict, hang_up: threading.Event) -> None:
    """A client that sends a non-streaming request and hangs up when `hang_up` is set."""
    payload = json.dumps(body).encode()
    head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(head.encode() + payload)
        hang_up.wait(60)


def _gauge(server: ServerProcess, name: str) -> float:
    line = next(x for x in server.client.get("/metrics").text.splitlines() if x.startswith(name + " "))
    return float(line.split()[1])


def test_abandoned_requests_are_cancelled(bigger):
    """8 clients send 512-token requests and hang up: one was generating, seven were waiting. The
    next request must not wait for their generations: it answers within 2 s plus its own time."""
    # Greedy from "Hi", this random model talks for 232 tokens before its end token.
    body = {"model": NAME, "prompt": "Hi", "max_tokens": 512, "temperature": 0}  # 232 tokens if left alone
    own = {"model": NAME, "prompt": "Hello", "max_tokens": 8, "temperature": 0}
    t0 = time.monotonic()
    assert bigger.client.post("/v1/completions", json=own).status_code == 200
    alone = time.monotonic() - t0

    hang_up = threading.Event()
    threads = [threading.Thread(target=_abandon, args=(bigger, body, hang_up)) for _ in range(8)]
    threads[0].start()
    _wait_running(bigger)  # the first one generates (its next tokens serve the others' tokenization)
    for t in threads[1:]:
        t.start()
    deadline = time.monotonic() + 60
    while (h := bigger.client.get("/health").json())["waiting"] < 7 and h["running"]:
        assert time.monotonic() < deadline, h
        time.sleep(0.005)
    with frozen(bigger.engine_pid):  # hold that state while all eight clients go away
        h = bigger.client.get("/health").json()
        assert (h["running"], h["waiting"]) == (1, 7), f"the first request ended before the others queued: {h}"
        hang_up.set()
        for t in threads:
            t.join()
        time.sleep(0.5)
    t0 = time.monotonic()
    r = bigger.client.post("/v1/completions", json=own)
    waited = time.monotonic() - t0
    assert r.status_code == 200, r.text
    t0 = time.monotonic()
    assert bigger.client.post("/v1/completions", json=own).status_code == 200
    alone = max(alone, time.monotonic() - t0)  # its own time, before or after: the machine's load drifts
    assert waited < 2 + alone, (waited, alone)
    metrics = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
               for line in bigger.client.get("/metrics").text.splitlines() if not line.startswith("#")}  # fmt: skip
    completions = {k: v for k, v in metrics.items() if "/v1/completions" in k or "cancelled" in k}
    assert metrics['chatglmcpp_requests_total{path="/v1/completions",status="499"}'] == 8, completions
    assert metrics['chatglmcpp_requests_cancelled_total{state="queued"}'] == 7, completions
    assert metrics['chatglmcpp_requests_cancelled_total{state="running"}'] == 1, completions
    assert metrics["chatglmcpp_generation_tokens_total"] < 232, metrics  # the running one was cut short
