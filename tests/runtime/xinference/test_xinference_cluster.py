"""builder.runtime.xinference.cluster: roles, commands, the supervisor's launch decisions, a worker's
graceful leave (real processes: the boot, a stand-in `xinference-worker` that hosts its actor
pool as a child, as 4.1.0 does, and a stand-in supervisor HTTP API on 127.0.0.1).

The real distributed mode (Xinference 4.1.0's supervisor and two workers in containers, a worker
stopped and started under load) runs in tests/e2e/test_cluster.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from builder.runtime.xinference import cluster, config, registration
from builder.runtime.xinference.__main__ import main
from builder.runtime.xinference.api import Api

REPO = Path(__file__).resolve().parents[3]


def _cfg(env: dict) -> tuple[config.BootConfig, cluster.ClusterConfig]:
    cfg, _ = config.parse_args([], env)
    return cfg, cluster.parse_cluster(cfg, env)


# --------------------------------------------------------------------------- configuration


def test_roles_and_defaults():
    cfg, cluster_cfg = _cfg(
        {"XINFERENCE_ROLE": "supervisor", "XINFERENCE_HOST": "supervisor", "XINFERENCE_REPLICAS": "3"}
    )
    assert (
        cluster_cfg.role,
        cluster_cfg.host,
        cluster_cfg.replicas,
        cluster_cfg.min_workers,
        cluster_cfg.supervisor_port,
    ) == (
        "supervisor",
        "supervisor",
        3,
        3,
        19997,
    )
    assert cluster.supervisor_command(cfg, cluster_cfg)[1:] == [
        "-H",
        "supervisor",
        "-p",
        "9997",
        "--supervisor-port",
        "19997",
    ]
    env = {
        "XINFERENCE_ROLE": "Worker",
        "XINFERENCE_HOST": "worker-1",
        "XINFERENCE_SUPERVISOR_URL": "http://supervisor:9997/",
        "XINFERENCE_WORKER_PORT": "31000",
    }
    cfg, cluster_cfg = _cfg(env)
    assert cluster_cfg.worker_address == "worker-1:31000" and cluster_cfg.supervisor_url == "http://supervisor:9997"
    assert cluster.worker_command(cfg, cluster_cfg)[1:] == [
        "-e", "http://supervisor:9997", "-H", "worker-1", "--worker-port", "31000",
        "-MH", "worker-1", "--metrics-exporter-port", "30002",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "env, message",
    [
        ({"XINFERENCE_ROLE": "worker", "XINFERENCE_SUPERVISOR_URL": "http://s:9997"}, "XINFERENCE_HOST"),
        ({"XINFERENCE_ROLE": "worker", "XINFERENCE_HOST": "w"}, "XINFERENCE_SUPERVISOR_URL"),
        ({"XINFERENCE_ROLE": "leader", "XINFERENCE_HOST": "w"}, "XINFERENCE_ROLE"),
        ({"XINFERENCE_ROLE": "supervisor", "XINFERENCE_HOST": "s", "XINFERENCE_REPLICAS": "two"}, "whole number"),
        ({"XINFERENCE_ROLE": "supervisor", "XINFERENCE_HOST": "s", "XINFERENCE_MIN_WORKERS": "0"}, "at least 1"),
    ],
)
def test_bad_configuration_is_refused(env, message):
    cfg, _ = config.parse_args([], env)
    with pytest.raises(config.BootError, match=message):
        cluster.parse_cluster(cfg, env)
    assert main([], env) == 2  # the entry point says why and exits 2, starting nothing


def test_cluster_env_speeds_up_dead_worker_detection_unless_set():
    cfg, _ = config.parse_args([], {})
    env = cluster.cluster_env(cfg, {"XINFERENCE_HEALTH_CHECK_TIMEOUT": "7"})
    assert env["XINFERENCE_HEALTH_CHECK_INTERVAL"] == "1" and env["XINFERENCE_HEALTH_CHECK_FAILURE_THRESHOLD"] == "3"
    assert env["XINFERENCE_HEALTH_CHECK_TIMEOUT"] == "7"


def test_worker_seeds_the_registration(tiny_model, tmp_path):
    cfg, _ = config.parse_args(
        [], {"MODEL_PATH": str(tiny_model), "SERVED_MODEL_NAME": "tiny", "XINFERENCE_HOME": str(tmp_path)}
    )
    spec = registration.model_spec(cfg)
    path = cluster.seed_registration(cfg, spec)
    assert path == tmp_path / "model" / "v2" / "llm" / "tiny.json"
    assert json.loads(path.read_text()) == spec


# --------------------------------------------------------------------------- a stand-in supervisor API


class FakeSupervisor:
    """The few routes the boot script uses, with state a test changes: workers, running models, launches."""

    def __init__(self):
        self.workers: list[str] = []
        self.running: list[str] = []
        self.launches: list[tuple[list[str], dict]] = []  # (workers at launch time, body)
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, body) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/status":
                    return self._send(200, {"workers": {w: {"failure_remaining_count": 3} for w in fake.workers}})
                if self.path == "/v1/models":
                    return self._send(200, {"data": [{"id": m} for m in fake.running]})
                if self.path.startswith("/v1/models/instances"):
                    reps = [{"worker_address": w, "status": "READY"} for w in fake.workers]
                    return self._send(200, [{"replica_statuses": reps}])
                self._send(404, {"detail": "not found"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/v1/models":
                    fake.launches.append((list(fake.workers), body))
                    fake.running.append(body["model_uid"])
                    return self._send(200, {"model_uid": body["model_uid"]})
                self._send(404, {"detail": "not found"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def supervisor():
    fake = FakeSupervisor()
    yield fake
    fake.close()


def test_supervisor_launches_once_every_worker_is_registered(supervisor, tiny_model):
    env = {
        "MODEL_PATH": str(tiny_model),
        "SERVED_MODEL_NAME": "tiny",
        "XINFERENCE_ROLE": "supervisor",
        "XINFERENCE_HOST": "supervisor",
        "XINFERENCE_REPLICAS": "2",
    }
    cfg, cluster_cfg = _cfg(env)
    launch = registration.launch_request(cfg, registration.model_spec(cfg))
    api = Api(supervisor.url)

    def join():
        for w in ("worker-1:30001", "worker-2:30001"):
            time.sleep(1.5)
            supervisor.workers.append(w)

    threading.Thread(target=join, daemon=True).start()
    assert cluster.launch_replicas(api, cfg, cluster_cfg, launch, None, time.monotonic() + 30) == "launched"
    (workers, body), *more = supervisor.launches
    assert not more and len(workers) == 2, "launched before both workers were registered"
    assert body["replica"] == 2 and body["model_uid"] == "tiny" and body["model_engine"] == "Transformers"
    # A restarted supervisor whose workers replayed the model launches nothing.
    assert cluster.launch_replicas(api, cfg, cluster_cfg, launch, None, time.monotonic() + 5) == "running"
    assert len(supervisor.launches) == 1
    supervisor.workers.clear()
    with pytest.raises(config.BootError, match="0 of 2 workers"):
        cluster.launch_replicas(api, cfg, cluster_cfg, launch, None, time.monotonic() + 1)


def test_worker_health_asks_the_supervisor(supervisor):
    env = {"XINFERENCE_ROLE": "worker", "XINFERENCE_HOST": "worker-1", "XINFERENCE_SUPERVISOR_URL": supervisor.url}
    assert main(["--health"], env) == 1
    supervisor.workers.append("worker-1:30001")
    assert main(["--health"], env) == 0
    assert main(["--health"], {**env, "XINFERENCE_SUPERVISOR_URL": "http://127.0.0.1:9"}) == 1


# --------------------------------------------------------------------------- a worker's graceful leave

# Stand-in for `xinference-worker` 4.1.0: it hosts the actor pool (`python -m
# xinference.deploy.worker_relaunch ...`) as a child and, on SIGTERM, sends SIGTERM to it; the pool
# deregisters from the supervisor only on SIGINT. Each records what it saw in $FAKE_LOG.
FAKE_WORKER = textwrap.dedent(
    """\
    #!{python}
    import json, os, signal, subprocess, sys
    log = os.environ["FAKE_LOG"]
    with open(log, "a") as f:
        f.write(json.dumps({{"host_argv": sys.argv[1:]}}) + "\\n")
    pool = subprocess.Popen([sys.executable, {pool!r}, "-m", "xinference.deploy.worker_relaunch", "/tmp/x.json"])
    signal.signal(signal.SIGTERM, lambda *_: pool.send_signal(signal.SIGTERM))
    sys.exit(pool.wait())
    """
)
FAKE_POOL = textwrap.dedent(
    """\
    import json, os, signal, sys, time
    def on(signum, _):
        with open(os.environ["FAKE_LOG"], "a") as f:
            f.write(json.dumps({"pool_signal": signal.Signals(signum).name}) + "\\n")
        sys.exit(0 if signum == signal.SIGINT else 143)
    signal.signal(signal.SIGINT, on)
    signal.signal(signal.SIGTERM, on)
    with open(os.environ["FAKE_LOG"], "a") as f:
        f.write(json.dumps({"pool": "started"}) + "\\n")
    while True:
        time.sleep(0.1)
    """
)


def _fake_xinference(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "pool.py").write_text(FAKE_POOL)
    worker = bin_dir / "xinference-worker"
    worker.write_text(FAKE_WORKER.format(python=sys.executable, pool=str(tmp_path / "pool.py")))
    worker.chmod(0o755)
    local = bin_dir / "xinference-local"
    local.write_text("#!/bin/sh\nexit 1\n")
    local.chmod(0o755)
    return local


def _events(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stopping_a_worker_deregisters_it_first(supervisor, tiny_model, tmp_path, signum):
    """docker stop / pod deletion (SIGTERM) reaches the actor pool as SIGINT: its handler deregisters."""
    log = tmp_path / "events.jsonl"
    env = {
        **{k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "PYTHONPATH")},
        "PYTHONPATH": str(REPO),
        "FAKE_LOG": str(log),
        "XINFERENCE_LOCAL": str(_fake_xinference(tmp_path)),
        "XINFERENCE_HOME": str(tmp_path / "home"),
        "MODEL_PATH": str(tiny_model),
        "SERVED_MODEL_NAME": "tiny",
        "XINFERENCE_ROLE": "worker",
        "XINFERENCE_HOST": "worker-1",
        "XINFERENCE_SUPERVISOR_URL": supervisor.url,
    }
    boot = subprocess.Popen(
        [sys.executable, "-m", "builder.runtime.xinference"], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        _wait_for(lambda: {"pool": "started"} in _events(log))
        boot.send_signal(signum)
        code = boot.wait(timeout=30)
    finally:
        if boot.poll() is None:
            boot.kill()
    stderr = boot.stderr.read()
    events = _events(log)
    assert events[0]["host_argv"] == [
        "-e", supervisor.url, "-H", "worker-1", "--worker-port", "30001",
        "-MH", "worker-1", "--metrics-exporter-port", "30002",
    ]  # fmt: skip
    assert {"pool_signal": "SIGINT"} in events and {"pool_signal": "SIGTERM"} not in events, (events, stderr)
    assert code == 0, stderr
    assert "leaving the cluster" in stderr
    assert (tmp_path / "home" / "model" / "v2" / "llm" / "tiny.json").is_file()


def test_a_worker_that_does_not_leave_in_time_gets_sigterm():
    """The leave has a deadline: a worker whose pool ignores SIGINT is sent SIGTERM after `grace` seconds."""
    pool = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(60)"
    host = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {pool!r}, '{cluster.WORKER_POOL_MARKER}']); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", host])
    pools: list[int] = []
    try:
        _wait_for(lambda: bool(pools.extend(cluster.actor_pools(proc.pid)) or pools))
        start = time.monotonic()
        cluster.leave(proc, grace=0.5)
        assert proc.wait(timeout=10) == -signal.SIGTERM
        assert 0.4 < time.monotonic() - start < 5
    finally:
        for pid in [proc.pid, *pools]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
