"""The harness itself: engine, BuildKit (cache + secret mounts), compose v2, local registry."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import tarfile
import urllib.request
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def test_engine_runs_python_base(docker_engine, local_bases, docker_cmd):
    out = docker_cmd("run", "--rm", local_bases["python"], "python3", "-c", "print(1)", timeout=120)
    assert out.stdout.strip() == "1"


def _saved_bytes(docker_cmd, image: str, tmp_path: Path) -> list[bytes]:
    """Every blob of `docker save IMAGE`, with the layer tarballs' member contents unpacked."""
    archive = tmp_path / "image.tar"
    docker_cmd("save", "-o", str(archive), image, timeout=300)
    blobs = [archive.read_bytes()]
    with tarfile.open(archive) as outer:
        for member in outer.getmembers():
            if not member.isfile():
                continue
            data = outer.extractfile(member).read()
            blobs.append(data)
            try:  # layer tarballs (plain or gzip): also look at every file inside
                with tarfile.open(fileobj=io.BytesIO(data)) as layer:
                    for m in layer.getmembers():
                        if m.isfile():
                            blobs.append(layer.extractfile(m).read())
            except tarfile.TarError:
                pass
    return blobs


def test_buildkit_cache_and_secret_mounts(docker_engine, local_bases, docker_cmd, tmp_path):
    run_id = uuid.uuid4().hex
    secret = f"harness-secret-{run_id}"
    secret_file = tmp_path / "secret.txt"
    secret_file.write_text(secret)
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(
        f"FROM {local_bases['python']}\n"
        # cache mount: a fresh id per run; every build appends a line, the image records the count.
        # BUST changes per build so the RUN re-executes (like a changed requirements file).
        "ARG BUST\n"
        f"RUN --mount=type=cache,id=harness-test-{run_id},target=/cache "
        "echo $BUST >> /cache/builds && wc -l < /cache/builds > /cache-builds\n"
        # secret mount: only a hash of it may end up in the image
        "RUN --mount=type=secret,id=tok,required=true "
        "sha256sum /run/secrets/tok | cut -d' ' -f1 > /secret.sha256\n"
    )
    tag = f"local/harness-test:{run_id[:12]}"
    try:
        counts = []
        for i in range(2):  # the RUN re-executes (new BUST), the cache mount's content persists
            docker_cmd(
                "build",
                "--progress=plain",
                "--build-arg",
                f"BUST={run_id}-{i}",
                "--secret",
                f"id=tok,src={secret_file}",
                "-t",
                f"{tag}-{i}",
                str(ctx),
                timeout=300,
            )
            out = docker_cmd(
                "run",
                "--rm",
                f"{tag}-{i}",
                "sh",
                "-c",
                "cat /cache-builds /secret.sha256; test ! -e /run/secrets/tok && echo no-secret-file",
                timeout=120,
            )
            lines = out.stdout.split()
            counts.append(int(lines[0]))
            assert lines[1] == hashlib.sha256(secret.encode()).hexdigest(), "secret was not mounted during RUN"
            assert lines[2] == "no-secret-file"
        assert counts == [1, 2], f"cache mount did not persist across builds: {counts}"

        blobs = _saved_bytes(docker_cmd, f"{tag}-1", tmp_path)
        assert len(blobs) > 2
        needle = secret.encode()
        assert not any(needle in b for b in blobs), "secret content leaked into the image"
        assert any(hashlib.sha256(needle).hexdigest().encode() in b for b in blobs)  # sanity: the search works
    finally:
        docker_cmd("rmi", "-f", f"{tag}-0", f"{tag}-1", check=False)
        docker_cmd("builder", "prune", "-f", "--filter", "type=exec.cachemount", check=False)


