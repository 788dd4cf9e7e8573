"""Weights as OCI artifacts, on the demo model with one adapter served unmerged (llama.cpp): `make push` sends the
runtime, the engine (no weights), the FROM-scratch weights image and the adapter's image, whose layers are the
runtime's own (same compressed digests in the registry); the GGUF model artifacts pulled back with the registry
API carry the right media types, config and byte-identical files; the engine started with the weights copied
out of the weights image answers like the baked image.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time

import pytest

from builder import backends
from builder.image import artifacts
from builder.image import registry as oci
from builder.image.build import build
from builder.image.push import push
from builder.model.gguf.header import read_header
from builder.model.gguf.router import base_name
from builder.spec import load_spec

openai = pytest.importorskip("openai")

from conftest import REPO, docker, manifest_layers, registry_bytes  # noqa: E402

pytestmark = pytest.mark.e2e

NAME, TAG, API_KEY = "e2e-oci", "t1", "e2e-oci-key"
SPEC = REPO / "tests" / "e2e" / "local-bases.yaml"
LLAMACPP = backends.get("llamacpp")
PROMPT = "What is the capital of France?"


@pytest.fixture(scope="module")
def pushed(docker_engine, local_bases, demo_models, local_registry, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("oci")
    spec = load_spec({"model": str(demo_models["base"]), "adapters": {"tuned": str(demo_models["adapter"])},
                      "lora_mode": "serve", "backends": "llamacpp", "quant": "q8_0", "quality": "off",
                      "spec_file": SPEC, "name": NAME, "tag": TAG, "registry": local_registry})  # fmt: skip
    t0 = time.monotonic()
    build(spec, workdir=tmp / "build", env_file=tmp / "oci.env")
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        before = registry_bytes()
        refs = push(spec)
        grown = registry_bytes() - before
    finally:
        os.chdir(cwd)
    print(f"build+push {time.monotonic() - t0:.0f}s, registry grew {grown} B")
    yield {
        "spec": spec,
        "refs": refs,
        "tmp": tmp,
        "pushed": json.loads((tmp / "build" / NAME / "pushed.json").read_text()),
    }
    for ref in [spec.image("llamacpp"), spec.weights_image(), spec.lora_image("tuned")]:
        docker("rmi", "-f", ref, check=False)


def test_weights_and_adapter_images_hold_the_runtime_layers(pushed):
    spec = pushed["spec"]
    runtime = manifest_layers(spec.image("llamacpp"))
    weights, lora, engine = (manifest_layers(r) for r in (spec.weights_image(), spec.lora_image("tuned"),
                                                          spec.engine_image("llamacpp")))  # fmt: skip
    assert len(weights) == 1 and len(lora) == 1
    assert set(weights) <= set(runtime) and set(lora) <= set(runtime)
    assert set(engine) <= set(runtime) and not (set(engine) & (set(weights) | set(lora)))
    for key in ("llamacpp-engine", "weights", "lora:tuned", f"model:{TAG}", f"model:{TAG}-modelpack"):
        assert "@sha256:" in pushed["pushed"][key]


def test_model_artifacts_pull_back_byte_identical(pushed, tmp_path):
    spec = pushed["spec"]
    host, repo, _ = oci.split_ref(spec.model_artifact())
    client = oci.Registry(host)
    # the GGUF as the weights image holds it
    docker("create", "--name", "e2e-oci-copy", spec.weights_image(), "none")
    try:
        docker("cp", "e2e-oci-copy:/models/model.gguf", str(tmp_path / "image.gguf"))
    finally:
        docker("rm", "-f", "e2e-oci-copy", check=False)
    want = oci.sha256_file(tmp_path / "image.gguf")
    manifest, digest, size = client.manifest(repo, TAG)
    assert f"{spec.model_artifact()}@{digest}" == pushed["pushed"][f"model:{TAG}"]
    assert manifest["config"]["mediaType"] == artifacts.DOCKER_CONFIG
    assert [layer["mediaType"] for layer in manifest["layers"]][0] == artifacts.GGUF
    out = io.BytesIO()
    assert oci.read_blob_to(client, repo, manifest["config"]["digest"], out) == manifest["config"]["digest"]
    config = json.loads(out.getvalue())
    assert config["config"]["format"] == "gguf" and config["config"]["quantization"] == "Q8_0"
    assert config["config"]["architecture"] == read_header(tmp_path / "image.gguf").architecture
    assert config["rootfs"]["diff_ids"] == [layer["digest"] for layer in manifest["layers"]]
    with (tmp_path / "pulled.gguf").open("wb") as f:
        assert oci.read_blob_to(client, repo, manifest["layers"][0]["digest"], f) == want
    assert hashlib.sha256((tmp_path / "pulled.gguf").read_bytes()).hexdigest() == want.split(":")[1]
    # the adapter's artifact: the same base blob, then its LoRA
    tuned, _, _ = client.manifest(repo, f"{TAG}-tuned")
    assert [x["mediaType"] for x in tuned["layers"][:2]] == [artifacts.GGUF, artifacts.GGUF_LORA]
    assert tuned["layers"][0]["digest"] == manifest["layers"][0]["digest"]
    # ModelPack: the same raw blob, only its own config and manifest
    pack, _, pack_size = client.manifest(repo, f"{TAG}-modelpack")
    assert pack["artifactType"] == artifacts.MODELPACK and pack["config"]["mediaType"] == artifacts.MODELPACK_CONFIG
    assert pack["layers"][0]["mediaType"] == artifacts.MODELPACK_WEIGHT
    assert pack["layers"][0]["digest"] == manifest["layers"][0]["digest"]
    gguf_bytes = manifest["layers"][0]["size"]
    print(f"GGUF blob {gguf_bytes} B (uncompressed, the artifacts' one extra copy); manifests {size} B (docker), "
          f"{pack_size} B + config {pack['config']['size']} B (ModelPack)")  # fmt: skip


def _answer(port: int, model: str) -> str:
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    deadline = time.monotonic() + 180
    while True:
        try:
            out = client.chat.completions.create(model=model, max_tokens=24, temperature=0,
                                                 messages=[{"role": "user", "content": PROMPT}])  # fmt: skip
            return out.choices[0].message.content
        except openai.APIError:
            if time.monotonic() > deadline:
                raise
            time.sleep(2)


def test_engine_with_mounted_weights_answers_like_the_baked_image(pushed, tmp_path):
    spec = pushed["spec"]
    weights = tmp_path / "weights"
    docker("create", "--name", "e2e-oci-w", spec.weights_image(), "none")
    try:
        docker("cp", "e2e-oci-w:/models", str(weights))
    finally:
        docker("rm", "-f", "e2e-oci-w", check=False)
    os.chmod(weights, 0o755)
    served = spec.served_model_name or "model"
    runs = {"baked": (18301, base_name(served, list(spec.adapters)), [spec.image("llamacpp")]),
            "engine": (18302, served, ["-e", f"LLAMA_ARG_ALIAS={served}", "-v", f"{weights}:/models:ro",
                                       spec.engine_image("llamacpp")])}  # fmt: skip
    answers = {}
    for name, (port, model, args) in runs.items():
        container = f"e2e-oci-{name}"
        docker("rm", "-f", container, check=False)
        docker("run", "-d", "--name", container, "-p", f"127.0.0.1:{port}:{LLAMACPP.port}",
               "-e", f"{LLAMACPP.api_key_var}={API_KEY}", *args)  # fmt: skip
        try:
            answers[name] = _answer(port, model)
        finally:
            docker("rm", "-f", container, check=False)
    assert answers["engine"] and answers["engine"] == answers["baked"], answers
