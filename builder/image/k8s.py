"""`builder k8s` (what `make k8s` runs): Kubernetes manifests from the build spec and the backend registry.

One kustomize base per backend (Deployment, Service, PodDisruptionBudget; the CPU backends also get
an optional HorizontalPodAutoscaler as a kustomize Component), one for Xinference's distributed
mode (supervisor Deployment, worker StatefulSet), and an example overlay that adds a registry pull
secret. Templates under templates/k8s/ hold the layout; this module decides every value from the
registry record (port, health path and healthcheck, API-key variable, GPU, grace period) and the
spec (image reference, CUDA), so the manifests cannot drift from what the images and compose run.

Facts the manifests rely on, shared with every runtime template: the server runs as uid/gid UID with
its home at HOME (both from render.py, which hands them to the templates); the root filesystem is mounted read-only, so
/tmp and the home are writable emptyDirs (Xinference keeps its state and every runtime its caches
there). The API key comes from a Secret (`<name>-api-key`, key `api-key`) that the manifests only
reference, never hold.

The image is `[REGISTRY/]NAME-BACKEND:TAG`, pinned `@sha256:...` when `make push` recorded the
digest it verified for exactly that reference (build/<name>/pushed.json).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from builder import __version__, backends
from builder.errors import BuilderError
from builder.files import atomic_dir
from builder.image import push
from builder.image.render import HOME, TEMPLATES, UID, environment
from builder.selection import chosen_backends
from builder.spec import BuildSpec

SECRET_KEY = "api-key"  # key inside the `<name>-api-key` Secret
MARKER = "# Kubernetes manifests rendered by `builder k8s`"  # first line of out/README.md

# Defaults an operator patches in an overlay for a real model; sizes depend on the model.
CPU_RESOURCES = {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "8Gi"}}
GPU_RESOURCES = {"requests": {"cpu": "2", "memory": "16Gi"}, "limits": {"memory": "32Gi", "nvidia.com/gpu": "1"}}
HPA = {"min": 1, "max": 4, "cpu_utilization": 75}


# --------------------------------------------------------------------------- decisions


def seconds(duration: str) -> int:
    """'600s', '2m', '1m30s' -> seconds."""
    parts = re.findall(r"(\d+)([hms])", duration)
    if not parts or "".join(n + u for n, u in parts) != duration:
        raise ValueError(f"not a duration: {duration!r}")
    return sum(int(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


def probes(b: backends.Backend) -> dict[str, dict]:
    """startupProbe, readinessProbe and livenessProbe from the registry's health path and healthcheck.

    Ready = what the image's HEALTHCHECK says (the model answers): an httpGet on the health path when
    the healthcheck is exactly that HTTP check, else the healthcheck command itself (Xinference's asks
    the model, which its health path, /status, does not). Alive = the health path answers. The
    startup probe runs the readiness check and allows the record's startup budget (model load, and for
    vLLM torch.compile and CUDA-graph capture) before the other two take over."""
    hc = b.healthcheck
    period, timeout = seconds(hc.interval), seconds(hc.timeout)
    http = {"httpGet": {"path": b.health_path, "port": "http"}}
    ready = (
        http if tuple(hc.test) == backends.http_probe(b.port, b.health_path) else {"exec": {"command": list(hc.test)}}
    )
    return {
        "startupProbe": {
            **ready,
            "periodSeconds": period,
            "timeoutSeconds": timeout,
            "failureThreshold": max(1, math.ceil(seconds(b.startup_period()) / period)),
        },
        "readinessProbe": {**ready, "periodSeconds": period, "timeoutSeconds": timeout, "failureThreshold": hc.retries},
        "livenessProbe": {**http, "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 3},
    }


def api_key_env(spec: BuildSpec, b: backends.Backend) -> dict:
    return {"name": b.api_key_var, "valueFrom": {"secretKeyRef": {"name": secret_name(spec), "key": SECRET_KEY}}}


def secret_name(spec: BuildSpec) -> str:
    return f"{spec.name}-api-key"


def resources(spec: BuildSpec, b: backends.Backend) -> dict:
    if b.uses_cuda(spec):
        return GPU_RESOURCES
    if b.cpu_variant_of_gpu(spec):
        return cpu_engine_resources(spec, b)
    return CPU_RESOURCES


# Weight files of a Hugging Face folder (what the CPU engine loads into memory).
WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pt")


def weight_bytes(spec: BuildSpec) -> int:
    """Bytes of the local model's weight files; 0 for a hub model (unknown before the build)."""
    folder = Path(spec.model) if spec.model else None
    if folder is None or not folder.is_dir():
        return 0
    return sum(p.stat().st_size for pattern in WEIGHT_GLOBS for p in folder.glob(pattern) if p.is_file())