@pytest.mark.parametrize("client", ["/usr/bin/docker", "docker"])
def test_compose_v2(docker_engine, docker_cmd, client):
    exe = shutil.which(client)
    if exe is None:
        pytest.skip(f"{client} not installed")
    proc = subprocess.run([exe, "compose", "version", "--short"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().lstrip("v").startswith("2."), proc.stdout


def test_compose_runs_a_service(docker_engine, local_bases, docker_cmd, tmp_path):
    project = f"harness{uuid.uuid4().hex[:8]}"
    (tmp_path / "compose.yaml").write_text(
        "services:\n"
        "  hello:\n"
        f"    image: {local_bases['python']}\n"
        '    command: ["python3", "-c", "print(\'compose-ok\')"]\n'
    )
    base = ["compose", "-p", project, "-f", str(tmp_path / "compose.yaml")]
    try:
        out = docker_cmd(*base, "run", "--rm", "hello", timeout=180)
        assert "compose-ok" in out.stdout
    finally:
        docker_cmd(*base, "down", "--remove-orphans", check=False, timeout=120)


def test_registry_push_and_manifest(docker_engine, local_registry, docker_cmd, tmp_path):
    run_id = uuid.uuid4().hex[:12]
    (tmp_path / "hello.txt").write_text(f"hello {run_id}\n")
    (tmp_path / "Dockerfile").write_text("FROM scratch\nCOPY hello.txt /\n")
    repo = f"{local_registry}/harness-test/tiny"
    ref = f"{repo}:{run_id}"
    try:
        docker_cmd("build", "-t", ref, str(tmp_path), timeout=120)
        push = docker_cmd("push", ref, timeout=120)
        pushed = [
            w for line in push.stdout.splitlines() if "digest:" in line for w in line.split() if w.startswith("sha256:")
        ]
        assert pushed, push.stdout
        digest = pushed[0]

        accept = ", ".join(
            [
                "application/vnd.docker.distribution.manifest.v2+json",
                "application/vnd.oci.image.manifest.v1+json",
            ]
        )
        url = f"http://{local_registry}/v2/harness-test/tiny/manifests/{run_id}"
        with urllib.request.urlopen(urllib.request.Request(url, headers={"Accept": accept}), timeout=10) as r:
            body = r.read()
            assert r.headers["Docker-Content-Digest"] == digest
        assert "sha256:" + hashlib.sha256(body).hexdigest() == digest
        assert json.loads(body)["schemaVersion"] == 2

        url = f"http://{local_registry}/v2/harness-test/tiny/manifests/{digest}"
        with urllib.request.urlopen(urllib.request.Request(url, headers={"Accept": accept}), timeout=10) as r:
            assert r.status == 200 and r.read() == body

        with urllib.request.urlopen(f"http://{local_registry}/v2/harness-test/tiny/tags/list", timeout=10) as r:
            assert run_id in json.loads(r.read())["tags"]
    finally:
        docker_cmd("rmi", "-f", ref, check=False)


def test_bases_builds_dockerfiles_with_ca_secret(docker_engine, local_bases, docker_cmd, harness_cmd, tmp_path):
    """The scripts/bases contract: NAME.Dockerfile -> local/NAME:latest, context = the bases dir,
    CA bundle as secret `ca` (pip reaches PyPI through the TLS proxy), bind mounts from the
    context work, the CA is not baked in, and an unchanged Dockerfile is not rebuilt."""
    name = f"harnessprobe{uuid.uuid4().hex[:8]}"
    (tmp_path / "wheelhouse").mkdir()
    (tmp_path / "wheelhouse" / "marker.txt").write_text("from-the-context\n")
    (tmp_path / f"{name}.Dockerfile").write_text(
        f"FROM {local_bases['python']}\n"
        "RUN --mount=type=secret,id=ca --mount=type=bind,source=wheelhouse,target=/wheelhouse \\\n"
        "    cp /wheelhouse/marker.txt /marker.txt && \\\n"
        "    PIP_CERT=/run/secrets/ca pip download --no-deps --no-cache-dir -q -d /tmp/dl six && \\\n"
        "    ls /tmp/dl > /downloaded.txt && rm -rf /tmp/dl\n"
    )
    image = f"local/{name}:latest"
    env = {"HARNESS_BASES_DIR": str(tmp_path), "HARNESS_BASES": name}
    try:
        out = harness_cmd("bases", timeout=900, **env)
        assert f"building {image}" in out, out
        run = docker_cmd(
            "run",
            "--rm",
            image,
            "sh",
            "-c",
            "cat /marker.txt /downloaded.txt; test ! -e /run/secrets/ca && echo no-ca",
            timeout=120,
        )
        assert "from-the-context" in run.stdout
        assert "six-" in run.stdout and run.stdout.strip().endswith("no-ca"), run.stdout
        out = harness_cmd("bases", timeout=300, **env)
        assert f"{image} exists (Dockerfile unchanged), skipped" in out, out
    finally:
        docker_cmd("rmi", "-f", image, check=False)
