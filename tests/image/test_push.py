"""builder push without a registry: which images, digest verification, failures name the image."""

import json
import subprocess

import pytest

from builder.errors import BuilderError
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