def cpu_engine_resources(spec: BuildSpec, b: backends.Backend) -> dict:
    """A GPU engine's CPU variant (vLLM on CPU) holds the weights and its KV cache in memory: request the
    weights twice over (a 16-bit checkpoint is served float32 on CPUs without bf16), the KV cache
    (the record's kv_cache_gib) and 2 GiB for the server; the limit leaves 2 GiB more. A hub model's
    size is unknown here: patch the request in an overlay."""
    request = math.ceil(2 * weight_bytes(spec) / 2**30 + b.kv_cache_gib(spec) + 2)
    return {"requests": {"cpu": "2", "memory": f"{request}Gi"}, "limits": {"memory": f"{request + 2}Gi"}}


def shm_quantity(size: str) -> str:
    """compose's shm_size (`1g`, `512m`) as a Kubernetes quantity (`1Gi`, `512Mi`)."""
    number, unit = re.fullmatch(r"([0-9]+)([kmg])", size).groups()
    return f"{number}{unit.upper()}i" if unit != "k" else f"{number}Ki"


def volumes(spec: BuildSpec, b: backends.Backend, home: dict | None = None) -> list[dict]:
    """{name, mountPath, source} of the writable paths under the read-only root filesystem
    (source None: a volumeClaimTemplate provides it)."""
    found = [
        {"name": "tmp", "mountPath": "/tmp", "source": {"emptyDir": {}}},
        {"name": "home", "mountPath": HOME, "source": home or {"emptyDir": {}}},
    ]
    if b.cache_volume and not b.cache_volume.startswith(HOME + "/"):
        found.append({"name": "cache", "mountPath": b.cache_volume, "source": {"emptyDir": {}}})
    if b.uses_cuda(spec):  # what compose's `ipc: host` gives: shared memory for the GPU runtime's workers
        found.append({"name": "dshm", "mountPath": "/dev/shm", "source": {"emptyDir": {"medium": "Memory"}}})
    elif b.cpu_variant_of_gpu(spec) and b.cpu_shm_size:  # compose's shm_size: the CPU worker's ring buffers
        shm = {"emptyDir": {"medium": "Memory", "sizeLimit": shm_quantity(b.cpu_shm_size)}}
        found.append({"name": "dshm", "mountPath": "/dev/shm", "source": shm})
    return found


def strategy(spec: BuildSpec, b: backends.Backend) -> dict:
    """A GPU pod cannot surge (no second GPU to start on): replace in place. CPU: start the new one first."""
    if b.uses_cuda(spec):
        return {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    return {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}


def read_pushed(path: Path | None) -> dict[str, str]:
    """{backend: "ref@sha256:..."} that `make push` verified, or {}."""
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BuilderError(f"cannot read pushed digests from {path}: {e}") from None
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)}


def image_ref(spec: BuildSpec, backend: str, pushed: dict[str, str]) -> str:
    """The spec's image reference, with the pushed digest when it was pushed under exactly that reference."""
    ref = spec.image(backend)
    pinned = pushed.get(backend, "")
    if pinned.startswith(ref + "@sha256:") and re.fullmatch(r"[0-9a-f]{64}", pinned.rsplit(":", 1)[1]):
        return pinned
    return ref


@dataclass
class Workload:
    """Everything the templates lay out for one backend."""

    backend: backends.Backend
    name: str
    image: str
    labels: dict[str, str]
    selector: dict[str, str]
    env: list[dict]
    probes: dict[str, dict]
    resources: dict
    volumes: list[dict]
    strategy: dict
    grace: int
    hpa: bool
    ports: list[dict] = field(default_factory=list)  # {name, port}; default: the backend's, named http
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.ports:
            self.ports = [{"name": "http", "port": self.backend.port}]


def labels(spec: BuildSpec, name: str, component: str) -> tuple[dict[str, str], dict[str, str]]:
    """(all labels, the selector subset)."""
    selector = {"app.kubernetes.io/name": name, "app.kubernetes.io/instance": spec.name}
    if component != "server":
        selector["app.kubernetes.io/component"] = component
    return {
        **selector,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": "llm-image-builder",
        "app.kubernetes.io/version": spec.tag,
    }, selector


