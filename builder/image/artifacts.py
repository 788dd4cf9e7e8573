"""The GGUF build as model artifacts (`make push`, after the images): Docker's model format (`docker model pull`,
Docker Model Runner) and CNCF ModelPack, pushed with the distribution API (builder/image/registry.py).

Docker's format: an OCI image manifest whose config is `application/vnd.docker.ai.model.config.v0.1+json`
and whose layers are single uncompressed files: the GGUF (`application/vnd.docker.ai.gguf.v3`), a LoRA GGUF
(`...gguf.v3.lora`), a vision-language model's mmproj (`application/vnd.docker.ai.mmproj`: vision tower and
projector, what llama-server's `--mmproj` loads), the license and the chat template where the model folder has
them. The config follows
what Docker Model Runner reads (pkg/distribution/types/config.go: `config` {format, quantization, parameters,
architecture, size, gguf}, `descriptor` {created}, `rootfs` {type, diff_ids}) and adds docker/model-spec's
`files` list. One manifest per build (`NAME-model:TAG`: the base) and one per adapter served unmerged
(`NAME-model:TAG-ADAPTER`: the base and that LoRA): the GGUF blob is stored once for all of them.

ModelPack (`NAME-model:TAG-modelpack`): the same raw GGUF blob as `application/vnd.cncf.model.weight.v1.raw`,
a config `application/vnd.cncf.model.config.v1+json` and artifactType
`application/vnd.cncf.model.manifest.v1+json`: it costs its config and manifest only.

An image layer is the gzip'd tar of the file (what Docker pushes), an artifact layer the file itself: the two
cannot share a blob, so the artifacts add one uncompressed copy of each GGUF to the registry.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from builder.image import registry as oci
from builder.model.gguf.header import GgufHeader, parameter_label, read_header
from builder.spec import BuildSpec

DOCKER_CONFIG = "application/vnd.docker.ai.model.config.v0.1+json"
GGUF = "application/vnd.docker.ai.gguf.v3"
GGUF_LORA = "application/vnd.docker.ai.gguf.v3.lora"
MMPROJ = "application/vnd.docker.ai.mmproj"
LICENSE = "application/vnd.docker.ai.license"
CHAT_TEMPLATE = "application/vnd.docker.ai.chat.template.jinja"
MODELPACK = "application/vnd.cncf.model.manifest.v1+json"
MODELPACK_CONFIG = "application/vnd.cncf.model.config.v1+json"
MODELPACK_WEIGHT = "application/vnd.cncf.model.weight.v1.raw"
MODELPACK_DOC = "application/vnd.cncf.model.doc.v1.raw"
MODELPACK_WEIGHT_CONFIG = "application/vnd.cncf.model.weight.config.v1.raw"
_MODELPACK_TYPES = {
    GGUF: MODELPACK_WEIGHT,
    MMPROJ: MODELPACK_WEIGHT,
    LICENSE: MODELPACK_DOC,
    CHAT_TEMPLATE: MODELPACK_WEIGHT_CONFIG,
}
TITLE = "org.opencontainers.image.title"  # the file name a generic client (oras pull) writes
FILEPATH = "org.cncf.model.filepath"  # the file's path in the model (Docker Model Runner, ModelPack)

# files of a local model folder that travel with the GGUF
LICENSE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md")
CHAT_TEMPLATE_FILE = "chat_template.jinja"


@dataclass
class ModelFiles:
    """What the artifacts carry, on this host: the GGUF, each adapter's LoRA GGUF, the license and chat template
    where the model has them, a vision-language model's mmproj, and when the weights were built (RFC 3339: the
    config is the same on a re-push)."""

    gguf: Path
    quant: str
    created: str
    loras: dict[str, Path] = field(default_factory=dict)
    license: Path | None = None
    chat_template: Path | None = None
    mmproj: Path | None = None


def model_folder_files(spec: BuildSpec) -> tuple[Path | None, Path | None]:
    """(license, chat template) of a local model folder; (None, None) for a hub model, or no MODEL (a push
    names the build by NAME and TAG alone)."""
    if not spec.model or spec.model_source != "local":
        return None, None
    folder = Path(spec.model)
    license_file = next((folder / n for n in LICENSE_FILES if (folder / n).is_file()), None)
    template = folder / CHAT_TEMPLATE_FILE
    return license_file, template if template.is_file() else None


def _json(value: dict) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


def _layer(media_type: str, desc: dict, name: str) -> dict:
    return {"mediaType": media_type, **desc, "annotations": {TITLE: name, FILEPATH: name}}


def docker_config(header: GgufHeader, files: ModelFiles, layers: list[dict]) -> dict:
    """Docker's model config for `layers` (the GGUF first)."""
    gguf_meta = {k: str(v) for k, v in header.metadata.items() if k.startswith("general.")}
    return {
        "config": {
            "format": "gguf",
            "quantization": files.quant.upper(),
            "parameters": parameter_label(header.parameters),
            "architecture": header.architecture,
            "size": str(sum(layer["size"] for layer in layers)),
            "gguf": gguf_meta,
        },
        "descriptor": {"created": files.created},
        "rootfs": {"type": "rootfs", "diff_ids": [layer["digest"] for layer in layers]},
        "files": [{"diffID": layer["digest"], "type": layer["mediaType"]} for layer in layers],
    }


