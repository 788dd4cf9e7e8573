"""Xinference's distributed mode from the same image: XINFERENCE_ROLE=supervisor or worker.

`xinference_boot` runs `xinference-local` (XINFERENCE_ROLE=local, the default). With another role it
hands over to this module, which runs Xinference's own `xinference-supervisor` / `xinference-worker`
(4.1.0) with the same model folder, auth store and signal handling. Compose
(compose.xinference-cluster.yaml) and Kubernetes (k8s/xinference-cluster/) run one supervisor and N
workers this way.

supervisor
  Seeds auth like local mode (the OpenAI API, the key and the admin live on the supervisor), starts
  `xinference-supervisor -H HOST -p PORT --supervisor-port SUPERVISOR_PORT`, registers the model once
  (persisted; Xinference pushes the registration to the workers registered at that moment), waits
  until XINFERENCE_MIN_WORKERS workers are registered and then launches the model with
  XINFERENCE_REPLICAS replicas, which Xinference places one per worker. A restarted supervisor finds
  the model already running (its workers replay their replicas when they reconnect) and launches
  nothing. Not through autostart: in 4.1.0 it fires at the first worker's registration and puts every
  replica on that worker, and it fails with a `replica_config`.
worker
  Writes the model's registration into its own XINFERENCE_HOME (the supervisor only pushes it to the
  workers registered when it is made, and a worker needs it to launch or recover a replica), waits
  for the supervisor's /status, then starts `xinference-worker -e SUPERVISOR_URL -H HOST --worker-port
  WORKER_PORT -MH HOST --metrics-exporter-port METRICS_PORT`.
  SIGTERM or SIGINT (docker stop, a pod's deletion) is a graceful leave: the worker's actor pool gets
  SIGINT, whose handler deregisters the worker from the supervisor before it exits, so the supervisor
  routes every later request to the other replicas and only requests in flight on this worker fail.
  (`xinference-worker` itself turns SIGTERM into SIGTERM for its children, which leave without
  deregistering: the supervisor would keep routing to the dead worker until its health check gives
  up, every request sent to it failing meanwhile.) A worker restarted with the same address and
  XINFERENCE_HOME relaunches its replica itself and rejoins the round robin.

HOST is what Xinference binds and what it tells the other side to connect to, so it must be a name
or address the peers resolve (compose: the service name; Kubernetes: the pod's DNS name), never
0.0.0.0. The actor ports (SUPERVISOR_PORT, WORKER_PORT, and random ones per model process) are
unauthenticated RPC: expose only the supervisor's HTTP PORT outside the cluster's network.

Dead-worker detection (a worker that vanishes without leaving: SIGKILL, a lost node) defaults here to
XINFERENCE_HEALTH_CHECK_INTERVAL=1, _TIMEOUT=3, _FAILURE_THRESHOLD=3 in every process (Xinference's
defaults, 5 s / 10 s / 5, leave a dead worker in the round robin for ~25 s); set them to override.

Environment (beside xinference_boot's model, port, auth and home variables):

  XINFERENCE_ROLE            supervisor | worker (local: xinference_boot's single-process mode)
  XINFERENCE_HOST            the name/address to bind and advertise (required, not 0.0.0.0)
  XINFERENCE_SUPERVISOR_PORT supervisor's actor port                            19997
  XINFERENCE_REPLICAS        (supervisor) replicas of the model                  1
  XINFERENCE_MIN_WORKERS     (supervisor) workers to wait for before launching   XINFERENCE_REPLICAS
  XINFERENCE_SUPERVISOR_URL  (worker) the supervisor's HTTP endpoint, e.g. http://supervisor:9997
  XINFERENCE_WORKER_PORT     (worker) actor port                                 30001
  XINFERENCE_METRICS_PORT    (worker) Prometheus metrics port                    30002
  XINFERENCE_LEAVE_TIMEOUT   (worker) seconds a leave may take before SIGTERM    20

Health (`--health`): supervisor as local mode (the model is listed and answers a 1-token chat);
worker: the supervisor's /status lists this worker's address.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from builder.runtime import xinference_boot as xb

ROLES = ("supervisor", "worker")
WORKER_POOL_MARKER = "xinference.deploy.worker_relaunch"  # argv of the worker's actor pool process
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


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 1) -> int:
    raw = xb._first(env, name)
    try:
        value = default if raw is None else int(raw)
    except ValueError:
        raise xb.BootError(f"{name} must be a whole number, got {raw!r}") from None
    if value < minimum:
        raise xb.BootError(f"{name} must be at least {minimum}, got {value}")
    return value


def parse_cluster(cfg: xb.BootConfig, env: Mapping[str, str]) -> ClusterConfig:
    role = (xb._first(env, "XINFERENCE_ROLE") or "").strip().lower()
    if role not in ROLES:
        raise xb.BootError(f"XINFERENCE_ROLE must be local, {' or '.join(ROLES)}; got {role!r}")
    if cfg.host in ("", "0.0.0.0", "::"):
        raise xb.BootError(
            f"XINFERENCE_ROLE={role} needs XINFERENCE_HOST set to a name or address the other cluster members "
            f"can reach (Xinference binds it and advertises it), not {cfg.host!r}"
        )
    replicas = _int(env, "XINFERENCE_REPLICAS", 1)
    url = (xb._first(env, "XINFERENCE_SUPERVISOR_URL") or "").rstrip("/")
    if role == "worker" and not url.startswith(("http://", "https://")):
        raise xb.BootError("XINFERENCE_ROLE=worker needs XINFERENCE_SUPERVISOR_URL, e.g. http://supervisor:9997")
    return ClusterConfig(
        role=role,
        host=cfg.host,
        supervisor_port=_int(env, "XINFERENCE_SUPERVISOR_PORT", 19997),
        replicas=replicas,
        min_workers=_int(env, "XINFERENCE_MIN_WORKERS", replicas),
        supervisor_url=url,
        worker_port=_int(env, "XINFERENCE_WORKER_PORT", 30001),
        metrics_port=_int(env, "XINFERENCE_METRICS_PORT", 30002),
        leave_timeout=float(xb._first(env, "XINFERENCE_LEAVE_TIMEOUT") or 20),
    )


def executable(cfg: xb.BootConfig, name: str) -> str:
    """`name` (xinference-supervisor / xinference-worker) from the environment that holds xinference-local."""
    local = shutil.which(cfg.xinference_local)
    if local and (Path(local).parent / name).exists():
        return str(Path(local).parent / name)
    return name


def cluster_env(cfg: xb.BootConfig, env: Mapping[str, str] | None) -> dict[str, str]:
    """xinference_boot's child environment plus the faster dead-worker detection (unless set)."""
    child = xb.xinference_env(cfg, env)
    for name, value in HEALTH_CHECK_DEFAULTS.items():
        child.setdefault(name, value)
    return child


