"""`builder push` (what `make push` runs): push every built backend image, verify each digest.

The digest the push reports is read back from the registry (`docker manifest inspect`, with the
client's own credentials) and compared; any mismatch or failure names the image and exits 2.
The verified `ref@digest` of each backend is recorded in build/<name>/pushed.json, where
`builder k8s` finds it to pin the manifests' images by digest.

Beside a backend that serves mounted weights (llama.cpp, vLLM), its engine image (`BACKEND-engine:PIN`, no
weights), the weights image (`NAME-weights[SUFFIX]:TAG`, FROM scratch, the runtime's own weights layer: the
registry already has it) and one image per adapter served unmerged (`NAME-lora[SUFFIX]:TAG-ADAPTER`) are pushed
and recorded the same way (keys `BACKEND-engine`, `weights[SUFFIX]`, `lora[SUFFIX]:ADAPTER`; SUFFIX names a
format other than GGUF, `-hf` for vLLM's Hugging Face folders), then, for a GGUF, the GGUF as model artifacts
(`NAME-model`, builder/image/artifacts.py; keys `model:TAG...`): that format is GGUF only.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from datetime import datetime
from pathlib import Path, PurePosixPath

from rich.console import Console

from builder import backends
from builder.backends import NAMES as BACKENDS
from builder.errors import BuilderError
from builder.image import artifacts
from builder.image.docker import Docker
from builder.model.gguf.router import BASE_GGUF, MMPROJ_GGUF, MODELS, lora_path
from builder.selection import served_adapters
from builder.spec import BuildSpec

console = Console(stderr=True)
# pushed.json keys beside the backends': the weights image, each adapter's image, each model artifact (by tag)
WEIGHTS, LORA, ARTIFACT = "weights", "lora:", "model:"


def weights_key(backend: str) -> str:
    """pushed.json's key of `backend`'s weights image: `weights` (GGUF), `weights-hf` (vLLM)."""
    return WEIGHTS + backends.get(backend).weights_suffix


def lora_key(backend: str, adapter: str) -> str:
    """pushed.json's key of `backend`'s image of `adapter`: `lora:NAME` (GGUF LoRA), `lora-hf:NAME` (vLLM)."""
    return f"{LORA[:-1]}{backends.get(backend).weights_suffix}:{adapter}"


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
    """Push each backend image that exists locally (and beside a mounted_weights backend's, its engine, weights
    and adapter images, and the model artifacts); returns {reference: digest}."""
    if not spec.registry:
        raise BuilderError("no registry: pass REGISTRY=host[:port][/namespace] (make push REGISTRY=...)")
    docker = docker or Docker.detect()
    docker.require_engine()
    local = spec.model_copy(update={"registry": None})
    pushed: dict[str, str] = {}
    for backend in BACKENDS:
        digest = push_image(spec, docker, backend, local.image(backend), spec.image(backend))
        if digest is None:
            continue
        pushed[spec.image(backend)] = digest
        if backends.get(backend).mounts_weights(spec):
            pushed.update(push_mounted(spec, docker, backend))
    if not pushed:
        raise BuilderError(
            f"no built image to push (looked for {', '.join(local.image(b) for b in BACKENDS)}): run make image first"
        )
    return pushed


def push_image(spec: BuildSpec, docker: Docker, key: str, local_ref: str, ref: str) -> str | None:
    """Push the newest of `local_ref` and `ref` as `ref`, verify the digest the registry serves, record it in
    pushed.json under `key`; None when neither exists locally."""
    newest = newest_image(docker, [local_ref, ref])
    if newest is None:
        return None
    if newest != ref:
        docker.run("tag", newest, ref)
    digest = docker.push(ref)
    served = registry_digest(docker, ref)
    if served != digest:
        raise BuilderError(f"{ref}: pushed {digest} but the registry serves {served}")
    console.print(f"[green]pushed[/] {ref}@{digest}")
    print(f"{ref}@{digest}")
    record_pushed(spec, key, f"{ref}@{digest}")
    return digest


def mounted_refs(spec: BuildSpec, backend: str) -> dict[str, str]:
    """{pushed.json key: reference} of the images beside a mounted_weights backend's runtime (`make image`
    builds them): its engine, the weights, and one image per adapter (those built: the adapters it serves)."""
    return {
        f"{backend}-engine": spec.engine_image(backend),
        weights_key(backend): spec.weights_image(backend),
        **{lora_key(backend, name): spec.lora_image(name, backend) for name in served_adapters(spec)},
    }


def push_mounted(spec: BuildSpec, docker: Docker, backend: str, workdir: Path = Path("build")) -> dict[str, str]:
    """Push the engine, weights and adapter images of `backend`, then, when it serves a GGUF, the GGUF (and each
    adapter's LoRA GGUF) as model artifacts (Docker's model format and ModelPack here are GGUF only)."""
    local = spec.model_copy(update={"registry": None})
    pushed: dict[str, str] = {}
    loras: dict[str, str] = {}
    for key, ref in mounted_refs(spec, backend).items():
        local_ref = dict(mounted_refs(local, backend))[key]
        digest = push_image(spec, docker, key, local_ref, ref)
        if digest is None:
            console.print(f"[yellow]not built[/] {local_ref}: `make image` builds it")
            continue
        pushed[ref] = digest
        if key.startswith(LORA):
            loras[key.removeprefix(LORA)] = ref
    if spec.weights_image(backend) not in pushed or not backends.get(backend).serves_gguf(spec):
        return pushed
    quant = backends.get(backend).quant_for(spec) or ""
    folder = workdir / spec.name
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".artifact-") as tmp:
        # the weights image's one folder: the GGUF, and a vision-language model's mmproj beside it
        weights = copy_out(docker, spec.weights_image(backend), MODELS, Path(tmp) / "weights")
        gguf, mmproj = weights / PurePosixPath(BASE_GGUF).name, weights / PurePosixPath(MMPROJ_GGUF).name
        lora_files = {n: copy_out(docker, ref, lora_path(n), Path(tmp) / f"lora-{n}.gguf") for n, ref in loras.items()}
        license_file, template = artifacts.model_folder_files(spec)
        created = docker.inspect(spec.weights_image(backend))["Created"]
        files = artifacts.ModelFiles(
            gguf, quant, created, lora_files, license_file, template, mmproj if mmproj.is_file() else None
        )
        for ref, digest in artifacts.push_model(spec, files).items():
            console.print(f"[green]pushed[/] model artifact {ref}@{digest}")
            print(f"{ref}@{digest}")
            record_pushed(spec, ARTIFACT + ref.rsplit(":", 1)[1], f"{ref}@{digest}")
            pushed[ref] = digest
    return pushed


def copy_out(docker: Docker, image: str, path: str, dest: Path) -> Path:
    """One file or folder of a local image (one with no command: a weights image), copied to `dest`."""
    cid = docker.run("create", image, "none").stdout.strip()
    try:
        docker.run("cp", f"{cid}:{path}", str(dest))
    finally:
        docker.run("rm", cid, check=False)
    return dest


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
