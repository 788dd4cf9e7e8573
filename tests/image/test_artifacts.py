"""The GGUF as model artifacts (builder/image/artifacts.py): Docker's model format and CNCF ModelPack, their media
types, configs (the ModelPack one against ModelPack's own JSON schema) and manifests, pushed to an in-memory
registry (tests/_oci_server.py) so every blob and manifest the push sends is seen; the real registry and a pull
back are the e2e's (tests/e2e/test_oci_weights.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
from _gguf_file import PARAMETERS, write_gguf
from _oci_server import registry_server

from builder.image import artifacts
from builder.image import registry as oci
from builder.model.gguf.header import read_header
from builder.spec import BuildSpec

MODELPACK_SCHEMA = json.loads((Path(__file__).parent / "schemas" / "modelpack-config.schema.json").read_text())
CREATED = "2026-12-05T10:00:00.123456789Z"  # as `docker image inspect` writes it
RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)")


@pytest.fixture
def model(tmp_path) -> dict:
    """A local model folder (license, chat template), its GGUF and one adapter's LoRA GGUF."""
    folder = tmp_path / "tiny-chat"
    folder.mkdir()
    (folder / "LICENSE.txt").write_text("Apache-2.0\n")
    (folder / "chat_template.jinja").write_text("{{ messages }}")
    gguf = write_gguf(tmp_path / "model.gguf", arch="llama", name="tiny-chat")
    lora = write_gguf(tmp_path / "lora-tuned.gguf", lora=True)
    spec = BuildSpec(model=str(folder), adapters={"tuned": str(folder)}, name="m", tag="t1")
    license_file, template = artifacts.model_folder_files(spec)
    files = artifacts.ModelFiles(gguf, "q8_0", CREATED, {"tuned": lora}, license_file, template)
    return {"folder": folder, "spec": spec, "files": files}


def test_model_folder_files(model, tmp_path):
    assert artifacts.model_folder_files(model["spec"]) == (
        model["folder"] / "LICENSE.txt", model["folder"] / "chat_template.jinja",
    )  # fmt: skip
    bare = tmp_path / "bare"
    bare.mkdir()
    assert artifacts.model_folder_files(BuildSpec(model=str(bare))) == (None, None)
    assert artifacts.model_folder_files(BuildSpec(model="org/hub-model")) == (None, None)
    assert artifacts.model_folder_files(BuildSpec()) == (None, None)  # `make push` with NAME and TAG alone


def _layers(files: artifacts.ModelFiles) -> list[dict]:
    return [artifacts._layer(artifacts.GGUF, {"digest": oci.sha256_file(files.gguf),
                                              "size": files.gguf.stat().st_size}, "model.gguf")]  # fmt: skip


def test_docker_config_is_what_model_runner_reads(model):
    files = model["files"]
    layers = _layers(files)
    config = artifacts.docker_config(read_header(files.gguf), files, layers)
    assert config["config"] == {
        "format": "gguf",
        "quantization": "Q8_0",
        "parameters": str(PARAMETERS),
        "architecture": "llama",
        "size": str(files.gguf.stat().st_size),
        "gguf": {"general.architecture": "llama", "general.name": "tiny-chat", "general.file_type": "1"},
    }
    assert config["descriptor"] == {"created": CREATED}
    # the layers are the files themselves, uncompressed: the diff id of each is its digest
    assert config["rootfs"] == {"type": "rootfs", "diff_ids": [layers[0]["digest"]]}
    assert config["files"] == [{"diffID": layers[0]["digest"], "type": artifacts.GGUF}]


def test_modelpack_config_validates_against_modelpack_schema(model):
    files = model["files"]
    layers = [{**x, "mediaType": artifacts.MODELPACK_WEIGHT} for x in _layers(files)]
    config = artifacts.modelpack_config(model["spec"], read_header(files.gguf), files, layers)
    jsonschema.validate(config, MODELPACK_SCHEMA)
    assert config["modelfs"] == {"type": "layers", "diffIds": [layers[0]["digest"]]}
    assert config["config"] == {"architecture": "llama", "format": "gguf", "paramSize": "0.1k", "quantization": "q8_0"}
    assert config["descriptor"]["name"] == "tiny-chat" and RFC3339.fullmatch(config["descriptor"]["createdAt"])
    # the schema is strict: a field of Docker's config (snake_case) is refused
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**config, "modelfs": {"type": "layers", "diff_ids": ["x"]}}, MODELPACK_SCHEMA)


