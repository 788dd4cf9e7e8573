"""builder.runtime.xinference.process: a real xinference-local on a tiny GLM (CPU, 127.0.0.1 only), booted by
`python -m builder.runtime.xinference` as the container does, then registered, launched, checked and restarted.

It needs Xinference 4.1.0 in its own venv (`make xinference-venv`, found through $XINFERENCE_VENV,
default <repo>/.venv-xinference): the project venv never imports xinference. The boot itself runs
with the project's Python; it starts that venv's `xinference-local`, and the Xinference Python client
runs as a subprocess with that venv's Python.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from builder.runtime.xinference.__main__ import main

REPO = Path(__file__).resolve().parents[3]
XINFERENCE_VENV = Path(os.environ.get("XINFERENCE_VENV") or REPO / ".venv-xinference")
XINFERENCE_LOCAL = XINFERENCE_VENV / "bin" / "xinference-local"
XINFERENCE_PY = XINFERENCE_VENV / "bin" / "python"
MODEL = "tiny-glm"
KEY = "sk-boot-test-0123456789abcdef"
ADMIN_PASSWORD = "boot-test-admin-pw"
BOOT_TIMEOUT = 420  # seconds; a shared 2-core box under load needs the margin


def test_health_fails_without_server():
    port = _free_port()
    assert main(["--health"], {"XINFERENCE_PORT": str(port), "XINFERENCE_API_KEY": "x"}) == 1


@pytest.mark.parametrize(
    "script, code, logged",
    [
        ("exit 3", 3, "xinference-local exited with 3"),  # died during setup: its code is ours
        ("kill -TERM $$", 128 + signal.SIGTERM, "xinference-local exited with -15"),  # killed: 128 + N
        ("exec sleep 60", 1, "did not answer in time"),  # alive but never up: stopped, exit 1
    ],
)
def test_a_failed_setup_stops_xinference_and_says_why(tiny_model, tmp_path, script, code, logged):
    """The boot as the image runs it, in front of a stand-in xinference-local that fails its setup."""
    local = tmp_path / "xinference-local"
    local.write_text(f"#!/bin/sh\n{script}\n")
    local.chmod(0o755)
    env = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": str(REPO),
        "XINFERENCE_LOCAL": str(local),
        "XINFERENCE_AUTH": "off",
        "XINFERENCE_HOME": str(tmp_path / "home"),
        "XINFERENCE_PORT": str(_free_port()),
        "MODEL_PATH": str(tiny_model),
    }
    r = subprocess.run(
        [sys.executable, "-m", "builder.runtime.xinference", "--timeout", "2"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == code, r.stderr
    assert logged in r.stderr


# --------------------------------------------------------------------------- real xinference-local


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(method, url, body=None, key=None, timeout=60):
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


class Booted:
    """A `python -m builder.runtime.xinference` process (the container's main process) and its log."""

    def __init__(self, env: dict, log_path: Path):
        self.env, self.log_path = env, log_path
        self.url = f"http://127.0.0.1:{env['XINFERENCE_PORT']}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> float:
        t0 = time.monotonic()
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "builder.runtime.xinference"],
            cwd=REPO,
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        while time.monotonic() - t0 < BOOT_TIMEOUT:
            text = self.log_path.read_text(errors="replace")
            if "[xinference-boot] model 'tiny-glm' running" in text:
                return time.monotonic() - t0
            if self.proc.poll() is not None:
                break
            time.sleep(1)
        self.stop()
        pytest.fail(f"boot did not get {MODEL} running:\n{self.boot_lines()}\n--- tail ---\n{self.tail()}")

    def boot_lines(self) -> str:
        return "\n".join(
            line for line in self.log_path.read_text(errors="replace").splitlines() if "[xinference-boot]" in line
        )

    def tail(self, n=4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def stop(self, sig=signal.SIGTERM, timeout=90) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    if not XINFERENCE_LOCAL.exists():
        pytest.skip(f"no Xinference venv at {XINFERENCE_VENV} (run `make xinference-venv` or set XINFERENCE_VENV)")
    home = tmp_path_factory.mktemp("xinference-home")
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("XINFERENCE_") and k not in ("API_KEY", "MODEL_PATH")
    }
    env.update(
        XINFERENCE_HOME=str(home),
        XINFERENCE_HOST="127.0.0.1",
        XINFERENCE_PORT=str(_free_port()),
        XINFERENCE_LOCAL=str(XINFERENCE_LOCAL),
        XINFERENCE_API_KEY=KEY,
        XINFERENCE_ADMIN_PASSWORD=ADMIN_PASSWORD,
        XINFERENCE_BOOT_TIMEOUT=str(BOOT_TIMEOUT),
        MODEL_PATH=str(tiny_model),
        SERVED_MODEL_NAME=MODEL,
        PYTHONPATH=str(REPO),
    )
    b = Booted(env, home / "boot.log")
    b.first_start_s = b.start()
    print(f"\nxinference boot: {MODEL} running {b.first_start_s:.1f}s after start\n{b.boot_lines()}")
    yield b
    b.stop()


@pytest.mark.slow
def test_boot_registers_and_launches(server):
    lines = server.boot_lines()
    assert f"model '{MODEL}' registered" in lines and "running on Transformers" in lines
    assert "user 'admin' created, API key installed" in lines
    status, models = _http("GET", server.url + "/v1/models", key=KEY)
    assert status == 200
    (m,) = [m for m in models["data"] if m["id"] == MODEL]
    assert m["model_engine"] == "Transformers" and m["model_ability"] == ["generate", "chat"]
    assert m["context_length"] == 2048


