"""chatglm.cpp's engine image (the runtime without weights) and its weights image (the GGML file, FROM scratch): the
Dockerfile targets, their names beside llama.cpp's and vLLM's, what `make push` pushes and records, and the
`builder k8s --weights image-volume` and KServe renders (valid against the Kubernetes 1.36 and 1.37 schemas and
KServe's CRD schemas, strict). Built and served in Docker by tests/e2e/test_pipeline.py."""

from __future__ import annotations

import json

import kubernetes_validate
import pytest
from test_build import _env, _layers, _stage
from test_k8s import container, env_of, validate
from test_k8s_weights import KSERVE, docs, kserve_validate, render, unchecked
from test_push import DIGEST, FakeDocker

from builder.image import push
from builder.image.build import mounted_targets
from builder.image.render import render_text
from builder.selection import Selection
from builder.spec import BuildSpec

GLM = "chatglmcpp"


@pytest.mark.parametrize("device,tag", [("auto", "0.4.2"), ("cuda", "0.4.2-cuda-80-86-89-90")])
def test_engine_and_weights_targets_hold_the_runtime_layers(device, tag):
    spec = BuildSpec(backends=[GLM], name="m", tag="t", device=device)
    targets = mounted_targets(spec, GLM, Selection([GLM]))
    assert targets == {"engine": f"chatglmcpp-engine:{tag}", "weights": "m-weights-ggml:t"}
    text = render_text(spec, Selection([GLM]))["Dockerfile.chatglmcpp"]
    runtime, engine, weights = _stage(text, "runtime"), _stage(text, "engine"), _stage(text, "weights")
    assert "FROM ${RUNTIME_BASE} AS engine\n" in text and "FROM ${RUNTIME_BASE} AS runtime\n" in text
    # same base, same instructions: the engine's layers are the runtime's bottom layers
    assert _layers(engine) and _layers(runtime)[: len(_layers(engine))] == _layers(engine)
    # above them the runtime has exactly the weights image's one COPY, the same instruction
    assert _layers(runtime)[len(_layers(engine)) :] == weights == ["COPY --from=ggml /w/ /"]
    assert "FROM scratch AS weights\n" in text and "--chown" not in " ".join(runtime)
    # the ggml stage writes the file as /models/model.ggml under /w, pinned: the same bytes give the same layer
    stage = " ".join(_stage(text, "ggml"))
    assert "--out /w/models/model.ggml" in stage and "touch -h -d @0" in stage and "chown -R 0:0 /w" in stage
    assert "GGML_MODEL=/models/model.ggml" in _env(engine) and "GGML_MODEL=/models/model.ggml" in _env(runtime)
    # the served name: the build's in the runtime, a run-time setting of the engine (default `model`)
    assert "SERVED_MODEL_NAME=${SERVED_MODEL_NAME}" in _env(runtime) and "SERVED_MODEL_NAME=model" in _env(engine)
    assert not [i for i in engine if i.startswith("ARG ") and "DEBIAN_FRONTEND" not in i]  # nothing of the model
    assert runtime[-2:] == engine[-2:] == ['ENTRYPOINT ["python3", "-m", "builder.runtime.chatglmcpp"]',
                                           'CMD ["serve"]']  # fmt: skip
    assert f'org.opencontainers.image.version="{tag}"' in " ".join(engine)
    assert "ARG CHATGLM_CPP_VERSION=0.4.2" in text


def test_weights_names_never_collide_with_the_gguf_and_hugging_face_ones():
    spec = BuildSpec(backends=[GLM, "llamacpp", "vllm"], name="m", tag="t", registry="r:5000/x")
    names = {spec.weights_image(b) for b in (GLM, "llamacpp", "vllm")}
    assert spec.weights_image(GLM) == "r:5000/x/m-weights-ggml:t" and len(names) == 3
    assert (
        len({push.weights_key(b) for b in (GLM, "llamacpp", "vllm")}) == 3 and push.weights_key(GLM) == "weights-ggml"
    )
    assert spec.engine_image(GLM) == "r:5000/x/chatglmcpp-engine:0.4.2"


