"""Weights as OCI artifacts, on the demo model with one adapter served unmerged (llama.cpp): `make push` sends the
runtime, the engine (no weights), the FROM-scratch weights image and the adapter's image, whose layers are the
runtime's own (same compressed digests in the registry); the GGUF model artifacts pulled back with the registry
API carry the right media types, config and byte-identical files and add only their JSON to the registry; the
engine started with the weights copied out of the weights image answers like the baked image, and so does the
`builder k8s --weights image-volume` Deployment run in Docker (its env, its image volumes by the pushed
digests, its preset ConfigMap, a read-only root filesystem).

The build reuses the stages tests/e2e/test_lora_serve.py builds (same demo base, QUANT, first adapter): with
its cache, the images here cost seconds, not llama.cpp's compile.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time

import pytest
import yaml

from builder import backends
from builder.demo import model as demo
from builder.image import artifacts, k8s, k8s_weights
from builder.image import registry as oci
from builder.image.build import build
from builder.image.push import push
from builder.model.gguf.header import read_header
from builder.model.gguf.router import base_name
from builder.spec import load_spec

openai = pytest.importorskip("openai")
oras_client = pytest.importorskip("oras.client")  # an independent OCI client (oras-py), a test dependency
oras_schemas = pytest.importorskip("oras.schemas")

from conftest import REPO, docker, manifest_layers, registry_bytes  # noqa: E402

pytestmark = pytest.mark.e2e

NAME, TAG, API_KEY = "e2e-oci", "t1", "e2e-oci-key"
SPEC = REPO / "tests" / "e2e" / "local-bases.yaml"
LLAMACPP = backends.get("llamacpp")
PROMPT = demo.CHANGED_PROMPT  # the adapter answers it its own way


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
    local = spec.model_copy(update={"registry": None})
    for s in (spec, local):  # the tags this module made (the layers stay in the build cache)
        for ref in [s.image("llamacpp"), s.engine_image("llamacpp"), s.weights_image(), s.lora_image("tuned")]:
            docker("rmi", "-f", ref, check=False)


def _copy_out(ref: str, path: str, dest) -> None:
    """`path` of image `ref` (a FROM scratch one: no command, a dummy one given) copied to `dest`."""
    cid = docker("create", ref, "none").stdout.strip()
    try:
        docker("cp", f"{cid}:{path}", str(dest))
    finally:
        docker("rm", "-f", cid, check=False)


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
    _copy_out(spec.weights_image(), "/models/model.gguf", tmp_path / "image.gguf")
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


def test_oras_pulls_the_artifacts_byte_identical(pushed, tmp_path):
    """oras (not this project's client) reads every manifest, valid against its OCI manifest schema, and pulls
    the adapter's artifact into files named by their title annotation: the weights image's GGUF, the adapter
    image's LoRA."""
    spec = pushed["spec"]
    host, _, _ = oci.split_ref(spec.model_artifact())
    client = oras_client.OrasClient(hostname=host, insecure=True)
    for ref in (spec.model_artifact(), spec.model_artifact("tuned"), spec.model_artifact(flavour="modelpack")):
        manifest = client.get_manifest(ref, validation_schema=oras_schemas.manifest)
        assert manifest["mediaType"] == oci.OCI_MANIFEST
    pulled = client.pull(target=spec.model_artifact("tuned"), outdir=str(tmp_path / "oras"))
    assert {"model.gguf", "tuned.gguf"} <= {os.path.basename(p) for p in pulled}  # and the model folder's files
    _copy_out(spec.weights_image(), "/models/model.gguf", tmp_path / "image.gguf")
    _copy_out(spec.lora_image("tuned"), "/models/lora/tuned.gguf", tmp_path / "lora.gguf")
    assert (tmp_path / "oras" / "model.gguf").read_bytes() == (tmp_path / "image.gguf").read_bytes()
    assert (tmp_path / "oras" / "tuned.gguf").read_bytes() == (tmp_path / "lora.gguf").read_bytes()


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
    _copy_out(spec.weights_image(), "/models", weights)
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
    assert answers["engine"].strip() == demo.BASE_ANSWERS[PROMPT].strip()


def test_model_artifacts_pushed_again_add_only_their_json(pushed, tmp_path):
    """The same files under another tag: the blobs are in the registry already, only manifests and configs go."""
    # a tag of its own per run (a tag pushed by an earlier run would cost nothing: nothing to measure)
    spec = pushed["spec"].model_copy(update={"tag": f"{TAG}-again{int(time.time())}"})
    _copy_out(pushed["spec"].weights_image(), "/models/model.gguf", tmp_path / "m.gguf")
    _copy_out(pushed["spec"].lora_image("tuned"), "/models/lora/tuned.gguf", tmp_path / "tuned.gguf")
    host, repo, _ = oci.split_ref(spec.model_artifact())
    client = oci.Registry(host)
    first, _, _ = client.manifest(repo, TAG)
    out = io.BytesIO()
    oci.read_blob_to(client, repo, first["config"]["digest"], out)
    created = json.loads(out.getvalue())["descriptor"]["created"]  # the first push's: the same configs
    files = artifacts.ModelFiles(tmp_path / "m.gguf", "q8_0", created, {"tuned": tmp_path / "tuned.gguf"})
    before = registry_bytes()
    again = artifacts.push_model(spec, files)
    grown = registry_bytes() - before
    json_bytes = 0
    for ref in again:
        manifest, _, size = client.manifest(repo, oci.split_ref(ref)[2])
        json_bytes += size + manifest["config"]["size"]
    gguf = (tmp_path / "m.gguf").stat().st_size
    print(f"artifacts pushed again: registry grew {grown} B; their manifests + configs {json_bytes} B; "
          f"GGUF {gguf} B, LoRA {(tmp_path / 'tuned.gguf').stat().st_size} B")  # fmt: skip
    # the JSON plus registry:2's own link files (~100 B per tag, revision and blob link), never a blob again
    assert grown < json_bytes + 4096 * len(again) and grown < gguf / 4


def _by_digest(ref: str) -> str:
    """`host/repo:tag@sha256:...` as `host/repo@sha256:...`: the image the digest names (as the kubelet pulls it)."""
    name, digest = ref.split("@", 1)
    repo = name.rsplit(":", 1)[0] if ":" in name.rsplit("/", 1)[-1] else name
    return f"{repo}@{digest}"


def _router_ready(port: int, timeout: float = 180) -> openai.OpenAI:
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    deadline = time.monotonic() + timeout
    while True:
        try:
            if all(m.model_extra["status"]["value"] == "loaded" for m in client.models.list().data):
                return client
        except (openai.APIError, KeyError, TypeError):
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"the router on port {port} did not load every name in {timeout:.0f} s")
        time.sleep(2)


