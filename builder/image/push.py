"""`builder push` (what `make push` runs): push every built backend image, verify each digest.

The digest the push reports is read back from the registry (`docker manifest inspect`, with the
client's own credentials) and compared; any mismatch or failure names the image and exits 2.
The verified `ref@digest` of each backend is recorded in build/<name>/pushed.json, where
`builder k8s` finds it to pin the manifests' images by digest.
"""

from __future__ import annotations

import json
import os
import re
from datetime import datetime
from pathlib import Path

from rich.console import Console

from builder.backends import NAMES as BACKENDS
from builder.errors import BuilderError
from builder.image.docker import Docker
from builder.spec import BuildSpec

console = Console(stderr=True)


def _manifest(docker: Docker, ref: str) -> dict:
    """`docker manifest inspect --verbose` of `ref`: its descriptor and manifest as the registry serves them."""
    # `docker manifest` needs DOCKER_CLI_EXPERIMENTAL on 20.x clients; --insecure allows a plain-HTTP registry.
    res = docker.run(
        "manifest", "inspect", "--insecure", "--verbose", ref, check=False, env={"DOCKER_CLI_EXPERIMENTAL": "enabled"}
    )
    if res.returncode != 0:
        raise BuilderError(f"cannot read {ref} back from the registry: {res.stderr.strip()}")
    data = json.loads(res.stdout)
    return data[0] if isinstance(data, list) else data


def registry_digest(docker: Docker, ref: str) -> str:
    """The manifest digest the registry serves for `ref`."""
    return _manifest(docker, ref)["Descriptor"]["digest"]


def manifest_layers(docker: Docker, ref: str) -> dict[str, int]:
    """{compressed layer digest: bytes} of `ref` in the registry: what a registry stores once per digest, however
    many images (of any repository in it) share the layer."""
    entry = _manifest(docker, ref)
    manifest = entry.get("SchemaV2Manifest") or entry.get("OCIManifest") or {}
    return {layer["digest"]: layer["size"] for layer in manifest.get("layers", [])}


def push(spec: BuildSpec, docker: Docker | None = None) -> dict[str, str]:
    """Push each backend image that exists locally; returns {reference: digest}."""
    if not spec.registry:
        raise BuilderError("no registry: pass REGISTRY=host[:port][/namespace] (make push REGISTRY=...)")
    docker = docker or Docker.detect()
    docker.require_engine()
    local = spec.model_copy(update={"registry": None})
    pushed: dict[str, str] = {}
    for backend in BACKENDS:
        ref = spec.image(backend)
        newest = newest_image(docker, [local.image(backend), ref])
        if newest is None:
            continue
        if newest != ref:
            docker.run("tag", newest, ref)
        digest = docker.push(ref)
        served = registry_digest(docker, ref)
        if served != digest:
            raise BuilderError(f"{ref}: pushed {digest} but the registry serves {served}")
        console.print(f"[green]pushed[/] {ref}@{digest}")
        print(f"{ref}@{digest}")
        pushed[ref] = digest
        record_pushed(spec, backend, f"{ref}@{digest}")
    if not pushed:
        raise BuilderError(
            f"no built image to push (looked for {', '.join(local.image(b) for b in BACKENDS)}): run make image first"
        )
    return pushed


def newest_image(docker: Docker, refs: list[str]) -> str | None:
    """The most recently created of the local images `refs` (None: none exists). `make image` tags its build
    without the registry, `make push` tags it for the registry: a registry tag left by an earlier push must not
    shadow a newer build (it would push the old image)."""
    created = {}
    for ref in refs:
        res = docker.run("image", "inspect", "--format", "{{.Created}}", ref, check=False)
        if res.returncode == 0:
            # RFC 3339 with up to 9 fraction digits; Python's parser takes 6
            stamp = re.sub(r"(\.\d{6})\d*", r"\1", res.stdout.strip()).replace("Z", "+00:00")
            created[ref] = datetime.fromisoformat(stamp)
    return max(created, key=created.get) if created else None


def pushed_file(spec: BuildSpec, workdir: Path = Path("build")) -> Path:
    """Where push records the verified `ref@digest` of each backend (read by `builder k8s`)."""
    return workdir / spec.name / "pushed.json"


def record_pushed(spec: BuildSpec, backend: str, pinned: str, workdir: Path = Path("build")) -> Path:
    """Add `backend: ref@digest` to pushed.json (temp file + rename; other backends' entries stay)."""
    path = pushed_file(spec, workdir)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        data = {}
    data[backend] = pinned
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path
