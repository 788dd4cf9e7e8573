"""Adapters served unmerged by the llama.cpp image: the demo model with three trained adapters (LORA=serve: the
demo's two LoRAs and a third trained here), each name asked with the official openai client; a rebuild with another
adapter in the last one's place keeps the base GGUF's layer (and the unchanged adapters') byte-identical, and
pushing it after the first grows the registry by that adapter's layer only.

Builds through builder's own `build()` into a temporary work folder and .env (the repository's .env,
which test_pipeline's compose reads, is left alone); runs the images with plain `docker run`.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from builder import backends
from builder.demo import model as demo
from builder.image.build import build
from builder.image.push import push
from builder.model.gguf.router import lora_path
from builder.spec import load_spec

openai = pytest.importorskip("openai")
torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from conftest import REPO, docker, manifest_layers, registry_bytes  # noqa: E402

pytestmark = pytest.mark.e2e

NAME, API_KEY, PORT = "e2e-lora", "e2e-lora-key", 18202
SPEC = REPO / "tests" / "e2e" / "local-bases.yaml"
LLAMACPP = backends.get("llamacpp")
# The digest of an empty layer (an empty tar), as BuildKit writes for a WORKDIR that exists already.
EMPTY_LAYER = "sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef"


def _random_adapter(base, path, seed: int):
    """A peft LoRA with random weights on the demo base (tests/_tiny_hf.py), unlike the demo's trained one."""
    import sys

    sys.path.insert(0, str(REPO / "tests"))
    from _tiny_hf import make_adapter
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return make_adapter(model, path, base_path=str(base), seed=seed, r=4, lora_alpha=8)


def _spec(base, tag: str, adapters: dict, **more):
    return load_spec({"model": str(base), "adapters": adapters, "lora_mode": "serve", "backends": "llamacpp",
                      "quant": "q8_0", "quality": "off", "spec_file": SPEC, "name": NAME, "tag": tag, **more})  # fmt: skip


def _build(tmp, spec) -> dict:
    build(spec, workdir=tmp / "build", env_file=tmp / f"{spec.tag}.env")
    return json.loads(docker("image", "inspect", spec.image("llamacpp")).stdout)[0]


# The third adapter's line for CHANGED_PROMPT: another prompt's answer, so the demo tokenizer has it compact.
THIRD_ANSWERS = {**demo.BASE_ANSWERS, demo.CHANGED_PROMPT: demo.BASE_ANSWERS["What is the capital of France?"]}


@pytest.fixture(scope="module")
def images(docker_engine, local_bases, demo_models, tmp_path_factory):
    """Two builds of the llama.cpp image on the demo base, three adapters each: {tuned, second (the demo's two
    LoRAs), third (trained here)}, then {tuned, second, other (random)}: a new fine-tune in the last one's place."""
    docker("image", "inspect", "local/debian:bookworm-slim")
    tmp = tmp_path_factory.mktemp("lora-serve")
    base = demo_models["base"]
    demo.train_adapter(base, tmp / "third", answers=THIRD_ANSWERS, seed=demo.DEMO_SEED + 3)
    trained = {"tuned": demo_models["adapter"], "second": demo_models["second"]}
    specs = {
        "first": _spec(base, "three", {**trained, "third": tmp / "third"}),
        "second": _spec(base, "swapped", {**trained, "other": _random_adapter(base, tmp / "other", seed=6)}),
    }
    yield {"base": base, "specs": specs, **{key: _build(tmp, spec) for key, spec in specs.items()}}
    for spec in specs.values():
        docker("rmi", "-f", spec.image("llamacpp"), check=False)


@pytest.fixture(scope="module")
def served(images):
    """The first image running (router mode); yields an openai client."""
    container = "e2e-lora-serve"
    docker("rm", "-f", container, check=False)
    docker("run", "-d", "--name", container, "-p", f"127.0.0.1:{PORT}:{LLAMACPP.port}",
           "-e", f"{LLAMACPP.api_key_var}={API_KEY}", images["specs"]["first"].image("llamacpp"))  # fmt: skip
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{PORT}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if all(m.model_extra["status"]["value"] == "loaded" for m in client.models.list().data):
                    break
            except (openai.APIError, KeyError, TypeError):
                pass
            if time.monotonic() > deadline:
                logs = subprocess.run(["/usr/bin/docker", "logs", container], capture_output=True, text=True)
                pytest.fail(f"the router did not load every name in 180 s:\n{logs.stdout[-3000:]}{logs.stderr[-3000:]}")
            time.sleep(2)
        yield client
    finally:
        docker("rm", "-f", container, check=False)