# --------------------------------------------------------------------------- supervisor


def supervisor_command(cfg: xb.BootConfig, cl: ClusterConfig) -> list[str]:
    return [
        executable(cfg, "xinference-supervisor"),
        "-H",
        cl.host,
        "-p",
        str(cfg.port),
        "--supervisor-port",
        str(cl.supervisor_port),
    ]


def registered_workers(api: xb.Api) -> list[str]:
    """Worker addresses the supervisor's (public) /status lists."""
    status, data = api.call("GET", "/status", timeout=10)
    if status != 200 or not isinstance(data, dict):
        return []
    return sorted((data.get("workers") or {}).keys())


def wait_workers(api: xb.Api, count: int, proc: subprocess.Popen | None, deadline: float) -> list[str]:
    logged = -1
    while True:
        if proc is not None and proc.poll() is not None:
            raise xb.BootError(f"xinference-supervisor exited with {proc.returncode} while waiting for workers")
        try:
            workers = registered_workers(api)
        except (OSError, urllib.error.URLError):
            workers = []
        if len(workers) >= count:
            return workers
        if len(workers) != logged:
            xb.log(f"{len(workers)} of {count} workers registered: {workers}")
            logged = len(workers)
        if time.monotonic() > deadline:
            raise xb.BootError(f"only {len(workers)} of {count} workers registered in time: {workers}")
        time.sleep(1.0)


def replica_placement(api: xb.Api, uid: str) -> list[tuple[str, str]]:
    """(worker address, status) of each replica of `uid`."""
    status, data = api.call("GET", f"/v1/models/instances?model_uid={uid}", timeout=10)
    if status != 200 or not isinstance(data, list) or not data:
        return []
    return [(r.get("worker_address", ""), r.get("status", "")) for r in data[0].get("replica_statuses") or []]


def launch_replicas(
    api: xb.Api, cfg: xb.BootConfig, cl: ClusterConfig, launch: dict, proc: subprocess.Popen | None, deadline: float
) -> str:
    """Launch the model with `cl.replicas` replicas once enough workers are registered.

    Returns "launched" or "running" (already running: replayed by reconnecting workers)."""
    workers = wait_workers(api, cl.min_workers, proc, deadline)
    xb.log(f"workers registered: {', '.join(workers)}")
    if cfg.model_name in xb.running_models(api):
        return "running"
    body = {**launch, "replica": cl.replicas}
    status, data = api.call("POST", "/v1/models", body, timeout=max(deadline - time.monotonic(), 60))
    if status != 200:
        if cfg.model_name in xb.running_models(api):  # a replaying worker won the race: fine
            return "running"
        raise xb.BootError(f"launching {cfg.model_name!r} x{cl.replicas} failed ({status}): {str(data)[:2000]}")
    return "launched"


