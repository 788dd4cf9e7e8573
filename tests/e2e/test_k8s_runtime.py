"""The runtime images run the way the Kubernetes render runs them, with Docker standing in for the kubelet.

For each demo backend, `docker run` gets what `k8s/<backend>/deployment.yaml` says: the pod's user,
a read-only root filesystem, no capabilities, no privilege escalation, a fresh writable volume at
each volumeMount (an emptyDir), the env with the Secret's key filled in; then the image must pass
the smoke checks from inside, offline. No cluster here: this checks the images against the
manifests' security context, not a deployment.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import smoke_argv

from builder import backends
from builder.image.k8s import render_k8s_text
from builder.spec import BuildSpec

REPO = Path(__file__).resolve().parents[2]
SPEC = REPO / "tests" / "e2e" / "local-bases.yaml"
NAME, TAG = "e2e", "test"  # the images test_pipeline builds: reused from the cache
BACKENDS = list(backends.DEMO)
KEY = "e2e-k8s-key-123"

pytestmark = pytest.mark.e2e


def _docker(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    res = subprocess.run(["/usr/bin/docker", *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert res.returncode == 0, f"docker {' '.join(args[:3])}: {res.stdout[-2000:]}{res.stderr[-2000:]}"
    return res


@pytest.fixture(scope="module")
def built(docker_engine, local_bases, demo_models):
    res = subprocess.run(
        ["make", "image", f"MODEL={demo_models['base']}", f"ADAPTER={demo_models['adapter']}",
         f"BACKEND={','.join(BACKENDS)}", "QUANT=q8_0", f"SPEC={SPEC}", f"NAME={NAME}", f"TAG={TAG}"],
        cwd=REPO, capture_output=True, text=True, timeout=3000,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return demo_models["base"].name


def docker_run_args(deployment: dict) -> list[str]:
    """`docker run` options equivalent to the Deployment's pod: security context, volumes, env."""
    pod = deployment["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    sc, psc = c["securityContext"], pod["securityContext"]
    assert psc["runAsNonRoot"] and sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
    args = ["--user", f"{psc['runAsUser']}:{psc['runAsGroup']}", "--read-only", "--security-opt", "no-new-privileges"]
    args += [f"--cap-drop={cap}" for cap in sc["capabilities"]["drop"]]
    for mount in c["volumeMounts"]:
        args += ["--mount", f"type=volume,destination={mount['mountPath']}"]  # fresh and writable, like an emptyDir
    for e in c["env"]:
        args += ["-e", f"{e['name']}={e.get('value', KEY)}"]  # the Secret's key where it references one
    return args


@pytest.mark.parametrize("backend", BACKENDS)
def test_image_serves_under_the_manifests_security_context(built, backend):
    b = backends.get(backend)
    deployment = yaml.safe_load(render_k8s_text(BuildSpec(), names=[backend])[f"{backend}/deployment.yaml"])
    name = f"e2e-k8s-{backend}"
    _docker("rm", "-f", "-v", name, check=False)
    _docker("run", "-d", "--name", name, "--network", "none", *docker_run_args(deployment), f"{NAME}-{backend}:{TAG}")
    try:
        smoke = smoke_argv(name, b.port, built, KEY, b.smoke_gaps(BuildSpec()))
        start, deadline = time.monotonic(), time.monotonic() + 300
        while (res := _docker(*smoke, check=False)).returncode != 0:
            running = _docker("inspect", "-f", "{{.State.Running}}", name).stdout.strip()
            logs = _docker("logs", "--tail", "40", name, check=False)
            assert running == "true", f"{backend} exited under the manifests' security context:\n{logs.stderr}"
            assert time.monotonic() < deadline, res.stdout + res.stderr + logs.stderr
            time.sleep(3)
        print(f"\n{backend}: smoke passed {time.monotonic() - start:.1f}s after docker run (read-only root)")
        denied = _docker("exec", name, "sh", "-c", "touch /readonly-probe 2>&1; echo rc=$?", check=False).stdout
        assert "Read-only file system" in denied and "rc=0" not in denied, denied
    finally:
        _docker("rm", "-f", "-v", name, check=False)