def workload(spec: BuildSpec, b: backends.Backend, pushed: dict[str, str]) -> Workload:
    all_labels, selector = labels(spec, b.name, "server")
    return Workload(
        backend=b,
        name=f"{spec.name}-{b.name}",
        image=image_ref(spec, b.name, pushed),
        labels=all_labels,
        selector=selector,
        env=[
            api_key_env(spec, b),
            *({"name": n, "value": ""} for n in b.passthrough_env),
            *({"name": n, "value": v} for n, v in b.tunables_for(spec)),  # the image's defaults, there to patch
        ],
        probes=probes(b),
        resources=resources(spec, b),
        volumes=volumes(spec, b),
        strategy=strategy(spec, b),
        grace=seconds(b.stop_grace_period),
        hpa=not b.uses_cuda(spec),
    )


def cluster_workloads(
    spec: BuildSpec, b: backends.Backend, topology: backends.Topology, pushed: dict[str, str]
) -> dict[str, Any]:
    """A backend's supervisor + workers topology (Xinference's distributed mode): the values its
    k8s/<topology>/ templates lay out. The topology's settings hold the layout and the roles' variables."""
    cluster = topology.settings
    prefix = f"{spec.name}-{b.name}"
    peers = f"{prefix}-cluster-peers"
    client_service = f"{prefix}-cluster"
    return {
        "supervisor": _supervisor(spec, b, topology, pushed, peers),
        "worker": _worker(spec, b, topology, pushed, peers, f"http://{client_service}:{b.port}"),
        "client_service": client_service,
        "peers": peers,
        "cluster": cluster,
        "cluster_selector": {"app.kubernetes.io/name": topology.name, "app.kubernetes.io/instance": spec.name},
    }


def _env(values: dict[str, str]) -> list[dict]:
    return [{"name": k, "value": v} for k, v in values.items()]


def _supervisor(spec: BuildSpec, b: backends.Backend, topology: backends.Topology, pushed: dict[str, str],
                peers: str) -> Workload:  # fmt: skip
    cluster = topology.settings
    all_labels, selector = labels(spec, topology.name, "supervisor")
    # The supervisor pod's DNS name through the headless peers Service (hostname + subdomain): Xinference
    # binds it and hands it to the workers as the address of its actor pool.
    return Workload(
        backend=b,
        name=f"{spec.name}-{b.name}-supervisor",
        image=image_ref(spec, b.name, pushed),
        labels=all_labels,
        selector=selector,
        env=[*_env(cluster.supervisor_env(f"supervisor.{peers}")), api_key_env(spec, b)],
        probes=probes(b),
        resources=resources(spec, b),
        volumes=volumes(spec, b),
        strategy={"type": "Recreate"},  # one supervisor at a time: it owns the cluster's state
        grace=seconds(b.stop_grace_period),
        hpa=False,
        ports=[{"name": "http", "port": b.port}, {"name": "actor", "port": cluster.supervisor_port}],
        extra={"hostname": "supervisor", "subdomain": peers},
    )


def _worker(spec: BuildSpec, b: backends.Backend, topology: backends.Topology, pushed: dict[str, str],
            peers: str, supervisor_url: str) -> Workload:  # fmt: skip
    cluster = topology.settings
    all_labels, selector = labels(spec, topology.name, "worker")
    health = {"exec": {"command": list(b.healthcheck.test)}}
    return Workload(
        backend=b,
        name=f"{spec.name}-{b.name}-worker",
        image=image_ref(spec, b.name, pushed),
        labels=all_labels,
        selector=selector,
        env=[
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            *_env(cluster.worker_env(f"$(POD_NAME).{peers}", supervisor_url)),
        ],
        # Registered with the supervisor = ready; alive = its actor port accepts connections (a
        # liveness check through the supervisor would restart every worker when the supervisor is down).
        probes={
            "startupProbe": {**health, "periodSeconds": 5, "timeoutSeconds": 30, "failureThreshold": 60},
            "readinessProbe": {**health, "periodSeconds": 10, "timeoutSeconds": 30, "failureThreshold": 3},
            "livenessProbe": {
                "tcpSocket": {"port": "actor"},
                "periodSeconds": 10,
                "timeoutSeconds": 5,
                "failureThreshold": 3,
            },
        },
        resources=resources(spec, b),
        # The home is a PersistentVolumeClaim per worker (volumeClaimTemplates): with the StatefulSet's
        # stable name, a replaced pod rejoins under the same address with its recovery state and
        # relaunches its replica itself; on an emptyDir it would come back empty and the replica stay lost.
        volumes=[{**v, "source": None} if v["name"] == "home" else v for v in volumes(spec, b)],
        strategy={"type": "RollingUpdate"},
        grace=cluster.worker_grace,
        hpa=False,
        ports=[{"name": "actor", "port": cluster.worker_port}, {"name": "metrics", "port": cluster.metrics_port}],
        extra={"replicas": cluster.workers, "claims": [{"name": "home", "size": cluster.home_size}]},
    )


