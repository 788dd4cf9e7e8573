"""Xinference's engine image (its llama.cpp flavour without weights) over llama.cpp's GGUF weights image: the
Dockerfile targets, the names (the weights image is llama.cpp's own), what `make push` pushes and records, and
the Hugging Face folder flavour staying baked-only. Built and served in Docker by tests/e2e/test_pipeline.py."""

from __future__ import annotations

import json

from _gguf_file import write_gguf
from _oci_server import registry_server
from test_build import _env, _layers, _stage
from test_push import DIGEST, FakeDocker, WeightsDocker

from builder import backends
from builder.image import push
from builder.image import registry as oci
from builder.image.build import mounted_targets
from builder.image.render import render_text
from builder.selection import Selection
from builder.spec import BuildSpec

XI = "xinference"
TAG = "4.1.0-xllamacpp-2026.10.11549"


def test_engine_and_weights_targets_hold_the_runtime_layers():
    spec = BuildSpec(backends=[XI], name="m", tag="t")
    targets = mounted_targets(spec, XI, Selection([XI]))
    assert targets == {"engine": f"xinference-engine:{TAG}", "weights": "m-weights:t"}
    text = render_text(spec, Selection([XI]))["Dockerfile.xinference"]
    runtime, engine, weights = _stage(text, "runtime"), _stage(text, "engine"), _stage(text, "weights")
    assert "FROM ${XINFERENCE_BASE} AS engine\n" in text and "FROM ${XINFERENCE_BASE} AS runtime\n" in text
    # same base, same instructions: the engine's layers are the runtime's bottom layers
    assert _layers(engine) and _layers(runtime)[: len(_layers(engine))] == _layers(engine)
    # above them the runtime has the GGUF (the weights image's one COPY) and the registration's small files
    assert _layers(runtime)[len(_layers(engine)) :] == ["COPY --from=gguf /w/ /", "COPY --from=gguf-meta /w/ /"]
    assert weights == ["COPY --from=gguf /w/ /"] and "FROM scratch AS weights\n" in text
    # the same instruction as llama.cpp's weights image: one layer digest for both
    llamacpp = render_text(BuildSpec(backends=["llamacpp"], name="m", tag="t"), Selection(["llamacpp"]))
    assert _stage(llamacpp["Dockerfile.llamacpp"], "weights") == weights
    assert "XINFERENCE_MODEL_PATH=/models " in _env(engine) and "XINFERENCE_ENGINE=llama.cpp" in _env(engine)
    # the served name: the build's in the runtime, a run-time setting of the engine (default `model`)
    assert "SERVED_MODEL_NAME=${SERVED_MODEL_NAME}" in _env(runtime) and "SERVED_MODEL_NAME=model" in _env(engine)
    assert "XINFERENCE_QUANTIZATION=${QUANT}" in _env(engine) and "ARG QUANT=q4_k_m" in engine
    assert not [i for i in engine if i.startswith("ARG ") and not i.startswith(("ARG QUANT", "ARG XLLAMACPP"))]
    assert runtime[-1] == engine[-1] == 'ENTRYPOINT ["python3", "-m", "builder.runtime.xinference"]'
    assert f'org.opencontainers.image.version="{TAG}"' in " ".join(engine)


def test_engine_tag_follows_the_xinference_base():
    spec = BuildSpec(backends=[XI], base_images={"xinference": "local/xinference:latest"})
    assert spec.engine_image(XI) == "xinference-engine:latest-xllamacpp-2026.10.11549"
    assert BuildSpec(registry="r:5000/x").engine_image(XI) == f"r:5000/x/xinference-engine:{TAG}"


def test_the_hugging_face_folder_flavour_stays_baked_only():
    spec = BuildSpec(backends=[XI], xinference_engine="transformers")
    assert not backends.get(XI).mounts_weights(spec) and backends.get(XI).mounts_weights(BuildSpec(backends=[XI]))
    text = render_text(spec, Selection([XI]))["Dockerfile.xinference"]
    assert " AS engine\n" not in text and " AS weights\n" not in text
    docker = FakeDocker({"llm-xinference:latest"})
    assert list(push.push(spec.model_copy(update={"registry": "r:5000"}), docker)) == ["r:5000/llm-xinference:latest"]


def test_the_weights_image_and_its_record_are_llamacpps():
    spec = BuildSpec(backends=[XI, "llamacpp"], name="m", tag="t", registry="r:5000/x")
    assert spec.weights_image(XI) == spec.weights_image("llamacpp") == "r:5000/x/m-weights:t"
    assert push.weights_key(XI) == push.weights_key("llamacpp") == "weights"


def test_push_records_the_engine_and_weights_images_and_the_gguf_artifacts(tmp_path, monkeypatch):
    gguf = write_gguf(tmp_path / "base.gguf")
    monkeypatch.chdir(tmp_path)
    with registry_server() as (host, state):
        spec = BuildSpec(registry=host, tag="t", backends=[XI])
        docker = WeightsDocker({"llm-xinference:t", f"xinference-engine:{TAG}", "llm-weights:t"},
                               {(f"{host}/llm-weights:t", "/models/model.gguf"): gguf})  # fmt: skip
        pushed = push.push(spec, docker)
    images = [f"{host}/{ref}" for ref in ("llm-xinference:t", f"xinference-engine:{TAG}", "llm-weights:t")]
    # the weights image is llama.cpp's, so are the model artifacts made from its GGUF
    artifacts = [f"{host}/llm-model:t", f"{host}/llm-model:t-modelpack"]
    assert list(pushed) == images + artifacts
    assert state.blobs[oci.sha256_file(gguf)] == gguf.read_bytes()
    recorded = json.loads(push.pushed_file(spec).read_text())
    assert recorded == {
        XI: f"{images[0]}@{DIGEST}", "xinference-engine": f"{images[1]}@{DIGEST}", "weights": f"{images[2]}@{DIGEST}",
        **{f"model:{ref.rsplit(':', 1)[1]}": f"{ref}@{pushed[ref]}" for ref in artifacts},
    }  # fmt: skip