def test_image_volume_deployment_run_in_docker_answers_like_the_baked_image(pushed, tmp_path):
    """The rendered Deployment as a kubelet would run it, in Docker: its engine image, each image volume (the
    pushed digest's `subPath` folder, read-only), its ConfigMap, its env, a read-only root filesystem with
    the emptyDirs as tmpfs. Every served name answers as in the baked image."""
    spec = pushed["spec"]
    files = k8s.render_k8s_text(spec, names=["llamacpp"], pushed=pushed["pushed"], extras=k8s_weights.render)
    deploy = yaml.safe_load(files["image-volume/llamacpp/deployment.yaml"])
    config = yaml.safe_load(files["image-volume/llamacpp/preset.yaml"])
    pod = deploy["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    sources = {v["name"]: v for v in pod["volumes"]}
    args = ["--read-only", "--user", f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}"]
    for m in c["volumeMounts"]:
        source = sources[m["name"]]
        if "image" in source:
            ref = source["image"]["reference"]
            assert "@sha256:" in ref, f"{m['name']}: not pinned by the pushed digest"
            _copy_out(_by_digest(ref), "/" + m["subPath"], tmp_path / m["name"])
            os.chmod(tmp_path / m["name"], 0o755)
            args += ["-v", f"{tmp_path / m['name']}:{m['mountPath']}:ro"]
        elif "configMap" in source:
            (tmp_path / m["name"]).mkdir()
            for key, text in config["data"].items():
                (tmp_path / m["name"] / key).write_text(text)
            args += ["-v", f"{tmp_path / m['name']}:{m['mountPath']}:ro"]
        else:
            assert source.get("emptyDir") == {}, m
            args += ["--tmpfs", f"{m['mountPath']}:mode=1777"]
    for e in c["env"]:
        args += ["-e", f"{e['name']}={e['value'] if 'value' in e else API_KEY}"]  # the one secret: the API key
    assert "@sha256:" in c["image"]
    served = spec.served_model_name or "model"
    names = [base_name(served, list(spec.adapters)), *spec.adapters]
    answers = {}
    for kind, (port, image, more) in {"baked": (18303, spec.image("llamacpp"), []),
                                      "image-volume": (18304, _by_digest(c["image"]), args)}.items():  # fmt: skip
        container = f"e2e-oci-{kind}"
        docker("rm", "-f", container, check=False)
        docker("run", "-d", "--name", container, "-p", f"127.0.0.1:{port}:{LLAMACPP.port}",
               "-e", f"{LLAMACPP.api_key_var}={API_KEY}", *more, image)  # fmt: skip
        try:
            client = _router_ready(port)
            assert sorted(m.id for m in client.models.list().data) == sorted(names)
            answers[kind] = {name: _answer(port, name) for name in names}
        finally:
            docker("rm", "-f", container, check=False)
    assert answers["image-volume"] == answers["baked"]
    assert answers["baked"]["tuned"].strip() == demo.LORA_ANSWERS[PROMPT].strip()
    assert answers["baked"][names[0]].strip() == demo.BASE_ANSWERS[PROMPT].strip()
