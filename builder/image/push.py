"""`builder push` (what `make push` runs): push every built backend image, verify each digest.

The digest the push reports is read back from the registry (`docker manifest inspect`, with the
client's own credentials) and compared; any mismatch or failure names the image and exits 2.
"""

from __future__ import annotations

import json

from rich.console import Console

from builder.backends import NAMES as BACKENDS
from builder.errors import BuilderError
from builder.image.docker import Docker
from builder.spec import BuildSpec

console = Console(stderr=True)


def registry_digest(docker: Docker, ref: str) -> str:
    """The manifest digest the registry serves for `ref`."""
    # `docker manifest` needs DOCKER_CLI_EXPERIMENTAL on 20.x clients; --insecure allows a plain-HTTP registry.
    res = docker.run(
        "manifest", "inspect", "--insecure", "--verbose", ref, check=False, env={"DOCKER_CLI_EXPERIMENTAL": "enabled"}
    )
    if res.returncode != 0:
        raise BuilderError(f"cannot read {ref} back from the registry: {res.stderr.strip()}")
    data = json.loads(res.stdout)
    entry = data[0] if isinstance(data, list) else data
    return entry["Descriptor"]["digest"]


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
        if docker.run("image", "inspect", ref, check=False).returncode != 0:
            plain = local.image(backend)
            if docker.run("image", "inspect", plain, check=False).returncode != 0:
                continue
            docker.run("tag", plain, ref)
        digest = docker.push(ref)
        served = registry_digest(docker, ref)
        if served != digest:
            raise BuilderError(f"{ref}: pushed {digest} but the registry serves {served}")
        console.print(f"[green]pushed[/] {ref}@{digest}")
        print(f"{ref}@{digest}")
        pushed[ref] = digest
    if not pushed:
        raise BuilderError(
            f"no built image to push (looked for {', '.join(local.image(b) for b in BACKENDS)}): run make image first"
        )
    return pushed
