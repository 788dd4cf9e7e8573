"""vLLM's engine image (the runtime without weights), its weights image and one image per adapter served unmerged,
for the GPU image and the CPU variant (one template): the Dockerfile targets, their names beside llama.cpp's,
what `make push` pushes and records, and the `builder k8s --weights image-volume` and KServe renders (valid against
the Kubernetes 1.36 and 1.37 schemas and KServe's CRD schemas, strict). Built and served in Docker by
tests/e2e/test_vllm_cpu.py."""

from __future__ import annotations

import json
from pathlib import Path

import kubernetes_validate
import pytest
from test_build import _env, _layers, _stage
from test_k8s import container, env_of, validate
from test_k8s_weights import KSERVE, docs, kserve_validate, render, unchecked
from test_push import DIGEST, FakeDocker

from builder.image import push
from builder.image.build import mounted_targets
from builder.image.render import render_text
from builder.selection import LoraPlan, Selection
from builder.spec import BuildSpec

VLLM = "vllm"
ADAPTERS = {"sql": Path("/a/sql"), "chat": Path("/a/chat")}


def _spec(device: str = "auto", **fields) -> BuildSpec:
    return BuildSpec(adapters={k: str(v) for k, v in ADAPTERS.items()}, backends=[VLLM], name="m", tag="t",
                     device=device, **fields)  # fmt: skip


def _served() -> Selection:
    return Selection([VLLM], lora={VLLM: LoraPlan("serve", "")}, adapters=ADAPTERS)


@pytest.mark.parametrize("device,tag", [("auto", "0.33.0"), ("cpu", "0.33.0-cpu")])
def test_engine_weights_and_adapter_targets_hold_the_runtime_layers(device, tag):
    spec = _spec(device)
    targets = mounted_targets(spec, VLLM, _served())
    assert targets == {"engine": f"vllm-engine:{tag}", "weights": "m-weights-hf:t",
                       "lora-weights-0": "m-lora-hf:t-sql", "lora-weights-1": "m-lora-hf:t-chat"}  # fmt: skip
    text = render_text(spec, _served())["Dockerfile.vllm"]
    runtime, engine = _stage(text, "runtime"), _stage(text, "engine")
    assert "FROM ${VLLM_BASE} AS engine\n" in text and "FROM ${VLLM_BASE} AS runtime\n" in text
    # same base, same instructions: the engine's layers are the runtime's bottom layers
    assert _layers(engine) and _layers(runtime)[: len(_layers(engine))] == _layers(engine)
    # above them the runtime has exactly the weights and each adapter, each the one COPY of its FROM scratch image
    above = _layers(runtime)[len(_layers(engine)) :]
    images = [_stage(text, t) for t in targets if t != "engine"]
    assert all(len(i) == 1 for i in images) and [i[0] for i in images] == above
    assert above[0] == "COPY --from=chat-template /w/ /" and text.count("FROM scratch AS weights\n") == 1
    # the chat-template stage lays the model out as /models/model, pinned: the same bytes give the same layer
    stage = " ".join(_stage(text, "chat-template"))
    assert "cp -a /in/model /w/models/model" in stage and "touch -h -d @0" in stage and "chown -R 0:0 /w" in stage
    assert "LLM_MODEL_PATH=/models/model" in _env(engine) and "LLM_MODEL_PATH=/models/model" in _env(runtime)
    # what the runtime bakes per model is a run-time setting of the engine, with defaults
    assert "SERVED_MODEL_NAME=${SERVED_MODEL_NAME}" in _env(runtime) and "LLM_MAX_LORAS=2" in _env(runtime)
    assert 'LLM_LORA_MODULES="sql=/models/lora/sql chat=/models/lora/chat"' in _env(runtime)
    for default in ("SERVED_MODEL_NAME=model", 'LLM_LORA_MODULES=""', 'LLM_MAX_LORAS=""', 'LLM_MAX_LORA_RANK=""',
                    "LLM_TRUST_REMOTE_CODE=0"):  # fmt: skip
        assert default in _env(engine)
    assert not [i for i in engine if i.startswith("ARG ")]  # nothing of the build's model in the engine
    device_env = f"LLM_DEVICE={'cpu' if device == 'cpu' else 'cuda'}"
    assert device_env in _env(engine) and device_env in _env(runtime)
    assert runtime[-1] == engine[-1] == 'ENTRYPOINT ["python3", "-m", "builder.runtime.vllm_boot", "serve"]'
    for name, image in zip(ADAPTERS, images[1:], strict=True):
        assert f"/w/models/lora/{name}" in " ".join(_stage(text, f"adapter-{list(ADAPTERS).index(name)}"))
        assert image == [f"COPY --from=adapter-{list(ADAPTERS).index(name)} /w/ /"]


def test_weights_names_never_collide_with_the_gguf_ones():
    spec = BuildSpec(adapters={"sql": "/a"}, backends=[VLLM, "llamacpp"], name="m", tag="t", registry="r:5000/x")
    assert spec.weights_image(VLLM) == "r:5000/x/m-weights-hf:t" != spec.weights_image("llamacpp")
    assert spec.weights_image("llamacpp") == spec.weights_image() == "r:5000/x/m-weights:t"
    assert spec.lora_image("sql", VLLM) == "r:5000/x/m-lora-hf:t-sql" != spec.lora_image("sql", "llamacpp")
    assert push.weights_key(VLLM) == "weights-hf" != push.weights_key("llamacpp")
    assert push.lora_key(VLLM, "sql") == "lora-hf:sql" != push.lora_key("llamacpp", "sql")
    assert spec.engine_image(VLLM) == "r:5000/x/vllm-engine:0.33.0"