@pytest.mark.slow
def test_openai_chat_with_bearer_key(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 5, "temperature": 0}
    status, data = _http("POST", server.url + "/v1/chat/completions", body, key=KEY)
    assert status == 200, data
    assert data["choices"][0]["message"]["role"] == "assistant"
    assert isinstance(data["choices"][0]["message"]["content"], str)


@pytest.mark.slow
def test_auth_is_enforced(server):
    assert _http("GET", server.url + "/status")[0] == 200  # unauthenticated by design
    assert _http("GET", server.url + "/v1/models")[0] == 401
    assert _http("GET", server.url + "/v1/models", key="sk-wrong")[0] == 401
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    assert _http("POST", server.url + "/v1/chat/completions", body)[0] == 401


@pytest.mark.slow
def test_health_command(server):
    env = {**server.env}
    r = subprocess.run(
        [sys.executable, "-m", "builder.runtime.xinference", "--health"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "healthy" in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "builder.runtime.xinference", "--health"],
        cwd=REPO,
        env={**env, "XINFERENCE_API_KEY": "sk-wrong"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1 and "unhealthy" in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "builder.runtime.xinference", "--health"],
        cwd=REPO,
        env={**env, "SERVED_MODEL_NAME": "not-launched"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1 and "not running" in r.stdout


CLIENT_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from xinference.client import Client
    url, key, password, name = sys.argv[1:5]
    out = {}
    # The seed's flow in its 4.x form: Client(url, api_key=...), get_model, chat(messages=[...]).
    client = Client(url, api_key=key)
    out["listed"] = sorted(client.list_models())
    model = client.get_model(name)
    reply = model.chat(messages=[{"role": "user", "content": "Hi"}], generate_config={"max_tokens": 4})
    out["chat_role"] = reply["choices"][0]["message"]["role"]
    # launch_model with an API key: 4.1.0 refuses (API keys may only query and chat).
    try:
        client.launch_model(model_name=name, model_engine="transformers", model_uid=name + "-client")
        out["launch_with_key"] = "launched"
    except RuntimeError as e:
        out["launch_with_key"] = str(e)
    # launch_model as the admin user (login -> JWT): a second copy, chat, terminate.
    admin = Client(url)
    admin.login("admin", password)
    uid = admin.launch_model(model_name=name, model_engine="transformers", model_uid=name + "-client")
    reply = admin.get_model(uid).chat(messages=[{"role": "user", "content": "Hello"}], generate_config={"max_tokens": 3})
    out["client_launch_chat_role"] = reply["choices"][0]["message"]["role"]
    admin.terminate_model(uid)
    out["after_terminate"] = sorted(admin.list_models())
    print("RESULT " + json.dumps(out))
    """
)


@pytest.mark.slow
def test_python_client_flow(server):
    r = subprocess.run(
        [str(XINFERENCE_PY), "-c", CLIENT_SCRIPT, server.url, KEY, ADMIN_PASSWORD, MODEL],
        capture_output=True,
        text=True,
        timeout=BOOT_TIMEOUT,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = json.loads(r.stdout.split("RESULT ", 1)[1])
    assert out["listed"] == [MODEL]
    assert out["chat_role"] == "assistant"
    assert "API keys can only access model query and inference endpoints" in out["launch_with_key"]
    assert out["client_launch_chat_role"] == "assistant"
    assert out["after_terminate"] == [MODEL]


@pytest.mark.slow
def test_restart_relaunches_model(server):
    """SIGTERM reaches xinference (exit 0, nothing left behind); the next boot finds the model back."""
    pid = server.proc.pid
    t0 = time.monotonic()
    assert server.stop(signal.SIGTERM) == 0
    stop_s = time.monotonic() - t0
    assert "xinference-local exited with 0" in server.boot_lines()
    leftovers = subprocess.run(["ps", "-eo", "pid,ppid,args"], capture_output=True, text=True).stdout
    assert not [line for line in leftovers.splitlines() if server.env["XINFERENCE_HOME"] in line or f" {pid} " in line]

    server.log_path = server.log_path.with_name("boot-restart.log")
    restart_s = server.start()
    lines = server.boot_lines()
    print(f"\nstop {stop_s:.1f}s, restart -> running {restart_s:.1f}s\n{lines}")
    assert f"model '{MODEL}' unchanged" in lines  # idempotent re-registration
    assert "user 'admin' kept, API key already present" in lines
    # Autostart relaunched it: still exactly one entry, active (read as admin: API keys get 403 here).
    assert _http("GET", server.url + "/v1/autostart/models", key=KEY)[0] == 403
    status, tok = _http("POST", server.url + "/token", {"username": "admin", "password": ADMIN_PASSWORD})
    assert status == 200, tok
    status, auto = _http("GET", server.url + "/v1/autostart/models", key=tok["access_token"])
    assert status == 200, auto
    (entry,) = auto["models"]
    assert entry["launch"]["model_uid"] == MODEL and entry["state"]["instance_status"] == "READY"
    body = {"model": MODEL, "messages": [{"role": "user", "content": "again"}], "max_tokens": 2}
    status, data = _http("POST", server.url + "/v1/chat/completions", body, key=KEY)
    assert status == 200, data