def test_push_records_the_engine_and_weights_images_and_no_model_artifact(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = BuildSpec(registry="r.example:5000", tag="t", backends=[GLM])
    docker = FakeDocker({"llm-chatglmcpp:t", "chatglmcpp-engine:0.4.2", "llm-weights-ggml:t"})
    pushed = push.push(spec, docker)
    images = [f"r.example:5000/{ref}" for ref in ("llm-chatglmcpp:t", "chatglmcpp-engine:0.4.2", "llm-weights-ggml:t")]
    assert list(pushed) == images  # Docker's model artifacts are GGUF only: none for a GGML file
    assert json.loads(push.pushed_file(spec).read_text()) == {
        "chatglmcpp": f"{images[0]}@{DIGEST}", "chatglmcpp-engine": f"{images[1]}@{DIGEST}",
        "weights-ggml": f"{images[2]}@{DIGEST}",
    }  # fmt: skip
    assert not [c for c in docker.calls if c[0] in ("create", "cp")]


@pytest.fixture(scope="module")
def rendered():
    # an adapter named: chatglm.cpp merges it (it serves no adapter unmerged), so no adapter image is mounted
    spec = BuildSpec(adapters={"sql": "/a/sql"}, backends=[GLM], served_model_name="tiny",
                     registry="r.example:5000/acme", tag="v1")  # fmt: skip
    pushed = {
        "chatglmcpp-engine": f"{spec.engine_image(GLM)}@{DIGEST}",
        push.weights_key(GLM): f"{spec.weights_image(GLM)}@{DIGEST}",
        push.WEIGHTS: f"{spec.weights_image()}@sha256:{'ef' * 32}",  # llama.cpp's GGUF: not this engine's weights
    }
    return spec, pushed, render(spec, pushed)


def test_image_volume_deployment_runs_the_engine_with_the_weights(rendered):
    spec, pushed, files = rendered
    found = docs(files, "image-volume/chatglmcpp")
    assert set(found) == {"Deployment", "Service", "PodDisruptionBudget"}
    for doc in found.values():
        try:
            validate(doc)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{doc['kind']} invalid for Kubernetes {e.version}: {e.message} at {list(e.path)}")
    c = container(found["Deployment"])
    assert c["image"] == pushed["chatglmcpp-engine"]
    volumes = found["Deployment"]["spec"]["template"]["spec"]["volumes"]
    assert {v["name"]: v["image"]["reference"] for v in volumes if "image" in v} == {"weights": pushed["weights-ggml"]}
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["weights"] == {"name": "weights", "mountPath": "/models", "subPath": "models", "readOnly": True}
    env = {k: v.get("value") for k, v in env_of(c).items()}
    assert env["SERVED_MODEL_NAME"] == "tiny" and not [k for k in env if k.startswith(("LLM_", "LLAMA_ARG_"))]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True and {"tmp", "home"} <= set(mounts)
    baked = {m["name"] for m in container(docs(files, GLM)["Deployment"])["volumeMounts"]}
    assert baked <= set(mounts)


def test_kserve_pair_serves_the_ggml_file(rendered):
    spec, pushed, files = rendered
    found = docs(files, "kserve/chatglmcpp")
    for doc in found.values():
        kserve_validate(doc)
        assert not unchecked(doc, KSERVE["kinds"][doc["kind"]]["schema"])
    runtime, isvc = found["ServingRuntime"], found["InferenceService"]
    model = isvc["spec"]["predictor"]["model"]
    assert model["storageUri"] == f"oci+native://{pushed['weights-ggml']}"
    assert model["modelFormat"]["name"] == "ggml" in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    (c,) = runtime["spec"]["containers"]
    env = {e["name"]: e for e in c["env"]}
    assert c["image"] == pushed["chatglmcpp-engine"] and env["GGML_MODEL"]["value"] == "/mnt/models/model.ggml"
    assert env["SERVED_MODEL_NAME"]["value"] == "tiny" and "secretKeyRef" in env["API_KEY"]["valueFrom"]