def boot_supervisor(cfg: xb.BootConfig, cl: ClusterConfig, env: Mapping[str, str] | None) -> int:
    t_start = time.monotonic()
    spec = xb.model_spec(cfg)
    launch = xb.launch_request(cfg, spec)
    child_env = cluster_env(cfg, env)
    admin_token = None
    if cfg.auth:
        admin_token = xb.seed_auth(cfg, child_env, xb.resolve_api_key(cfg, create=True))["token"]
    else:
        xb.log("auth is off (XINFERENCE_AUTH): the API is open to anyone who can reach the port")
    cmd = supervisor_command(cfg, cl)
    xb.log("starting: " + shlex.join(cmd))
    proc = subprocess.Popen(cmd, env=child_env)
    xb.forward_signals(proc)
    api = xb.Api(cfg.url, admin_token)
    deadline = time.monotonic() + cfg.timeout
    try:
        xb.wait_status(api, proc, deadline)
        xb.log(f"supervisor is up after {time.monotonic() - t_start:.1f}s")
        xb.log(f"model {cfg.model_name!r} {xb.register(api, spec)}")
        outcome = launch_replicas(api, cfg, cl, launch, proc, deadline)
        placement = ", ".join(f"{w} {s}" for w, s in replica_placement(api, cfg.model_name))
        xb.log(
            f"model {cfg.model_name!r} {outcome} after {time.monotonic() - t_start:.1f}s: replicas on {placement}; "
            f"serving {cfg.url}/v1"
        )
    except (xb.BootError, OSError, urllib.error.URLError) as e:
        if proc.poll() is not None:
            xb.log(f"xinference-supervisor exited with {proc.returncode}")
            return xb._exit_code(proc.returncode)
        xb.log(f"setup failed: {e}")
        xb.stop_child(proc)
        return 1
    return xb.wait_foreground(proc, "xinference-supervisor")


# --------------------------------------------------------------------------- worker


def worker_command(cfg: xb.BootConfig, cl: ClusterConfig) -> list[str]:
    return [
        executable(cfg, "xinference-worker"),
        "-e",
        cl.supervisor_url,
        "-H",
        cl.host,
        "--worker-port",
        str(cl.worker_port),
        "-MH",
        cl.host,
        "--metrics-exporter-port",
        str(cl.metrics_port),
    ]


def seed_registration(cfg: xb.BootConfig, spec: dict) -> Path:
    """The model's registration in this worker's XINFERENCE_HOME, where Xinference loads it at start."""
    path = cfg.xinference_home / "model" / "v2" / "llm" / f"{spec['model_name']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(spec))
    os.replace(tmp, path)
    return path


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
    """Graceful stop: SIGINT to the actor pool (it deregisters, then exits); SIGTERM after `grace` s."""
    if proc.poll() is not None:
        return
    pools = actor_pools(proc.pid)
    if not pools:
        xb.log("leaving: no actor pool found; stopping xinference-worker")
        proc.terminate()
        return
    xb.log(f"leaving the cluster: SIGINT to the worker's actor pool {pools} (it deregisters, then exits)")
    for pid in pools:
        try:
            os.kill(pid, signal.SIGINT)
        except ProcessLookupError:
            pass

    def deadline() -> None:
        if proc.poll() is None:
            xb.log(f"still running {grace:.0f}s after leaving: SIGTERM")
            proc.terminate()

    timer = threading.Timer(grace, deadline)
    timer.daemon = True
    timer.start()


def boot_worker(cfg: xb.BootConfig, cl: ClusterConfig, env: Mapping[str, str] | None) -> int:
    t_start = time.monotonic()
    spec = xb.model_spec(cfg)
    xb.log(f"registration of {spec['model_name']!r} written to {seed_registration(cfg, spec)}")
    supervisor = xb.Api(cl.supervisor_url)
    # Xinference's worker asks the supervisor for its actor address once, at start: wait for it.
    xb.wait_status(supervisor, None, time.monotonic() + cfg.timeout)
    cmd = worker_command(cfg, cl)
    xb.log("starting: " + shlex.join(cmd))
    proc = subprocess.Popen(cmd, env=cluster_env(cfg, env))
    leaving = threading.Event()

    def on_signal(signum: int) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT) and not leaving.is_set():
            leaving.set()
            leave(proc, cl.leave_timeout)
        elif proc.poll() is None:
            proc.send_signal(signum)

    xb.forward_signals(proc, on_signal)
    xb.log(f"worker {cl.worker_address} started {time.monotonic() - t_start:.1f}s after boot")
    return xb.wait_foreground(proc, "xinference-worker")


def worker_health(cl: ClusterConfig) -> int:
    """0 when the supervisor lists this worker."""
    try:
        workers = registered_workers(xb.Api(cl.supervisor_url))
    except Exception as e:  # noqa: BLE001 - any failure is "unhealthy"
        print(f"unhealthy: {e}")
        return 1
    if cl.worker_address not in workers:
        print(f"unhealthy: {cl.worker_address} is not registered (supervisor lists {workers})")
        return 1
    print(f"healthy: worker {cl.worker_address} registered with {cl.supervisor_url}")
    return 0


def main(cfg: xb.BootConfig, args: argparse.Namespace, env: Mapping[str, str] | None = None) -> int:
    """xinference_boot.main's entry for XINFERENCE_ROLE=supervisor|worker."""
    env = os.environ if env is None else env
    cl = parse_cluster(cfg, env)
    if cl.role == "supervisor":
        return xb.health(cfg, args.health_timeout) if args.health else boot_supervisor(cfg, cl, env)
    return worker_health(cl) if args.health else boot_worker(cfg, cl, env)
