"""builder.runtime.smoke: the OpenAI API smoke checker and client, against our server (a real chatglm.cpp
pipeline on a tiny GGML file, in a thread and via `python -m builder serve`) and against fake servers
that deviate from the API the way real ones do."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import _ggml_fixture
import pytest
from _ggml_fixture import ServerThread, free_port, wait_http
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from builder import backends
from builder.runtime import smoke
from builder.runtime.chatglmcpp.app import create_app
from builder.runtime.chatglmcpp.settings import Settings
from builder.spec import BuildSpec

NAME = "tiny-smoke"
KEY = "smoke-key"


@pytest.fixture(scope="module")
def ggml(tmp_path_factory):
    return _ggml_fixture.tiny_ggml(tmp_path_factory)


@pytest.fixture(scope="module")
def server(ggml):
    app = create_app(Settings(ggml=ggml, served_model_name=NAME, api_key=KEY, max_queue=4))
    with ServerThread(app) as s:
        yield s


def test_run_smoke_passes_against_our_server(server, capsys):
    assert smoke.run_smoke(url=server.url, model=NAME, api_key=KEY, timeout=120, max_tokens=4) is True
    out = capsys.readouterr().out
    for name, _ in smoke.CHECKS:
        assert name in out
    assert "PASS" in out and "FAIL" not in out and "all checks passed" in out


def test_run_smoke_fails_on_wrong_model_or_key(server, capsys):
    results = smoke.smoke_checks(server.url, "other-model", api_key=KEY, timeout=60, max_tokens=2)
    assert not any(r.ok for r in results)
    assert "other-model" in results[0].detail and "404" in results[1].detail
    assert smoke.run_smoke(url=server.url, model=NAME, api_key="wrong", timeout=60) is False
    assert "401" in capsys.readouterr().out


def test_run_smoke_unreachable_server_fails_cleanly(capsys):
    assert smoke.run_smoke(url=f"http://127.0.0.1:{free_port()}", model=NAME, timeout=5) is False
    assert "cannot connect" in capsys.readouterr().out


def test_client_functions(server):
    assert smoke.list_models(server.url + "/v1/", api_key=KEY) == [NAME]
    assert smoke.wait_ready(server.url, api_key=KEY, timeout=5) == [NAME]
    answer = smoke.chat(server.url, NAME, "Say hello.", api_key=KEY, max_tokens=4)
    again = smoke.chat(server.url, NAME, [{"role": "user", "content": "Say hello."}], api_key=KEY, max_tokens=4)
    assert isinstance(answer, str) and answer == again  # temperature 0 by default: greedy
    assert isinstance(smoke.complete(server.url, NAME, "Hello", api_key=KEY, max_tokens=3), str)
    with pytest.raises(smoke.SmokeError, match="401"):
        smoke.chat(server.url, NAME, "Hi", max_tokens=2)


def test_base_url_normalization():
    assert smoke.base_url("http://h:1/v1/") == smoke.base_url("http://h:1/") == "http://h:1"


def fake_server_app(
    *, done: bool = True, usage: bool = True, text_type=str, uncounted: bool = False, broken_completions: bool = False
) -> FastAPI:
    """A minimal OpenAI-ish server; flags switch on the deviations seen in the wild (the bundled
    chatglm_cpp.openai_api never sends [DONE])."""
    app = FastAPI()
    use = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5} if usage else None
    if uncounted:  # Xinference's transformers engine
        use = {"prompt_tokens": -1, "completion_tokens": -1, "total_tokens": -1}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": NAME, "object": "model"}]}

    @app.post("/v1/completions")
    def completions():
        if broken_completions:
            raise RuntimeError("Subclasses must implement _direct_generate")
        text = "ok" if text_type is str else ["ok"]
        return {
            "object": "text_completion",
            "choices": [{"index": 0, "text": text, "finish_reason": "stop"}],
            "usage": use,
        }

    @app.post("/v1/chat/completions")
    async def chat(body: dict):
        if not body.get("stream"):
            return {
                "object": "chat.completion",
                "usage": use,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
            }

        def events():
            for delta, finish in [({"role": "assistant"}, None), ({"content": "ok"}, None), ({}, "stop")]:
                chunk = {
                    "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                }
                yield f"data: {json.dumps(chunk)}\n\n"
            if done:
                yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.mark.parametrize(
    "flags, failing",
    [
        ({}, set()),
        ({"done": False}, {"POST /v1/chat/completions stream"}),
        ({"usage": False}, {"POST /v1/completions", "POST /v1/chat/completions"}),
        ({"text_type": list}, {"POST /v1/completions"}),
        ({"uncounted": True}, set()),
        ({"broken_completions": True}, {"POST /v1/completions"}),
    ],
)
def test_smoke_detects_deviations(flags, failing):
    with ServerThread(fake_server_app(**flags)) as s:
        results = smoke.smoke_checks(s.url, NAME, timeout=30)
    assert {r.name for r in results if not r.ok} == failing


def test_cli_serve_and_smoke_subprocesses(ggml, tmp_path):
    """`python -m builder serve` (API key from $API_KEY) checked by `python -m builder smoke`."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "API_KEY": KEY, "LOG_LEVEL": "warning"}
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "builder",
            "serve",
            "--ggml",
            str(ggml),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--served-model-name",
            NAME,
            "--max-queue",
            "2",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_http(url + "/health", timeout=60, proc=proc)
        ok = subprocess.run(
            [sys.executable, "-m", "builder", "smoke", "--url", url, "--model", NAME],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert "all checks passed" in ok.stdout
        no_key = {k: v for k, v in env.items() if k != "API_KEY"}
        bad = subprocess.run(
            [sys.executable, "-m", "builder", "smoke", "--url", url, "--model", NAME, "--timeout", "30"],
            env=no_key,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert bad.returncode == 1 and "401" in bad.stdout
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.seek(0)
        server_log = log.read()
        log.close()
    assert "Traceback" not in server_log, server_log


def test_skipped_checks_are_reported_not_run():
    with ServerThread(fake_server_app(broken_completions=True)) as s:
        results = smoke.smoke_checks(
            s.url,
            NAME,
            timeout=30,
            skip=backends.get("xinference").smoke_gaps(BuildSpec(xinference_engine="transformers")),
        )
    skipped = [r.name for r in results if r.skipped]
    assert skipped == ["POST /v1/completions"] and all(r.ok for r in results)
    with pytest.raises(ValueError, match="unknown check"):
        smoke.smoke_checks("http://127.0.0.1:9", NAME, skip=frozenset({"nope"}))