def test_manifest_and_its_config_blob():
    body, blob = artifacts.manifest("application/x-config", {"b": 1, "a": 2}, [], artifact_type="application/x-art")
    assert blob == b'{"a":2,"b":1}'  # sorted, compact: the same config gives the same digest
    assert body == {
        "schemaVersion": 2,
        "mediaType": oci.OCI_MANIFEST,
        "config": {"mediaType": "application/x-config", "digest": oci.digest_of(blob), "size": len(blob)},
        "layers": [],
        "artifactType": "application/x-art",
    }
    assert "artifactType" not in artifacts.manifest("application/x-config", {}, [])[0]


def test_push_model_sends_each_file_once_and_a_manifest_per_variant(model):
    files = model["files"]
    with registry_server() as (host, state):
        spec = model["spec"].model_copy(update={"registry": host})
        pushed = artifacts.push_model(spec, files)
        assert set(pushed) == {f"{host}/m-model:t1", f"{host}/m-model:t1-tuned", f"{host}/m-model:t1-modelpack"}
        repo_blobs = dict(state.blobs)
        manifests = {ref.rsplit(":", 1)[1]: json.loads(state.manifests[("m-model", ref.rsplit(":", 1)[1])][0])
                     for ref in pushed}  # fmt: skip
        for ref, digest in pushed.items():
            assert state.manifests[("m-model", digest)][0] == state.manifests[("m-model", ref.rsplit(":", 1)[1])][0]
        uploads = [path for method, path, _ in state.requests if method == "PUT" and "/blobs/uploads/" in path]
        # pushed again (same files, same `created`): no blob goes out, the same manifests
        assert artifacts.push_model(spec, files) == pushed
        assert [p for m, p, _ in state.requests if m == "PUT" and "/blobs/uploads/" in p] == uploads
    gguf, lora = oci.sha256_file(files.gguf), oci.sha256_file(files.loras["tuned"])
    license_d, template_d = oci.sha256_file(files.license), oci.sha256_file(files.chat_template)
    configs = {m["config"]["digest"] for m in manifests.values()}
    # four files, three configs: every blob uploaded once
    assert set(repo_blobs) == {gguf, lora, license_d, template_d, *configs} and len(uploads) == 7
    assert repo_blobs[gguf] == files.gguf.read_bytes()

    def kinds(tag):
        return [(x["mediaType"], x["digest"], x["annotations"][artifacts.TITLE]) for x in manifests[tag]["layers"]]

    extras = [
        (artifacts.LICENSE, license_d, "LICENSE.txt"),
        (artifacts.CHAT_TEMPLATE, template_d, "chat_template.jinja"),
    ]
    assert kinds("t1") == [(artifacts.GGUF, gguf, "model.gguf"), *extras]
    assert kinds("t1-tuned") == [
        (artifacts.GGUF, gguf, "model.gguf"),
        (artifacts.GGUF_LORA, lora, "tuned.gguf"),
        *extras,
    ]
    assert kinds("t1-modelpack") == [(artifacts.MODELPACK_WEIGHT, gguf, "model.gguf"),
                                     (artifacts.MODELPACK_DOC, license_d, "LICENSE.txt"),
                                     (artifacts.MODELPACK_WEIGHT_CONFIG, template_d, "chat_template.jinja")]  # fmt: skip
    for tag, m in manifests.items():
        assert m["mediaType"] == oci.OCI_MANIFEST
        for x in m["layers"]:
            assert x["annotations"][artifacts.FILEPATH] == x["annotations"][artifacts.TITLE]
        config = json.loads(repo_blobs[m["config"]["digest"]])
        if tag.endswith("modelpack"):
            assert m["artifactType"] == artifacts.MODELPACK and m["config"]["mediaType"] == artifacts.MODELPACK_CONFIG
            jsonschema.validate(config, MODELPACK_SCHEMA)
            assert config["modelfs"]["diffIds"] == [x["digest"] for x in m["layers"]]
        else:
            assert "artifactType" not in m and m["config"]["mediaType"] == artifacts.DOCKER_CONFIG
            assert config["rootfs"]["diff_ids"] == [x["digest"] for x in m["layers"]]
            assert config["config"]["size"] == str(sum(x["size"] for x in m["layers"]))


def test_hub_model_artifacts_carry_the_weights_alone(model):
    files = artifacts.ModelFiles(model["files"].gguf, "q4_k_m", CREATED)
    with registry_server() as (host, state):
        spec = BuildSpec(model="org/hub-model", registry=f"{host}/acme", name="hub", tag="v2")
        pushed = artifacts.push_model(spec, files)
        assert set(pushed) == {f"{host}/acme/hub-model:v2", f"{host}/acme/hub-model:v2-modelpack"}
        docker = json.loads(state.manifests[("acme/hub-model", "v2")][0])
    assert [x["mediaType"] for x in docker["layers"]] == [artifacts.GGUF]
