"""builder push without a registry: which images, digest verification, failures name the image."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from _gguf_file import write_gguf
from _oci_server import registry_server

from builder.errors import BuilderError
from builder.image import artifacts
from builder.image import registry as oci
from builder.image.push import manifest_layers, push, pushed_file
from builder.spec import BuildSpec

DIGEST = "sha256:" + "a" * 64


class FakeDocker:
    """Records calls; `local` images exist; pushes of `broken` fail; the registry serves `served`."""

    def __init__(self, local, broken=(), served=DIGEST):
        # local: image refs, or {ref: its creation time}
        self.local = dict(local) if isinstance(local, dict) else dict.fromkeys(local, "2026-12-05T10:00:00.123456789Z")
        self.broken, self.served, self.calls = set(broken), served, []

    def require_engine(self):
        pass

    def run(self, *args, check=True, env=None):
        self.calls.append(args)
        if args[:2] == ("image", "inspect"):
            ref = args[-1]
            return subprocess.CompletedProcess(args, 0 if ref in self.local else 1, self.local.get(ref, ""), "")
        if args[0] == "tag":
            self.local[args[2]] = self.local[args[1]]
            return subprocess.CompletedProcess(args, 0, "", "")
        if args[:2] == ("manifest", "inspect"):
            assert env == {"DOCKER_CLI_EXPERIMENTAL": "enabled"}
            layers = [{"digest": "sha256:" + "b" * 64, "size": 1234}, {"digest": "sha256:" + "c" * 64, "size": 32}]
            manifest = {"Descriptor": {"digest": self.served}, "SchemaV2Manifest": {"layers": layers}}
            return subprocess.CompletedProcess(args, 0, json.dumps(manifest), "")
        raise AssertionError(args)

    def push(self, ref):
        if ref in self.broken:
            raise BuilderError(f"pushing {ref} failed: denied")
        return DIGEST


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """push records digests under ./build: keep them out of the checkout."""
    monkeypatch.chdir(tmp_path)


def test_pushes_built_images_tagging_them_for_the_registry(capsys):
    spec = BuildSpec(registry="127.0.0.1:5000", tag="t")
    docker = FakeDocker(local={"llm-chatglmcpp:t", "llm-xinference:t"})
    pushed = push(spec, docker)
    assert pushed == {"127.0.0.1:5000/llm-chatglmcpp:t": DIGEST, "127.0.0.1:5000/llm-xinference:t": DIGEST}
    assert ("tag", "llm-chatglmcpp:t", "127.0.0.1:5000/llm-chatglmcpp:t") in docker.calls
    assert f"127.0.0.1:5000/llm-xinference:t@{DIGEST}" in capsys.readouterr().out
    # recorded for `builder k8s`, which pins the manifests' images by these digests
    assert json.loads(pushed_file(spec).read_text()) == {
        "chatglmcpp": f"127.0.0.1:5000/llm-chatglmcpp:t@{DIGEST}",
        "xinference": f"127.0.0.1:5000/llm-xinference:t@{DIGEST}",
    }


def test_failed_push_names_the_image():
    spec = BuildSpec(registry="r.example:5000")
    docker = FakeDocker(
        local={"llm-vllm:latest", "llm-chatglmcpp:latest"}, broken={"r.example:5000/llm-chatglmcpp:latest"}
    )
    with pytest.raises(BuilderError, match="llm-chatglmcpp"):
        push(spec, docker)


def test_digest_mismatch_is_an_error():
    docker = FakeDocker(local={"llm-vllm:latest"}, served="sha256:" + "b" * 64)
    with pytest.raises(BuilderError, match="registry serves"):
        push(BuildSpec(registry="r.example"), docker)


def test_needs_a_registry_and_a_built_image():
    with pytest.raises(BuilderError, match="REGISTRY"):
        push(BuildSpec(), FakeDocker(local=()))
    with pytest.raises(BuilderError, match="make image first"):
        push(BuildSpec(registry="r.example"), FakeDocker(local=()))


def test_manifest_layers_are_read_back_from_the_registry():
    assert manifest_layers(FakeDocker(()), "r:5000/x:1") == {"sha256:" + "b" * 64: 1234, "sha256:" + "c" * 64: 32}


def test_a_registry_tag_left_by_an_earlier_push_never_shadows_a_newer_build():
    """`make image` then `make push`, twice: the second push must send the second build, not re-push the image
    the first push tagged for the registry (seen in the e2e: an old Xinference image went out again)."""
    old, new = "2026-12-05T10:00:00Z", "2026-12-05T11:30:00.5Z"
    docker = FakeDocker(local={"llm-xinference:t": new, "r:5000/llm-xinference:t": old})
    push(BuildSpec(registry="r:5000", tag="t"), docker)
    assert ("tag", "llm-xinference:t", "r:5000/llm-xinference:t") in docker.calls
    # built with REGISTRY set (tagged for the registry by the build), an older plain tag is not pushed over it
    docker = FakeDocker(local={"llm-xinference:t": old, "r:5000/llm-xinference:t": new})
    push(BuildSpec(registry="r:5000", tag="t"), docker)
    assert not any(call[0] == "tag" for call in docker.calls)


class WeightsDocker(FakeDocker):
    """Also the weights and adapter images' files: `docker create` + `docker cp` copy out real GGUFs."""

    def __init__(self, local, files):
        super().__init__(local)
        self.files, self.containers = files, {}  # {(image, path): source file}, {container id: image}

    def inspect(self, ref):
        return {"Created": self.local[ref]}

    def run(self, *args, check=True, env=None):
        if args[0] == "create":
            self.calls.append(args)
            cid = f"c{len(self.containers)}"
            self.containers[cid] = args[1]
            return subprocess.CompletedProcess(args, 0, cid + "\n", "")
        if args[0] == "cp":
            self.calls.append(args)
            cid, path = args[1].split(":", 1)
            image, dest = self.containers[cid], Path(args[2])
            found = {p: s for (i, p), s in self.files.items() if i == image and (p == path or p.startswith(path + "/"))}
            assert found, f"{path} is not in {image}"  # `docker cp` fails, which push_mounted does not expect
            for inside, source in found.items():  # a file to dest, a folder's files under dest
                target = dest if inside == path else dest / inside[len(path) + 1 :]
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)
            return subprocess.CompletedProcess(args, 0, "", "")
        if args[0] == "rm":
            self.calls.append(args)
            del self.containers[args[1]]
            return subprocess.CompletedProcess(args, 0, "", "")
        return super().run(*args, check=check, env=env)


