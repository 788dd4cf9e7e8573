"""Xinference's distributed mode from the same image: XINFERENCE_ROLE=supervisor or worker.

With either role the entry point hands over to this module, which runs Xinference's own
`xinference-supervisor` / `xinference-worker` (4.1.0) with the same model folder, auth store and signal
handling as the local role. Compose (compose.xinference-cluster.yaml) and Kubernetes
(k8s/xinference-cluster/) run one supervisor and N workers this way. docs/kubernetes.md says what each
role does about Xinference's behaviour, and docs/serving.md lists its variables
("Xinference runtime environment").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from builder.files import write_atomic
from builder.runtime.xinference.api import Api, running_models, wait_status
from builder.runtime.xinference.auth import boot_admin_token
from builder.runtime.xinference.config import BootConfig, BootError, env_value, log
from builder.runtime.xinference.process import (
    SETUP_ERRORS,
    forward_signals,
    health,
    setup_failed,
    start_child,
    wait_foreground,
    xinference_env,
)
from builder.runtime.xinference.registration import launch_request, model_spec, register

ROLES = ("supervisor", "worker")
WORKER_POOL_MARKER = "xinference.deploy.worker_relaunch"  # argv of the worker's actor pool process
# Dead-worker detection (a worker that vanishes without leaving: SIGKILL, a lost node) in every
# process, unless set: Xinference's defaults (5 s / 10 s / 5) leave a dead worker in the round robin
# for ~25 s.
HEALTH_CHECK_DEFAULTS = {
    "XINFERENCE_HEALTH_CHECK_INTERVAL": "1",
    "XINFERENCE_HEALTH_CHECK_TIMEOUT": "3",
    "XINFERENCE_HEALTH_CHECK_FAILURE_THRESHOLD": "3",
}


@dataclass(frozen=True)
class ClusterConfig:
    role: str
    host: str
    supervisor_port: int = 19997
    replicas: int = 1
    min_workers: int = 1
    supervisor_url: str = ""
    worker_port: int = 30001
    metrics_port: int = 30002
    leave_timeout: float = 20.0

    @property
    def worker_address(self) -> str:
        """How the supervisor lists this worker (Xinference keeps -H as given)."""
        return f"{self.host}:{self.worker_port}"


def _env_int(env: Mapping[str, str], name: str, default: int, minimum: int = 1) -> int:
    raw = env_value(env, name)
    try:
        value = default if raw is None else int(raw)
    except ValueError:
        raise BootError(f"{name} must be a whole number, got {raw!r}") from None
    if value < minimum:
        raise BootError(f"{name} must be at least {minimum}, got {value}")
    return value


def parse_cluster(cfg: BootConfig, env: Mapping[str, str]) -> ClusterConfig:
    """The role's settings. HOST is what Xinference binds and what it tells the other side to connect
    to, so it must be a name or address the peers resolve (compose: the service name; Kubernetes: the
    pod's DNS name), never 0.0.0.0."""
    role = (env_value(env, "XINFERENCE_ROLE") or "").strip().lower()
    if role not in ROLES:
        raise BootError(f"XINFERENCE_ROLE must be local, {' or '.join(ROLES)}; got {role!r}")
    if cfg.host in ("", "0.0.0.0", "::"):
        raise BootError(
            f"XINFERENCE_ROLE={role} needs XINFERENCE_HOST set to a name or address the other cluster members "
            f"can reach (Xinference binds it and advertises it), not {cfg.host!r}"
        )
    replicas = _env_int(env, "XINFERENCE_REPLICAS", 1)
    url = (env_value(env, "XINFERENCE_SUPERVISOR_URL") or "").rstrip("/")
    if role == "worker" and not url.startswith(("http://", "https://")):
        raise BootError("XINFERENCE_ROLE=worker needs XINFERENCE_SUPERVISOR_URL, e.g. http://supervisor:9997")
    return ClusterConfig(
        role=role,
        host=cfg.host,
        supervisor_port=_env_int(env, "XINFERENCE_SUPERVISOR_PORT", 19997),
        replicas=replicas,
        min_workers=_env_int(env, "XINFERENCE_MIN_WORKERS", replicas),
        supervisor_url=url,
        worker_port=_env_int(env, "XINFERENCE_WORKER_PORT", 30001),
        metrics_port=_env_int(env, "XINFERENCE_METRICS_PORT", 30002),
        leave_timeout=float(env_value(env, "XINFERENCE_LEAVE_TIMEOUT") or 20),
    )


def executable(cfg: BootConfig, name: str) -> str:
    """`name` (xinference-supervisor / xinference-worker) from the environment that holds xinference-local."""
    local = shutil.which(cfg.xinference_local)
    if local and (Path(local).parent / name).exists():
        return str(Path(local).parent / name)
    return name


def cluster_env(cfg: BootConfig, env: Mapping[str, str] | None) -> dict[str, str]:
    """The local role's child environment plus the faster dead-worker detection (unless set)."""
    child = xinference_env(cfg, env)
    for name, value in HEALTH_CHECK_DEFAULTS.items():
        child.setdefault(name, value)
    return child


# --------------------------------------------------------------------------- supervisor


def supervisor_command(cfg: BootConfig, cluster: ClusterConfig) -> list[str]:
    return [
        executable(cfg, "xinference-supervisor"),
        "-H",
        cluster.host,
        "-p",
        str(cfg.port),
        "--supervisor-port",
        str(cluster.supervisor_port),
    ]


def registered_workers(api: Api) -> list[str]:
    """Worker addresses the supervisor's (public) /status lists."""
    status, data = api.call("GET", "/status", timeout=10)
    if status != 200 or not isinstance(data, dict):
        return []
    return sorted((data.get("workers") or {}).keys())


def wait_workers(api: Api, count: int, proc: subprocess.Popen | None, deadline: float) -> list[str]:
    logged = -1
    while True:
        if proc is not None and proc.poll() is not None:
            raise BootError(f"xinference-supervisor exited with {proc.returncode} while waiting for workers")
        try:
            workers = registered_workers(api)
        except (OSError, urllib.error.URLError):
            workers = []
        if len(workers) >= count:
            return workers
        if len(workers) != logged:
            log(f"{len(workers)} of {count} workers registered: {workers}")
            logged = len(workers)
        if time.monotonic() > deadline:
            raise BootError(f"only {len(workers)} of {count} workers registered in time: {workers}")
        time.sleep(1.0)


def replica_placement(api: Api, uid: str) -> list[tuple[str, str]]:
    """(worker address, status) of each replica of `uid`."""
    status, data = api.call("GET", f"/v1/models/instances?model_uid={uid}", timeout=10)
    if status != 200 or not isinstance(data, list) or not data:
        return []
    return [(r.get("worker_address", ""), r.get("status", "")) for r in data[0].get("replica_statuses") or []]


def launch_replicas(
    api: Api, cfg: BootConfig, cluster: ClusterConfig, launch: dict, proc: subprocess.Popen | None, deadline: float
) -> str:
    """Launch the model with `cluster.replicas` replicas once enough workers are registered.

    Returns "launched" or "running" (already running: replayed by reconnecting workers). Not through
    autostart: in 4.1.0 it fires at the first worker's registration and puts every replica on that
    worker, and it fails with a `replica_config`."""
    workers = wait_workers(api, cluster.min_workers, proc, deadline)
    log(f"workers registered: {', '.join(workers)}")
    if cfg.model_name in running_models(api):
        return "running"
    body = {**launch, "replica": cluster.replicas}
    status, data = api.call("POST", "/v1/models", body, timeout=max(deadline - time.monotonic(), 60))
    if status != 200:
        if cfg.model_name in running_models(api):  # a replaying worker won the race: fine
            return "running"
        raise BootError(f"launching {cfg.model_name!r} x{cluster.replicas} failed ({status}): {str(data)[:2000]}")
    return "launched"


def boot_supervisor(cfg: BootConfig, cluster: ClusterConfig, env: Mapping[str, str] | None) -> int:
    """Seed auth like the local role (the OpenAI API, the key and the admin live on the supervisor),
    start `xinference-supervisor`, register the model once (persisted; Xinference pushes it to the
    workers registered at that moment), wait for XINFERENCE_MIN_WORKERS workers, then launch
    XINFERENCE_REPLICAS replicas, which Xinference places one per worker. A restarted supervisor finds
    the model running (its workers replay their replicas when they reconnect) and launches nothing."""
    t_start = time.monotonic()
    spec = model_spec(cfg)
    launch = launch_request(cfg, spec)
    child_env = cluster_env(cfg, env)
    admin_token = boot_admin_token(cfg, child_env)
    proc = start_child(supervisor_command(cfg, cluster), child_env)
    forward_signals(proc)
    api = Api(cfg.url, admin_token)
    deadline = time.monotonic() + cfg.timeout
    try:
        wait_status(api, proc, deadline)
        log(f"supervisor is up after {time.monotonic() - t_start:.1f}s")
        log(f"model {cfg.model_name!r} {register(api, spec)}")
        outcome = launch_replicas(api, cfg, cluster, launch, proc, deadline)
        placement = ", ".join(f"{worker} {status}" for worker, status in replica_placement(api, cfg.model_name))
        log(
            f"model {cfg.model_name!r} {outcome} after {time.monotonic() - t_start:.1f}s: replicas on {placement}; "
            f"serving {cfg.url}/v1"
        )
    except SETUP_ERRORS as e:
        return setup_failed(proc, "xinference-supervisor", e)
    return wait_foreground(proc, "xinference-supervisor")


# --------------------------------------------------------------------------- worker


def worker_command(cfg: BootConfig, cluster: ClusterConfig) -> list[str]:
    return [
        executable(cfg, "xinference-worker"),
        "-e",
        cluster.supervisor_url,
        "-H",
        cluster.host,
        "--worker-port",
        str(cluster.worker_port),
        "-MH",
        cluster.host,
        "--metrics-exporter-port",
        str(cluster.metrics_port),
    ]


def seed_registration(cfg: BootConfig, spec: dict) -> Path:
    """The model's registration in this worker's XINFERENCE_HOME, where Xinference loads it at start.

    The supervisor only pushes a registration to the workers registered when it is made, and a worker
    needs it to launch or recover a replica."""
    return write_atomic(cfg.xinference_home / "model" / "v2" / "llm" / f"{spec['model_name']}.json", json.dumps(spec))


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def actor_pools(pid: int) -> list[int]:
    """The worker's actor pool process(es) under `pid` (xinference-worker hosts them as children)."""
    pools = []
    for child in descendants(pid):
        try:
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if WORKER_POOL_MARKER.encode() in argv:
            pools.append(child)
    return pools


def leave(proc: subprocess.Popen, grace: float) -> None:
    """Graceful stop: SIGINT to the actor pool (it deregisters, then exits); SIGTERM after `grace` s.

    The supervisor then routes every later request to the other replicas and only requests in flight
    on this worker fail. (`xinference-worker` itself turns SIGTERM into SIGTERM for its children, which
    leave without deregistering: the supervisor would keep routing to the dead worker until its health
    check gives up, every request sent to it failing meanwhile.)"""
    if proc.poll() is not None:
        return
    pools = actor_pools(proc.pid)
    if not pools:
        log("leaving: no actor pool found; stopping xinference-worker")
        proc.terminate()
        return
    log(f"leaving the cluster: SIGINT to the worker's actor pool {pools} (it deregisters, then exits)")
    for pid in pools:
        try:
            os.kill(pid, signal.SIGINT)
        except ProcessLookupError:
            pass

    def deadline() -> None:
        if proc.poll() is None:
            log(f"still running {grace:.0f}s after leaving: SIGTERM")
            proc.terminate()

    timer = threading.Timer(grace, deadline)
    timer.daemon = True
    timer.start()


def boot_worker(cfg: BootConfig, cluster: ClusterConfig, env: Mapping[str, str] | None) -> int:
    """Write the registration into this worker's home, wait for the supervisor's /status, then run
    `xinference-worker`; SIGTERM or SIGINT (docker stop, a pod's deletion) is a graceful leave. A worker
    restarted with the same address and XINFERENCE_HOME relaunches its replica itself and rejoins."""
    t_start = time.monotonic()
    spec = model_spec(cfg)
    log(f"registration of {spec['model_name']!r} written to {seed_registration(cfg, spec)}")
    supervisor = Api(cluster.supervisor_url)
    # Xinference's worker asks the supervisor for its actor address once, at start: wait for it.
    wait_status(supervisor, None, time.monotonic() + cfg.timeout)
    proc = start_child(worker_command(cfg, cluster), cluster_env(cfg, env))
    leaving = threading.Event()

    def on_signal(signum: int) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT) and not leaving.is_set():
            leaving.set()
            leave(proc, cluster.leave_timeout)
        elif proc.poll() is None:
            proc.send_signal(signum)

    forward_signals(proc, on_signal)
    log(f"worker {cluster.worker_address} started {time.monotonic() - t_start:.1f}s after boot")
    return wait_foreground(proc, "xinference-worker")


def worker_health(cluster: ClusterConfig) -> int:
    """0 when the supervisor's /status lists this worker."""
    try:
        workers = registered_workers(Api(cluster.supervisor_url))
    except Exception as e:  # noqa: BLE001 - any failure is "unhealthy"
        print(f"unhealthy: {e}")
        return 1
    if cluster.worker_address not in workers:
        print(f"unhealthy: {cluster.worker_address} is not registered (supervisor lists {workers})")
        return 1
    print(f"healthy: worker {cluster.worker_address} registered with {cluster.supervisor_url}")
    return 0


def run_role(cfg: BootConfig, args: argparse.Namespace, env: Mapping[str, str] | None = None) -> int:
    """The entry point for XINFERENCE_ROLE=supervisor|worker: boot, or `--health` (the supervisor's is the
    local role's check)."""
    env = os.environ if env is None else env
    cluster = parse_cluster(cfg, env)
    if cluster.role == "supervisor":
        return health(cfg, args.health_timeout) if args.health else boot_supervisor(cfg, cluster, env)
    return worker_health(cluster) if args.health else boot_worker(cfg, cluster, env)
