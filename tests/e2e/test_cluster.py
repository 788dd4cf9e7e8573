"""Xinference's distributed mode in Docker: compose.xinference-cluster.yaml with the image `make image` builds.

One supervisor and two workers; the model registered once and launched with two replicas, one per
worker; the OpenAI API on the supervisor with the project's key. Under a steady load of chat
requests, one worker container is stopped (`docker compose stop`): only requests in flight while it
stops may fail, everything after is answered by the other replica; started again, the worker rejoins
and serves its replica again. Then the other worker is killed (SIGKILL, no goodbye): the supervisor
drops it within seconds. Figures go to build/e2e/xinference-cluster.json and the test log.

The containers run as the Kubernetes render runs them: read-only root filesystem, no capabilities.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from builder.demo import model as demo

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "compose.xinference-cluster.yaml"
SPEC = REPO / "tests" / "e2e" / "local-bases.yaml"
NAME, TAG = "e2e", "test"  # the image test_pipeline builds: reused from the cache
PROJECT = "e2e-xinference-cluster"
API_KEY = "e2e-cluster-key-123"
PORT = 19987
URL = f"http://127.0.0.1:{PORT}"
FIGURES: dict[str, object] = {}

pytestmark = pytest.mark.e2e


def _run(argv: list[str], timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(
        argv, cwd=REPO, capture_output=True, text=True, timeout=timeout, env={**os.environ, "DOCKER_BUILDKIT": "1"}
    )
    if check:
        assert res.returncode == 0, f"{' '.join(argv)}:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    return res


def compose(*args: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
    env_file = REPO / "build" / "e2e-cluster.env"
    return _run(
        ["/usr/bin/docker", "compose", "--project-directory", str(REPO), "-f", str(COMPOSE_FILE), "-p", PROJECT,
         "--env-file", str(env_file), *args],
        timeout=timeout, check=check,
    )  # fmt: skip


def api(method: str, path: str, body: dict | None = None, key: str | None = API_KEY, timeout: float = 60):
    req = urllib.request.Request(URL + path, data=json.dumps(body).encode() if body else None, method=method)
    req.add_header("Content-Type", "application/json")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")[:300]
    except OSError as e:
        return None, f"{type(e).__name__}: {e}"


def ask(model: str) -> tuple[bool, str]:
    status, data = api(
        "POST",
        "/v1/chat/completions",
        {
            "model": model,
            "messages": [{"role": "user", "content": demo.CHANGED_PROMPT}],
            "max_tokens": 32,
            "temperature": 0,
        },
    )
    if status != 200:
        return False, f"{status}: {data}"
    answer = data["choices"][0]["message"]["content"]
    return answer.strip() == demo.LORA_ANSWERS[demo.CHANGED_PROMPT].strip(), answer


def replica_statuses(model: str) -> list[dict]:
    status, data = api("GET", f"/v1/models/instances?model_uid={model}")
    return data[0]["replica_statuses"] if status == 200 and data else []


def replicas(model: str) -> list[tuple[str, str]]:
    return sorted((r["worker_address"], r["status"]) for r in replica_statuses(model))


def workers() -> list[str]:
    status, data = api("GET", "/status", key=None, timeout=10)
    return sorted(data.get("workers", {})) if status == 200 else []


def served_requests(service: str) -> float:
    """Requests this worker's replicas served (its Prometheus counter, read inside its container)."""
    code = (
        "import urllib.request; "
        f"print(urllib.request.urlopen('http://{service}:30002/metrics', timeout=10).read().decode())"
    )
    cid = compose("ps", "-q", service).stdout.strip()
    out = _run(["/usr/bin/docker", "exec", cid, "python3", "-c", code]).stdout
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in out.splitlines() if line.startswith("xinference:model_request_total{")
    )


@dataclass
class Request:
    start: float
    end: float
    ok: bool
    detail: str


class Load:
    """A steady stream of chat requests (one every `period` s, each in its own thread), recorded."""

    def __init__(self, model: str, period: float = 0.25):
        self.model, self.period = model, period
        self.done: list[Request] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._pacer = threading.Thread(target=self._pace, daemon=True)

    def _one(self) -> None:
        start = time.monotonic()
        ok, detail = ask(self.model)
        with self._lock:
            self.done.append(Request(start, time.monotonic(), ok, detail))

    def _pace(self) -> None:
        n, t0 = 0, time.monotonic()
        while not self._stop.is_set():
            t = threading.Thread(target=self._one, daemon=True)
            t.start()
            self._threads.append(t)
            n += 1
            self._stop.wait(max(0.0, t0 + n * self.period - time.monotonic()))

    def __enter__(self) -> Load:
        self._pacer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._pacer.join()
        for t in self._threads:
            t.join(timeout=120)

    def failures(self) -> list[Request]:
        return [r for r in self.done if not r.ok]


def wait_until(what: str, predicate, timeout: float) -> float:
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, f"timed out after {timeout:.0f}s waiting for {what}"
        time.sleep(1)
    return time.monotonic() - start


