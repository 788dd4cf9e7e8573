"""The local role's process: xinference-local as a child with the model registered and launched, the
health check, and the signal handling and exit codes every role shares (the boot may be PID 1)."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
import urllib.error
from collections.abc import Callable, Mapping

from builder.runtime.xinference.api import Api, running_models, wait_status
from builder.runtime.xinference.auth import boot_admin_token, resolve_api_key
from builder.runtime.xinference.config import BootConfig, BootError, log
from builder.runtime.xinference.registration import launch_request, model_spec, register

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
SETUP_ERRORS = (BootError, OSError, urllib.error.URLError)  # what a failed setup step raises


def xinference_env(cfg: BootConfig, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment xinference-local runs with."""
    env = dict(os.environ if base is None else base)
    env["XINFERENCE_AUTH_ADVANCED"] = "true" if cfg.auth else "false"
    env["XINFERENCE_TRUST_REMOTE_CODE"] = "1" if cfg.trust_remote_code else "0"
    if cfg.home:
        env["XINFERENCE_HOME"] = str(cfg.home)
    # Local file:// models only: skip the hub reachability probe and never reach for a hub.
    env.setdefault("XINFERENCE_MODEL_SRC", "huggingface")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    for name in ("XINFERENCE_API_KEY", "API_KEY", "XINFERENCE_ADMIN_PASSWORD"):
        env.pop(name, None)  # the server does not need them; keep them out of model processes
    return env


# --------------------------------------------------------------------------- launch and health


def autostart_state(api: Api, uid: str) -> dict:
    status, data = api.call("GET", "/v1/autostart/models")
    if status == 200 and isinstance(data, dict):
        for entry in data.get("models", []):
            if entry.get("launch", {}).get("model_uid") == uid:
                return entry.get("state") or {}
    return {}


def ensure_launched(api: Api, cfg: BootConfig, launch: dict, proc: subprocess.Popen | None, deadline: float) -> float:
    """Upsert the autostart entry (Xinference launches it) and wait until it runs; returns seconds taken.

    Autostart launches the model now and on every later start of the same $XINFERENCE_HOME, so a
    container restart relaunches it even before the boot registers it again."""
    t0 = time.monotonic()
    uid = launch["model_uid"]
    api.ok(
        "POST",
        "/v1/autostart/models",
        {"enabled": True, "max_retries": 3, "retry_interval_seconds": 10, "launch": launch},
    )
    while True:
        if proc is not None and proc.poll() is not None:
            raise BootError(f"xinference-local exited with {proc.returncode} while launching {uid!r}")
        if uid in running_models(api):
            return time.monotonic() - t0
        state = autostart_state(api, uid)
        if state.get("status") == "error" and state.get("message") == "Autostart retry limit reached.":
            raise BootError(f"launching {uid!r} failed: {state.get('last_error')}")
        if time.monotonic() > deadline:
            raise BootError(f"{uid!r} was not running after {cfg.timeout:.0f}s; last autostart state: {state}")
        time.sleep(1.0)


def health(cfg: BootConfig, chat_timeout: float = 60.0) -> int:
    """0 when the model is listed as running and answers a 1-token chat completion (`--health`)."""
    api = Api(cfg.url, resolve_api_key(cfg, create=False), timeout=10)
    try:
        models = running_models(api)
        if cfg.model_name not in models:
            print(f"unhealthy: {cfg.model_name!r} not running (running: {sorted(models)})")
            return 1
        body = {
            "model": cfg.model_name,
            "messages": [{"role": "user", "content": "ping"}],
            "max_tokens": 1,
            "temperature": 0,
        }
        status, data = api.call("POST", "/v1/chat/completions", body, timeout=chat_timeout)
        if status != 200 or not (isinstance(data, dict) and data.get("choices")):
            print(f"unhealthy: chat -> {status}: {str(data)[:500]}")
            return 1
    except Exception as e:  # noqa: BLE001 - any failure is "unhealthy"
        print(f"unhealthy: {e}")
        return 1
    print(f"healthy: {cfg.model_name} at {cfg.url}")
    return 0