def test_push_records_the_engine_weights_and_adapter_images_and_no_model_artifact(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = BuildSpec(registry="r.example:5000", tag="t", adapters={"sql": str(tmp_path)}, backends=[VLLM], device="cpu")
    local = {"llm-vllm:t", "vllm-engine:0.33.0-cpu", "llm-weights-hf:t", "llm-lora-hf:t-sql"}
    docker = FakeDocker(local)
    pushed = push.push(spec, docker)
    images = [f"r.example:5000/{ref}" for ref in ("llm-vllm:t", "vllm-engine:0.33.0-cpu", "llm-weights-hf:t",
                                                   "llm-lora-hf:t-sql")]  # fmt: skip
    assert list(pushed) == images  # Docker's model artifacts are GGUF only: none for vLLM's folders
    assert json.loads(push.pushed_file(spec).read_text()) == {
        "vllm": f"{images[0]}@{DIGEST}", "vllm-engine": f"{images[1]}@{DIGEST}",
        "weights-hf": f"{images[2]}@{DIGEST}", "lora-hf:sql": f"{images[3]}@{DIGEST}",
    }  # fmt: skip
    assert not [c for c in docker.calls if c[0] in ("create", "cp")]  # no file copied out for an artifact


@pytest.fixture(scope="module", params=["auto", "cpu"])
def rendered(request):
    spec = BuildSpec(adapters={"sql": "/a/sql", "chat": "/a/chat"}, backends=[VLLM], served_model_name="tiny",
                     registry="r.example:5000/acme", tag="v1", device=request.param)  # fmt: skip
    pushed = {
        "vllm-engine": f"{spec.engine_image(VLLM)}@{DIGEST}",
        push.weights_key(VLLM): f"{spec.weights_image(VLLM)}@{DIGEST}",
        push.lora_key(VLLM, "sql"): f"{spec.lora_image('sql', VLLM)}@{DIGEST}",
        push.WEIGHTS: f"{spec.weights_image()}@sha256:{'ef' * 32}",  # llama.cpp's GGUF: not vLLM's weights
    }
    return spec, pushed, render(spec, pushed)


def test_image_volume_deployment_runs_the_engine_with_the_weights_and_adapters(rendered):
    spec, pushed, files = rendered
    found = docs(files, "image-volume/vllm")
    assert set(found) == {"Deployment", "Service", "PodDisruptionBudget"}  # no preset: vLLM takes its flags
    for doc in found.values():
        try:
            validate(doc)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{doc['kind']} invalid for Kubernetes {e.version}: {e.message} at {list(e.path)}")
    c = container(found["Deployment"])
    assert c["image"] == pushed["vllm-engine"]
    sources = {v["name"]: v["image"]["reference"] for v in found["Deployment"]["spec"]["template"]["spec"]["volumes"]
               if "image" in v}  # fmt: skip
    # by the digest push recorded for exactly that reference, else by tag
    assert sources == {"weights": pushed["weights-hf"], "lora-0": pushed["lora-hf:sql"],
                       "lora-1": spec.lora_image("chat", VLLM)}  # fmt: skip
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["weights"] == {"name": "weights", "mountPath": "/models", "subPath": "models", "readOnly": True}
    assert mounts["lora-1"] == {"name": "lora-1", "mountPath": "/adapters/chat", "subPath": "models/lora",
                                "readOnly": True}  # fmt: skip
    env = {k: v.get("value") for k, v in env_of(c).items()}
    assert env["SERVED_MODEL_NAME"] == "tiny" and env["LLM_MAX_LORAS"] == "2"
    assert env["LLM_LORA_MODULES"] == "sql=/adapters/sql/sql chat=/adapters/chat/chat"
    assert env["LLM_MAX_LORA_RANK"] == "" and env["LLM_TRUST_REMOTE_CODE"] == "0"  # no folders here: vLLM's default
    assert c["securityContext"]["readOnlyRootFilesystem"] is True and {"tmp", "home"} <= set(mounts)
    # the baked Deployment's writable paths (tmp, home, /dev/shm for vLLM's workers), here too
    baked = {m["name"] for m in container(docs(files, VLLM)["Deployment"])["volumeMounts"]}
    assert "dshm" in baked and baked <= set(mounts)


def test_kserve_pair_serves_the_hugging_face_folder(rendered):
    spec, pushed, files = rendered
    found = docs(files, "kserve/vllm")
    for doc in found.values():
        kserve_validate(doc)
        assert not unchecked(doc, KSERVE["kinds"][doc["kind"]]["schema"])
    runtime, isvc = found["ServingRuntime"], found["InferenceService"]
    model = isvc["spec"]["predictor"]["model"]
    assert model["storageUri"] == f"oci+native://{pushed['weights-hf']}"
    assert (
        model["modelFormat"]["name"] == "huggingface" in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    )
    (c,) = runtime["spec"]["containers"]
    env = {e["name"]: e for e in c["env"]}
    assert c["image"] == pushed["vllm-engine"] and env["LLM_MODEL_PATH"]["value"] == "/mnt/models/model"
    assert env["SERVED_MODEL_NAME"]["value"] == "tiny" and "LLM_LORA_MODULES" not in env
    assert "secretKeyRef" in env["VLLM_API_KEY"]["valueFrom"]


def test_rank_comes_from_the_adapters_folders(tmp_path):
    for name, r in (("sql", 8), ("chat", 24)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({"r": r}))
    spec = BuildSpec(adapters={n: str(tmp_path / n) for n in ("sql", "chat")}, backends=[VLLM])
    c = container(docs(render(spec), "image-volume/vllm")["Deployment"])
    assert env_of(c)["LLM_MAX_LORA_RANK"]["value"] == "32"  # vLLM's smallest allowed rank holding 24