@pytest.fixture(scope="module")
def cluster(docker_engine, local_bases, demo_models):
    assert "xinference" in local_bases, local_bases
    start = time.monotonic()
    _run(
        ["make", "image", f"MODEL={demo_models['base']}", f"ADAPTER={demo_models['adapter']}", "BACKEND=xinference",
         "QUANT=q8_0", f"SPEC={SPEC}", f"NAME={NAME}", f"TAG={TAG}"],
        timeout=3000,
    )  # fmt: skip
    FIGURES["image (cached when test_pipeline built it) s"] = round(time.monotonic() - start, 1)
    env_file = REPO / "build" / "e2e-cluster.env"
    env_file.parent.mkdir(exist_ok=True)
    env_file.write_text(f"XINFERENCE_IMAGE={NAME}-xinference:{TAG}\nXINFERENCE_PORT={PORT}\nAPI_KEY={API_KEY}\n")
    compose("down", "-v", "--remove-orphans", check=False)
    start = time.monotonic()
    up = compose("up", "-d", "--wait", "--wait-timeout", "600", timeout=700, check=False)
    FIGURES["compose up --wait (supervisor + 2 workers, model x2) s"] = round(time.monotonic() - start, 1)
    if up.returncode != 0:
        logs = compose("logs", "--no-color", "--tail", "60", check=False).stdout
        compose("down", "-v", "--remove-orphans", check=False)
        pytest.fail(f"cluster did not come up healthy:\n{up.stderr[-3000:]}\n{logs[-8000:]}")
    yield demo_models["base"].name
    figures = REPO / "build" / "e2e" / "xinference-cluster.json"
    figures.parent.mkdir(parents=True, exist_ok=True)
    figures.write_text(json.dumps(FIGURES, indent=2) + "\n")
    print("\nXINFERENCE CLUSTER", json.dumps(FIGURES))
    compose("down", "-v", "--remove-orphans", check=False)


def test_cluster_serves_the_model_from_two_workers(cluster):
    model = cluster
    assert workers() == ["worker-1:30001", "worker-2:30001"]
    assert replicas(model) == [("worker-1:30001", "READY"), ("worker-2:30001", "READY")], "one replica per worker"
    assert api("GET", "/v1/models", key=None)[0] in (401, 403), "the API key is enforced on the supervisor"
    before = {w: served_requests(w) for w in ("worker-1", "worker-2")}
    for _ in range(6):
        ok, answer = ask(model)
        assert ok, answer
    served = {w: served_requests(w) - before[w] for w in before}
    assert all(n >= 1 for n in served.values()), f"requests are not spread over both replicas: {served}"


def test_a_stopped_worker_leaves_and_rejoins(cluster):
    model = cluster
    with Load(model) as load:
        time.sleep(5)
        t_begin = time.monotonic()
        compose("stop", "worker-1", timeout=120)
        t_end = time.monotonic()
        time.sleep(10)
    in_flight = [r for r in load.done if r.start < t_end and r.end > t_begin]
    failed = load.failures()
    after = [r for r in load.done if r.start >= t_end]
    FIGURES["stop worker-1: requests"] = len(load.done)
    FIGURES["stop worker-1: in flight while it stopped"] = len(in_flight)
    FIGURES["stop worker-1: failed"] = len(failed)
    FIGURES["stop worker-1: docker compose stop s"] = round(t_end - t_begin, 1)
    assert all(t_begin < r.end and r.start < t_end for r in failed), [
        (round(r.start - t_begin, 2), round(r.end - t_begin, 2), r.detail) for r in failed
    ]
    assert len(after) >= 20 and all(r.ok for r in after), "requests after the stop must all be answered"
    assert workers() == ["worker-2:30001"], "the stopped worker deregistered"

    t_start = time.monotonic()
    compose("start", "worker-1", timeout=120)
    wait_until("worker-1 to register", lambda: "worker-1:30001" in workers(), 300)
    FIGURES["restart worker-1: registered again s"] = round(time.monotonic() - t_start, 1)
    wait_until("worker-1's replica to be READY", lambda: replicas(model).count(("worker-1:30001", "READY")) == 1, 300)
    FIGURES["restart worker-1: its replica READY again s"] = round(time.monotonic() - t_start, 1)
    before = {w: served_requests(w) for w in ("worker-1", "worker-2")}
    with Load(model, period=0.5) as load:
        time.sleep(8)
    served = {w: served_requests(w) - before[w] for w in before}
    FIGURES["after rejoin: requests / failed / per worker"] = [len(load.done), len(load.failures()), served]
    assert not load.failures(), load.failures()[:3]
    assert served["worker-1"] >= 3 and served["worker-2"] >= 3, served


def test_a_killed_worker_is_dropped_within_seconds(cluster):
    """No goodbye (SIGKILL, like a lost node): the supervisor's health check drops the worker."""
    model = cluster
    held = [r["replica_id"] for r in replica_statuses(model) if r["worker_address"] == "worker-2:30001"]
    FIGURES["kill worker-2: replica ids it held"] = held
    with Load(model) as load:
        time.sleep(4)
        t_kill = time.monotonic()
        compose("kill", "-s", "SIGKILL", "worker-2", timeout=60)
        wait_until("the supervisor to drop worker-2", lambda: workers() == ["worker-1:30001"], 60)
        t_dropped = time.monotonic()
        time.sleep(8)
    failed = load.failures()
    after = [r for r in load.done if r.start >= t_dropped]
    FIGURES["kill worker-2: requests / failed"] = [len(load.done), len(failed)]
    FIGURES["kill worker-2: dropped after s"] = round(t_dropped - t_kill, 1)
    FIGURES["kill worker-2: failures within s of the kill"] = round(max((r.end - t_kill for r in failed), default=0), 1)
    assert t_dropped - t_kill < 20, "dead-worker detection is tuned to seconds (xinference/cluster.py)"
    assert len(after) >= 20 and all(r.ok for r in after), [r.detail for r in after if not r.ok][:3]
    assert all(r.end > t_kill for r in failed)