def test_mounted_weights_images_and_model_artifacts_are_pushed_and_recorded(tmp_path):
    gguf, lora = write_gguf(tmp_path / "base.gguf"), write_gguf(tmp_path / "lora.gguf", lora=True)
    with registry_server() as (host, state):
        spec = BuildSpec(registry=host, tag="t", adapters={"tuned": str(tmp_path)}, backends=["llamacpp"])
        engine = spec.engine_image("llamacpp").split("/", 1)[1]
        local = {"llm-llamacpp:t", engine, "llm-weights:t", "llm-lora:t-tuned"}
        files = {(f"{host}/llm-weights:t", "/models/model.gguf"): gguf,
                 (f"{host}/llm-lora:t-tuned", "/models/lora/tuned.gguf"): lora}  # fmt: skip
        docker = WeightsDocker(local, files)
        pushed = push(spec, docker)
        manifests = {key[1] for key in state.manifests if not key[1].startswith("sha256:")}
    images = [f"{host}/llm-llamacpp:t", f"{host}/{engine}", f"{host}/llm-weights:t", f"{host}/llm-lora:t-tuned"]
    model_artifacts = [f"{host}/llm-model:t", f"{host}/llm-model:t-tuned", f"{host}/llm-model:t-modelpack"]
    assert list(pushed) == images + model_artifacts
    assert all(pushed[ref] == DIGEST for ref in images)  # what `docker push` reported and the registry serves
    assert all(ref in docker.local for ref in images)  # each tagged for the registry, then pushed
    assert manifests == {"t", "t-tuned", "t-modelpack"}
    assert state.blobs[oci.sha256_file(gguf)] == gguf.read_bytes()
    assert state.blobs[oci.sha256_file(lora)] == lora.read_bytes()
    assert not docker.containers  # every container made to copy a file out is removed
    assert not list(Path("build/llm").glob(".artifact-*"))  # nor any copied file left behind
    recorded = json.loads(pushed_file(spec).read_text())
    assert recorded == {
        "llamacpp": f"{host}/llm-llamacpp:t@{DIGEST}",
        "llamacpp-engine": f"{host}/{engine}@{DIGEST}",
        "weights": f"{host}/llm-weights:t@{DIGEST}",
        "lora:tuned": f"{host}/llm-lora:t-tuned@{DIGEST}",
        **{f"model:{ref.rsplit(':', 1)[1]}": f"{ref}@{pushed[ref]}" for ref in model_artifacts},
    }


def test_without_a_weights_image_no_artifact_is_pushed(tmp_path, capsys):
    spec = BuildSpec(registry="r.example:5000", tag="t", backends=["llamacpp"])
    docker = WeightsDocker({"llm-llamacpp:t"}, {})
    assert list(push(spec, docker)) == ["r.example:5000/llm-llamacpp:t"]
    err = capsys.readouterr().err
    assert "not built" in err and "llm-weights:t" in err
    assert json.loads(pushed_file(spec).read_text()).keys() == {"llamacpp"}


def test_a_vision_models_mmproj_travels_in_every_model_artifact(tmp_path):
    """The weights image of a vision-language build holds /models/mmproj.gguf beside the GGUF: each Docker model
    artifact carries it as an mmproj layer (what Docker Model Runner passes to --mmproj), ModelPack as a weight."""
    gguf, mmproj = write_gguf(tmp_path / "base.gguf"), write_gguf(tmp_path / "mmproj.gguf", arch="clip")
    with registry_server() as (host, state):
        spec = BuildSpec(registry=host, tag="t", backends=["llamacpp"])
        engine = spec.engine_image("llamacpp").split("/", 1)[1]
        files = {(f"{host}/llm-weights:t", "/models/model.gguf"): gguf,
                 (f"{host}/llm-weights:t", "/models/mmproj.gguf"): mmproj}  # fmt: skip
        pushed = push(spec, WeightsDocker({"llm-llamacpp:t", engine, "llm-weights:t"}, files))
        layers = {tag: json.loads(state.manifests[("llm-model", tag)][0])["layers"] for tag in ("t", "t-modelpack")}
    assert f"{host}/llm-model:t" in pushed
    assert state.blobs[oci.sha256_file(mmproj)] == mmproj.read_bytes()
    kinds = {tag: [(x["mediaType"], x["annotations"][artifacts.TITLE]) for x in found] for tag, found in layers.items()}
    assert kinds["t"] == [(artifacts.GGUF, "model.gguf"), (artifacts.MMPROJ, "mmproj.gguf")]
    assert kinds["t-modelpack"] == [
        (artifacts.MODELPACK_WEIGHT, "model.gguf"),
        (artifacts.MODELPACK_WEIGHT, "mmproj.gguf"),
    ]