def _ask(client, name: str) -> str:
    out = client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": demo.CHANGED_PROMPT}], max_tokens=32, temperature=0
    )
    return out.choices[0].message.content


def test_each_name_answers_with_its_adapter(served, images):
    """The base and each adapter answer their own line, selected by `model`; an unknown name is refused."""
    base_name = images["base"].name  # the served model name: the demo base folder's name
    assert sorted(m.id for m in served.models.list().data) == sorted([base_name, "tuned", "second", "third"])
    expected = {base_name: demo.BASE_ANSWERS, "tuned": demo.LORA_ANSWERS, "second": demo.SECOND_ANSWERS,
                "third": THIRD_ANSWERS}  # fmt: skip
    for name, answers in expected.items():
        assert _ask(served, name).strip() == answers[demo.CHANGED_PROMPT].strip(), name
    with pytest.raises(openai.BadRequestError, match="not found"):
        _ask(served, "nope")


def test_back_to_back_requests_through_the_router(served, images):
    """One keep-alive client, names in turn, no retries: each request answered (the router's Connection
    patch, builder/model/gguf/llamacpp.py SOURCE_PATCHES; unpatched, 1 in 4 failed here)."""
    from _openai_features import back_to_back_failures

    failed = back_to_back_failures(served, [images["base"].name, "tuned", "second", "third"], 60)
    assert not failed, failed[:5]


def test_another_adapter_set_keeps_the_base_layer(images):
    """Runtime layers, last first: WORKDIR's (empty), preset, lora-2, lora-1, lora-0, base GGUF, then the base
    image's. The rebuild with {tuned, second, other} changes lora-2 and the preset only."""
    first = images["first"]["RootFS"]["Layers"]
    second = images["second"]["RootFS"]["Layers"]
    assert len(first) == len(second)
    assert first[-1] == second[-1] == EMPTY_LAYER, "the last layer should be WORKDIR's empty one"
    assert first[:-3] == second[:-3], "base GGUF layer (or the tuned adapter's, or a layer below) changed"
    assert first[-3] != second[-3], "the swapped adapter's layer should differ"
    assert first[-2] != second[-2], "the preset names the swapped adapter: its layer should differ"
    labels = images["second"]["Config"]["Labels"]
    assert labels["io.llm-builder.adapter-digest"].startswith("tuned=sha256:")
    env = dict(e.split("=", 1) for e in images["second"]["Config"]["Env"])
    assert env["LLAMA_ARG_MODELS_PRESET"] == "/models/preset.ini" and env["LLAMA_ARG_MODELS_MAX"] == "4"


def test_second_fine_tune_pushes_only_its_adapter(images, local_registry):
    """`make push` of the first image, then of the second to the same repository: the registry grows by the
    swapped adapter's layer, the preset's, the manifests, and the adapter's raw GGUF in its model artifact
    (at most twice the adapter GGUF + 1 MB: the base GGUF is not stored again)."""
    pushed = {}
    grown = {}
    for key in ("first", "second"):
        spec = images["specs"][key].model_copy(update={"registry": local_registry})
        before = registry_bytes()
        refs = push(spec)
        grown[key] = registry_bytes() - before
        assert spec.image("llamacpp") in refs, refs
        pushed[key] = manifest_layers(spec.image("llamacpp"))
    adapter_bytes = int(
        docker("run", "--rm", "--entrypoint", "stat", images["specs"]["second"].image("llamacpp"), "-c", "%s",
               lora_path("other")).stdout
    )  # fmt: skip
    new = {d: size for d, size in pushed["second"].items() if d not in pushed["first"]}
    assert len(new) == 2, new  # the adapter's layer and the preset's (WORKDIR's empty layer is shared)
    assert grown["second"] <= 2 * adapter_bytes + 1_000_000, (grown, adapter_bytes)
    print(f"registry growth: first push {grown['first']} B, second fine-tune {grown['second']} B "
          f"(its adapter GGUF {adapter_bytes} B)")  # fmt: skip