# --------------------------------------------------------------------------- the foreground process


def shell_exit_code(code: int) -> int:
    """A child's exit code as a shell reports it: killed by signal N (code -N) -> 128 + N."""
    return 128 - code if code < 0 else code


def forward_signals(proc: subprocess.Popen, handler: Callable[[int], None] | None = None) -> None:
    """Hand SIGTERM/SIGINT/SIGHUP/SIGQUIT to the child (or to `handler`, which decides how)."""

    def forward(signum, _frame):
        if handler is not None:
            handler(signum)
        elif proc.poll() is None:
            try:
                proc.send_signal(signum)
            except ProcessLookupError:
                pass

    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, forward)


def stop_child(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_foreground(proc: subprocess.Popen, name: str) -> int:
    """Wait for the child, reaping any orphan re-parented to us (we may be PID 1); its exit code."""
    if proc.returncode is not None:
        return shell_exit_code(proc.returncode)
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:  # already reaped (a signal handler's proc.poll())
            return shell_exit_code(proc.returncode) if proc.returncode is not None else 0
        if pid == proc.pid:
            code = shell_exit_code(os.waitstatus_to_exitcode(status))
            proc.returncode = code
            log(f"{name} exited with {code}")
            return code


def start_child(cmd: list[str], env: Mapping[str, str]) -> subprocess.Popen:
    log("starting: " + shlex.join(cmd))
    return subprocess.Popen(cmd, env=env)


def setup_failed(proc: subprocess.Popen, name: str, error: Exception) -> int:
    """The boot's exit code when a setup step failed: the child's own when it died, else 1 (child stopped)."""
    if proc.poll() is not None:
        log(f"{name} exited with {proc.returncode}")
        return shell_exit_code(proc.returncode)
    log(f"setup failed: {error}")
    stop_child(proc)
    return 1


def boot(cfg: BootConfig, env: Mapping[str, str] | None = None) -> int:
    """Run xinference-local with the model registered and launched; return xinference's exit code.

    Auth is seeded first (auth.py); then xinference-local starts as a child, the boot waits for its
    /status, registers the model folder (registration.py), adds it to Xinference's autostart list and
    waits until it is listed in /v1/models. Then it stays in front: signals are forwarded, orphans
    reaped, and xinference's exit code is ours (128+N when killed by signal N). A failed setup (bad
    model folder, launch error) stops xinference and exits non-zero."""
    t_start = time.monotonic()
    spec = model_spec(cfg)  # fail before starting anything when the folder is wrong
    launch = launch_request(cfg, spec)
    child_env = xinference_env(cfg, env)
    admin_token = boot_admin_token(cfg, child_env)
    proc = start_child([cfg.xinference_local, "--host", cfg.host, "--port", str(cfg.port), *cfg.local_args], child_env)
    forward_signals(proc)

    api = Api(cfg.url, admin_token)  # register + autostart: admin scopes (a user's JWT)
    deadline = time.monotonic() + cfg.timeout
    try:
        wait_status(api, proc, deadline)
        log(f"xinference is up after {time.monotonic() - t_start:.1f}s")
        outcome = register(api, spec)
        log(
            f"model {cfg.model_name!r} {outcome} ({spec['model_specs'][0]['model_uri']}, context {spec['context_length']})"
        )
        took = ensure_launched(api, cfg, launch, proc, deadline)
        log(
            f"model {cfg.model_name!r} running on {launch['model_engine']} after {took:.1f}s "
            f"({time.monotonic() - t_start:.1f}s since start); serving {cfg.url}/v1"
        )
    except SETUP_ERRORS as e:
        return setup_failed(proc, "xinference-local", e)
    return wait_foreground(proc, "xinference-local")