# --------------------------------------------------------------------------- rendering


class _Dumper(yaml.SafeDumper):
    """Block style, keys in the order Python decided, no &anchors for repeated values."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _to_yaml(value: Any) -> str:
    return yaml.dump(value, Dumper=_Dumper, default_flow_style=False, sort_keys=False, width=1000).rstrip("\n")


K8S_TEMPLATES = TEMPLATES / "k8s"


def k8s_environment():
    env = environment()
    env.filters["to_yaml"] = _to_yaml
    env.filters["rstrip"] = lambda text: str(text).rstrip()
    return env


def render_k8s_text(
    spec: BuildSpec, names: list[str] | None = None, pushed: dict[str, str] | None = None
) -> dict[str, str]:
    """{relative path: text} of every manifest."""
    names = chosen_backends(spec) if names is None else names
    pushed = pushed or {}
    env = k8s_environment()
    common = {"spec": spec, "version": __version__, "secret": secret_name(spec), "secret_key": SECRET_KEY, "uid": UID}
    out: dict[str, str] = {}

    def put(path: str, template: str, **values: Any) -> None:
        out[path] = env.get_template(f"k8s/{template}").render(**common, **values).rstrip("\n") + "\n"

    workloads = [workload(spec, backends.get(n), pushed) for n in names]
    for w in workloads:
        base = w.backend.name
        files = ["deployment.yaml", "service.yaml", "pdb.yaml"]
        put(f"{base}/kustomization.yaml", "kustomization.yaml.j2", w=w, resources=files)
        put(f"{base}/deployment.yaml", "deployment.yaml.j2", w=w)
        put(f"{base}/service.yaml", "service.yaml.j2", w=w)
        put(f"{base}/pdb.yaml", "pdb.yaml.j2", w=w)
        if w.hpa:
            put(f"{base}/hpa/kustomization.yaml", "hpa-component.yaml.j2", w=w)
            put(f"{base}/hpa/hpa.yaml", "hpa.yaml.j2", w=w, hpa=HPA)
    topologies = [(w.backend, t) for w in workloads for t in w.backend.topologies]
    for backend, topology in topologies:
        values = cluster_workloads(spec, backend, topology, pushed)
        files = [p.name.removesuffix(".j2") for p in sorted((K8S_TEMPLATES / topology.name).glob("*.yaml.j2"))]
        for f in files:
            put(f"{topology.name}/{f}", f"{topology.name}/{f}.j2", **values)
        put(f"{topology.name}/kustomization.yaml", "kustomization.yaml.j2", w=values["supervisor"], resources=files)
    put("overlays/registry-pull-secret/kustomization.yaml", "overlay.yaml.j2", workloads=workloads)
    put("overlays/registry-pull-secret/pull-secret.yaml", "pull-secret.yaml.j2")
    put("README.md", "README.md.j2", workloads=workloads, topologies=[t for _, t in topologies], marker=MARKER)
    return out


def render_k8s(spec: BuildSpec, out: Path, pushed_file: Path | None = None) -> list[Path]:
    """Write every manifest under `out`, replacing a previous render as a whole (temp folder + rename).

    `out` belongs to the render: it must be absent, empty, or a previous render (its README.md
    starts with MARKER), so a mistyped --out never deletes anything else."""
    pushed = read_pushed(pushed_file if pushed_file is not None else push.pushed_file(spec))
    files = render_k8s_text(spec, pushed=pushed)
    if out.exists() and any(out.iterdir()):
        readme = out / "README.md"
        if not (readme.is_file() and readme.read_text().startswith(MARKER)):
            raise BuilderError(f"{out} exists and is not a previous `builder k8s` render: pick another --out")
    with atomic_dir(out, replace=True) as tmp:
        for rel, text in files.items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            os.chmod(path, 0o644)
    return [out / rel for rel in files]
