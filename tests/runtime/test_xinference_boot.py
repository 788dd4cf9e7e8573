"""builder.runtime.xinference_boot: unit tests, then a real xinference-local on a tiny GLM (CPU, 127.0.0.1 only).

The integration part needs Xinference 4.1.0 in its own venv (`make xinference-venv`, found through
$XINFERENCE_VENV, default <repo>/.venv-xinference): the project venv never imports xinference. The
boot script itself runs with the project's Python, like the CLI will; it starts that venv's
`xinference-local`, and the Xinference Python client runs as a subprocess with that venv's Python.
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

from builder.runtime import xinference_boot as xb

REPO = Path(__file__).resolve().parents[2]
XINFERENCE_VENV = Path(os.environ.get("XINFERENCE_VENV") or REPO / ".venv-xinference")
XINFERENCE_LOCAL = XINFERENCE_VENV / "bin" / "xinference-local"
XINFERENCE_PY = XINFERENCE_VENV / "bin" / "python"
MODEL = "tiny-glm"
KEY = "sk-boot-test-0123456789abcdef"
ADMIN_PASSWORD = "boot-test-admin-pw"
BOOT_TIMEOUT = 420  # seconds; a shared 2-core box under load needs the margin

needs_xinference = pytest.mark.skipif(
    not XINFERENCE_LOCAL.exists(),
    reason=f"no Xinference venv at {XINFERENCE_VENV} (run `make xinference-venv` or set XINFERENCE_VENV)",
)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from builder.demo.tiny import make_random_glm

    return make_random_glm(tmp_path_factory.mktemp("xinf") / "model")


# --------------------------------------------------------------------------- unit tests


def test_spec_from_model_folder(tiny_model):
    cfg, _ = xb.parse_args([], {"MODEL_PATH": str(tiny_model), "SERVED_MODEL_NAME": MODEL})
    spec = xb.model_spec(cfg)
    tok_cfg = json.loads((tiny_model / "tokenizer_config.json").read_text())
    gen = json.loads((tiny_model / "generation_config.json").read_text())
    assert spec["version"] == 2 and spec["model_name"] == MODEL and spec["model_family"] == MODEL
    assert spec["model_ability"] == ["generate", "chat"]
    assert spec["chat_template"] == tok_cfg["chat_template"]
    assert spec["stop_token_ids"] == gen["eos_token_id"]
    assert spec["stop"] == ["<|endoftext|>", "<|user|>", "<|observation|>"]
    assert spec["context_length"] == 2048  # config.json max_position_embeddings
    assert spec["architectures"] == ["GlmForCausalLM"]
    (s,) = spec["model_specs"]
    assert s["model_format"] == "pytorch" and s["quantization"] == "none"
    assert s["model_uri"] == f"file://{tiny_model.resolve()}"
    assert s["model_size_in_billions"] == "0_1"  # tiny: the smallest label Xinference accepts
    # A context length from the environment wins over config.json.
    cfg, _ = xb.parse_args([], {"MODEL_PATH": str(tiny_model), "XINFERENCE_CONTEXT_LENGTH": "1024"})
    assert xb.model_spec(cfg)["context_length"] == 1024 and cfg.model_name == "model"


def test_chat_template_fallbacks(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    assert xb.chat_template(tmp_path) is None
    (tmp_path / "chat_template.jinja").write_text("{{ messages }}")
    assert xb.chat_template(tmp_path) == "{{ messages }}"
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]})
    )
    assert xb.chat_template(tmp_path) == "D"
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 2, "seq_length": 8192}))
    assert xb.context_length(tmp_path) == 8192
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>"}}))
    assert xb.stop_tokens(tmp_path) == ([2], ["</s>"])


def test_model_spec_rejects_non_hf_folder(tmp_path):
    cfg, _ = xb.parse_args(["--model-path", str(tmp_path)], {})
    with pytest.raises(xb.BootError, match="no config.json"):
        xb.model_spec(cfg)
    assert xb.main(["--model-path", str(tmp_path)], {"XINFERENCE_AUTH": "off"}) == 2


def test_launch_request_engines_and_remote_code(tiny_model):
    env = {"MODEL_PATH": str(tiny_model), "SERVED_MODEL_NAME": MODEL}
    cfg, _ = xb.parse_args([], env)
    launch = xb.launch_request(cfg, xb.model_spec(cfg))
    assert launch["model_engine"] == "Transformers" and launch["model_uid"] == MODEL
    assert "trust_remote_code" not in launch and "n_gpu" not in launch
    cfg, _ = xb.parse_args(
        [],
        {
            **env,
            "XINFERENCE_ENGINE": "vllm",
            "TRUST_REMOTE_CODE": "1",
            "XINFERENCE_N_GPU": "2",
            "XINFERENCE_LAUNCH_ARGS": '{"gpu_memory_utilization": 0.8}',
        },
    )
    launch = xb.launch_request(cfg, xb.model_spec(cfg))
    assert launch["model_engine"] == "vLLM" and launch["trust_remote_code"] is True
    assert launch["n_gpu"] == 2 and launch["gpu_memory_utilization"] == 0.8
    assert xb.xinference_env(cfg, {})["XINFERENCE_TRUST_REMOTE_CODE"] == "1"
    with pytest.raises(xb.BootError, match="XINFERENCE_ENGINE"):
        xb.parse_args([], {"XINFERENCE_ENGINE": "sglang"})


def test_xinference_env_auth_and_secrets(tmp_path):
    base = {
        "API_KEY": "k",
        "XINFERENCE_API_KEY": "k",
        "XINFERENCE_ADMIN_PASSWORD": "p",
        "PATH": "/bin",
        "XINFERENCE_TRUST_REMOTE_CODE": "1",
    }
    cfg, _ = xb.parse_args([], {**base, "XINFERENCE_HOME": str(tmp_path), "XINFERENCE_TRUST_REMOTE_CODE": "0"})
    env = xb.xinference_env(cfg, base)
    assert env["XINFERENCE_AUTH_ADVANCED"] == "true" and env["XINFERENCE_HOME"] == str(tmp_path)
    assert env["XINFERENCE_TRUST_REMOTE_CODE"] == "0"  # default off, whatever leaked in
    assert not {"API_KEY", "XINFERENCE_API_KEY", "XINFERENCE_ADMIN_PASSWORD"} & env.keys()
    assert env["HF_HUB_OFFLINE"] == "1" and env["PATH"] == "/bin"
    for word in ("off", "0", "false", "disabled"):
        cfg, _ = xb.parse_args([], {"XINFERENCE_AUTH": word})
        assert xb.xinference_env(cfg, {})["XINFERENCE_AUTH_ADVANCED"] == "false"
        assert xb.resolve_api_key(cfg, create=True) is None
    with pytest.raises(xb.BootError):
        xb.parse_args([], {"XINFERENCE_AUTH": "maybe"})
    # API_KEY (compose's project-wide key) is honoured when XINFERENCE_API_KEY is unset.
    cfg, _ = xb.parse_args([], {"API_KEY": "from-compose"})
    assert xb.resolve_api_key(cfg, create=False) == "from-compose"


def test_generated_key_is_kept(tmp_path):
    cfg, _ = xb.parse_args([], {"XINFERENCE_HOME": str(tmp_path)})
    assert xb.resolve_api_key(cfg, create=False) is None
    key = xb.resolve_api_key(cfg, create=True)
    path = tmp_path / "auth" / xb.BOOT_KEY_FILE
    assert key.startswith("xf-") and path.read_text().strip() == key
    assert path.stat().st_mode & 0o777 == 0o600
    assert xb.resolve_api_key(cfg, create=True) == key  # stable across restarts


def test_health_fails_without_server():
    port = _free_port()
    assert xb.main(["--health"], {"XINFERENCE_PORT": str(port), "XINFERENCE_API_KEY": "x"}) == 1


@needs_xinference
def test_xinference_python_is_the_venvs():
    assert Path(xb.xinference_python(str(XINFERENCE_LOCAL))).parent == XINFERENCE_VENV / "bin"


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
    """A `python -m builder.runtime.xinference_boot` process (the container's main process) and its log."""

    def __init__(self, env: dict, log_path: Path):
        self.env, self.log_path = env, log_path
        self.url = f"http://127.0.0.1:{env['XINFERENCE_PORT']}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> float:
        t0 = time.monotonic()
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "builder.runtime.xinference_boot"],
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
        [sys.executable, "-m", "builder.runtime.xinference_boot", "--health"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "healthy" in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "builder.runtime.xinference_boot", "--health"],
        cwd=REPO,
        env={**env, "XINFERENCE_API_KEY": "sk-wrong"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1 and "unhealthy" in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "builder.runtime.xinference_boot", "--health"],
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


def test_same_registration_detects_changes(tiny_model):
    cfg, _ = xb.parse_args([], {"MODEL_PATH": str(tiny_model), "SERVED_MODEL_NAME": MODEL})
    spec = xb.model_spec(cfg)
    # What GET /v1/model_registrations/LLM/NAME returns: the spec plus server-side fields.
    echoed = json.loads(json.dumps({**spec, "is_builtin": False, "cache_config": None}))
    echoed["model_specs"][0]["model_size_in_billions"] = "0_1"
    assert xb._same_registration(echoed, spec)
    changed = json.loads(json.dumps(echoed))
    changed["chat_template"] = "{{ messages }}"
    assert not xb._same_registration(changed, spec)
    moved = json.loads(json.dumps(echoed))
    moved["model_specs"][0]["model_uri"] = "file:///elsewhere"
    assert not xb._same_registration(moved, spec)
    assert not xb._same_registration("not found", spec)