def modelpack_config(spec: BuildSpec, header: GgufHeader, files: ModelFiles, layers: list[dict]) -> dict:
    return {
        "descriptor": {"name": spec.served_model_name or spec.name, "createdAt": files.created},
        "config": {
            "architecture": header.architecture,
            "format": "gguf",
            "paramSize": parameter_label(header.parameters, spaced=False),
            "quantization": files.quant.lower(),
        },
        "modelfs": {"type": "layers", "diffIds": [layer["digest"] for layer in layers]},
    }


def manifest(
    config_type: str, config: dict, layers: list[dict], artifact_type: str | None = None
) -> tuple[dict, bytes]:
    """(the image manifest, its config blob)."""
    blob = _json(config)
    desc = {"mediaType": config_type, "digest": oci.digest_of(blob), "size": len(blob)}
    body = {"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST, "config": desc, "layers": layers}
    if artifact_type:
        body["artifactType"] = artifact_type
    return body, blob


def push_model(spec: BuildSpec, files: ModelFiles, client: oci.Registry | None = None) -> dict[str, str]:
    """Push the Docker model artifacts (base, one per adapter) and the ModelPack one; {reference: digest}."""
    host, repo, _ = oci.split_ref(spec.model_artifact())
    client = client or oci.Registry(host)
    header = read_header(files.gguf)
    base = _layer(GGUF, oci.upload(client, repo, files.gguf), "model.gguf")
    # every variant's: the mmproj (an adapter changes the language model only: the base's tower serves it), the
    # license and the chat template
    named = ((MMPROJ, files.mmproj, "mmproj.gguf"), (LICENSE, files.license, None),
             (CHAT_TEMPLATE, files.chat_template, None))  # fmt: skip
    extras = [
        _layer(media_type, oci.upload(client, repo, path), name or path.name)
        for media_type, path, name in named
        if path is not None
    ]
    variants = {spec.model_artifact(): [base, *extras]}
    for name, path in files.loras.items():
        lora = _layer(GGUF_LORA, oci.upload(client, repo, path), f"{name}.gguf")
        variants[spec.model_artifact(name)] = [base, lora, *extras]
    pushed = {}
    for ref, layers in variants.items():
        body, blob = manifest(DOCKER_CONFIG, docker_config(header, files, layers), layers)
        pushed[ref] = _put(client, repo, ref, body, blob)
    raw = [{**x, "mediaType": _MODELPACK_TYPES[x["mediaType"]]} for x in (base, *extras)]
    body, blob = manifest(MODELPACK_CONFIG, modelpack_config(spec, header, files, raw), raw, MODELPACK)
    ref = spec.model_artifact(flavour="modelpack")
    pushed[ref] = _put(client, repo, ref, body, blob)
    return pushed


def _put(client: oci.Registry, repo: str, ref: str, body: dict, blob: bytes) -> str:
    client.put_blob(repo, body["config"]["digest"], len(blob), blob)
    return client.put_manifest(repo, oci.split_ref(ref)[2], _json(body))
