"""`builder k8s --weights image-volume` (builder/image/k8s_weights.py): the engine Deployment with the weights and
each adapter as image volumes, valid against the Kubernetes 1.36 and 1.37 schemas (strict, as the other
manifests), pinned by the digests `make push` recorded; the KServe ServingRuntime + InferenceService pair valid
against KServe's own CRD schemas (vendored, pruned: tests/image/schemas/kserve-crds.json), strict.

No cluster here: the Deployment's env, mounts and preset are run in Docker by tests/e2e/test_oci_weights.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from test_k8s import KUBECTL, ROOT, VERSIONS, container, env_of, resource_docs, validate

from builder.image import k8s, k8s_weights, push
from builder.model.gguf.router import LORA_DIR
from builder.spec import BuildSpec

KSERVE = json.loads((Path(__file__).parent / "schemas" / "kserve-crds.json").read_text())
DIGEST = "sha256:" + "cd" * 32
ADAPTERS = {"sql": "/adapters-on-host/sql", "chat": "/adapters-on-host/chat"}


def render(spec: BuildSpec, pushed: dict[str, str] | None = None) -> dict[str, str]:
    return k8s.render_k8s_text(spec, pushed=pushed, extras=k8s_weights.render)


def docs(files: dict[str, str], folder: str) -> dict[str, dict]:
    return {d["kind"]: d for name, d in resource_docs(files) if name.startswith(folder + "/")}


def strict(schema: dict) -> dict:
    """A CRD's structural schema as a JSON schema that refuses unknown fields (the API server would prune them
    silently: a misspelt field would be lost, not refused)."""
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {k: strict(v) for k, v in out["properties"].items()}
        if not out.get("x-kubernetes-preserve-unknown-fields"):
            out.setdefault("additionalProperties", False)
    if isinstance(out.get("items"), dict):
        out["items"] = strict(out["items"])
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = strict(out["additionalProperties"])
    return out


def kserve_validate(doc: dict) -> None:
    kind = KSERVE["kinds"][doc["kind"]]
    assert doc["apiVersion"] == kind["apiVersion"]
    jsonschema.validate(doc, strict(kind["schema"]))


def unchecked(doc, schema: dict, path: str = "") -> list[str]:
    """Fields of `doc` below a field the vendored schema keeps as its type alone (so left unchecked)."""
    if isinstance(doc, dict) and isinstance(schema.get("additionalProperties"), dict):  # a map
        return [p for k, v in doc.items() for p in unchecked(v, schema["additionalProperties"], f"{path}.{k}")]
    if isinstance(doc, dict) and path != ".metadata":
        if "properties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields") and doc:
            return [path]
        return [p for k, v in doc.items() for p in unchecked(v, schema.get("properties", {}).get(k, {}), f"{path}.{k}")]
    if isinstance(doc, list) and doc:
        if not schema.get("items"):
            return [path]
        return [p for v in doc for p in unchecked(v, schema["items"], path + "[]")]
    return []


@pytest.fixture(scope="module")
def files() -> dict[str, str]:
    return render(BuildSpec(adapters=ADAPTERS, served_model_name="tiny"))


def test_image_volume_manifests_validate(files):
    found = docs(files, "image-volume/llamacpp")
    assert set(found) == {"Deployment", "Service", "PodDisruptionBudget", "ConfigMap"}
    for doc in found.values():
        try:
            validate(doc)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{doc['kind']} invalid for Kubernetes {e.version}: {e.message} at {list(e.path)}")
    # strict: the image volume's fields are checked (a misspelt one fails in both versions)
    pod = found["Deployment"]["spec"]["template"]["spec"]
    (weights,) = [v for v in pod["volumes"] if v["name"] == "weights"]
    weights["image"]["pullPolicy"], weights["image"]["pulPolicy"] = "Always", weights["image"].pop("pullPolicy")
    for version in VERSIONS:
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(found["Deployment"], version, strict=True)


def test_engine_with_weights_and_adapters_mounted_read_only(files):
    spec = BuildSpec(adapters=ADAPTERS, served_model_name="tiny")
    deploy = docs(files, "image-volume/llamacpp")["Deployment"]
    c = container(deploy)
    assert c["image"] == spec.engine_image("llamacpp")
    pod = deploy["spec"]["template"]["spec"]
    sources = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert sources["weights"]["image"] == {"reference": spec.weights_image(), "pullPolicy": "IfNotPresent"}
    # the weights image holds /models/model.gguf: its `models` folder is mounted at /models
    assert mounts["weights"] == {"name": "weights", "mountPath": "/models", "subPath": "models", "readOnly": True}
    for i, name in enumerate(ADAPTERS):
        assert sources[f"lora-{i}"]["image"]["reference"] == spec.lora_image(name)
        assert mounts[f"lora-{i}"] == {"name": f"lora-{i}", "mountPath": f"/adapters/{name}",
                                       "subPath": LORA_DIR.lstrip("/"), "readOnly": True}  # fmt: skip
    assert mounts["preset"]["mountPath"] == "/etc/llama-server" and mounts["preset"]["readOnly"]
    # the root filesystem stays read-only, and the writable paths are the baked Deployment's
    assert c["securityContext"]["readOnlyRootFilesystem"] is True and {"tmp", "home"} <= set(mounts)
    env = env_of(c)
    assert env["LLAMA_ARG_MODEL"]["value"] == "" and env["LLAMA_ARG_ALIAS"]["value"] == ""  # router mode
    assert env["LLAMA_ARG_MODELS_PRESET"]["value"] == "/etc/llama-server/preset.ini"
    assert env["LLAMA_ARG_MODELS_MAX"]["value"] == "3" and env["LLAMA_ARG_OFFLINE"]["value"] == "1"
    # the preset names each adapter's file where its image is mounted
    config = docs(files, "image-volume/llamacpp")["ConfigMap"]
    assert sources["preset"]["configMap"]["name"] == config["metadata"]["name"]
    preset = config["data"]["preset.ini"]
    for name in ADAPTERS:
        section = preset.split(f"[{name}]\n", 1)[1].split("\n\n")[0]
        assert f"lora = /adapters/{name}/{name}.gguf" in section and "model = /models/model.gguf" in section
    assert "[tiny]\nmodel = /models/model.gguf" in preset


def test_without_adapters_the_engine_serves_the_weights_under_the_served_name():
    files = render(BuildSpec(served_model_name="tiny"))
    found = docs(files, "image-volume/llamacpp")
    assert "ConfigMap" not in found
    c = container(found["Deployment"])
    assert [m["name"] for m in c["volumeMounts"]] == ["tmp", "home", "weights"]
    assert env_of(c)["LLAMA_ARG_ALIAS"]["value"] == "tiny" and "LLAMA_ARG_MODEL" not in env_of(c)
    merged = render(BuildSpec(adapters={"sql": "/a"}, lora_mode="merge"))  # merged: the weights image has it
    assert [m["name"] for m in container(docs(merged, "image-volume/llamacpp")["Deployment"])["volumeMounts"]] == [
        "tmp", "home", "weights",
    ]  # fmt: skip


def test_images_pinned_by_the_digests_push_recorded():
    spec = BuildSpec(registry="r.example:5000/acme", tag="v1", adapters={"sql": "/a"})
    pushed = {
        "llamacpp-engine": f"{spec.engine_image('llamacpp')}@{DIGEST}",
        push.WEIGHTS: f"{spec.weights_image()}@{DIGEST}",
        push.LORA + "sql": f"r.example:5000/acme/llm-lora:v0-sql@{DIGEST}",  # pushed under another tag: not this
    }
    files = render(spec, pushed)
    deploy = docs(files, "image-volume/llamacpp")["Deployment"]
    refs = {v["name"]: v["image"]["reference"] for v in deploy["spec"]["template"]["spec"]["volumes"] if "image" in v}
    assert refs == {"weights": pushed[push.WEIGHTS], "lora-0": spec.lora_image("sql")}
    assert container(deploy)["image"] == pushed["llamacpp-engine"]
    isvc = docs(files, "kserve/llamacpp")["InferenceService"]
    assert isvc["spec"]["predictor"]["model"]["storageUri"] == f"oci+native://{pushed[push.WEIGHTS]}"
    assert (
        docs(files, "kserve/llamacpp")["ServingRuntime"]["spec"]["containers"][0]["image"] == pushed["llamacpp-engine"]
    )


def test_kserve_pair_validates_against_kserve_schemas(files):
    found = docs(files, "kserve/llamacpp")
    assert set(found) == {"ServingRuntime", "InferenceService"}
    for doc in found.values():
        kserve_validate(doc)
        schema = KSERVE["kinds"][doc["kind"]]["schema"]
        assert not unchecked(doc, schema), "fields outside the vendored schema: scripts/vendor_kserve_schemas.py"
    # strict: a misspelt field, a wrong type, or a field of another kind fails
    runtime = found["ServingRuntime"]
    bad = json.loads(json.dumps(runtime))
    bad["spec"]["containers"][0]["imagePullPolicy"], bad["spec"]["containers"][0]["imagePulPolicy"] = None, "x"
    del bad["spec"]["containers"][0]["imagePullPolicy"]
    with pytest.raises(jsonschema.ValidationError):
        kserve_validate(bad)
    bad = json.loads(json.dumps(runtime))
    bad["spec"]["containers"][0]["ports"][0]["containerPort"] = "8002"
    with pytest.raises(jsonschema.ValidationError):
        kserve_validate(bad)
    bad = json.loads(json.dumps(found["InferenceService"]))
    bad["spec"]["predictor"]["model"]["storageURI"] = bad["spec"]["predictor"]["model"].pop("storageUri")
    with pytest.raises(jsonschema.ValidationError):
        kserve_validate(bad)


def test_kserve_pair_serves_the_weights_image_with_the_engine(files):
    spec = BuildSpec(adapters=ADAPTERS, served_model_name="tiny")
    found = docs(files, "kserve/llamacpp")
    runtime, isvc = found["ServingRuntime"], found["InferenceService"]
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    # oci+native: KServe mounts the image as an image volume, its `models` folder at /mnt/models (the plain
    # oci:// modelcar runs `sh` in the image, which a FROM scratch weights image has not)
    assert model["storageUri"] == f"oci+native://{spec.weights_image()}"
    (c,) = runtime["spec"]["containers"]
    assert c["name"] == "kserve-container" and c["image"] == spec.engine_image("llamacpp")
    env = {e["name"]: e for e in c["env"]}
    assert env["LLAMA_ARG_MODEL"]["value"] == "/mnt/models/model.gguf"
    assert env["LLAMA_ARG_ALIAS"]["value"] == "tiny"  # the base; the adapters are the Deployment's
    assert "LLAMA_ARG_MODELS_PRESET" not in env and "secretKeyRef" in env["LLAMA_API_KEY"]["valueFrom"]
    assert c["ports"] == [{"containerPort": 8002, "protocol": "TCP"}]
    one = render(BuildSpec(adapter=Path("/a"), served_model_name="tiny"))  # ADAPTER=path: served as `tiny`
    env = {e["name"]: e for e in docs(one, "kserve/llamacpp")["ServingRuntime"]["spec"]["containers"][0]["env"]}
    assert env["LLAMA_ARG_ALIAS"]["value"] == "tiny-base"


def test_the_default_render_has_none_of_them(files):
    default = k8s.render_k8s_text(BuildSpec(adapters=ADAPTERS, served_model_name="tiny"))
    assert not [f for f in default if f.startswith(("image-volume/", "kserve/"))]
    assert set(default) < set(files)
    readme = files["README.md"]
    assert "| `image-volume/llamacpp/` |" in readme and "| `kserve/llamacpp/` |" in readme


@pytest.mark.skipif(KUBECTL is None, reason="kubectl (with its built-in kustomize) is not installed")
def test_cli_renders_and_kustomize_builds_them(tmp_path):
    out = tmp_path / "k"
    res = subprocess.run(
        [sys.executable, "-m", "builder", "k8s", "--out", str(out), "--pushed", str(tmp_path / "no.json"),
         "--weights", "image-volume", "--backend", "llamacpp", "--adapter", "sql=/a"],
        capture_output=True, text=True, cwd=ROOT, env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    bases = sorted(Path(line.split("\t")[0]).relative_to(out).as_posix() for line in res.stdout.splitlines())
    assert bases == ["image-volume/llamacpp", "kserve/llamacpp", "llamacpp", "overlays/registry-pull-secret"]
    for base in ("image-volume/llamacpp", "kserve/llamacpp"):
        built = subprocess.run([KUBECTL, "kustomize", str(out / base)], capture_output=True, text=True, timeout=60)
        assert built.returncode == 0, built.stderr
        for doc in (d for d in yaml.safe_load_all(built.stdout) if d):
            kserve_validate(doc) if doc["kind"] in KSERVE["kinds"] else validate(doc)
