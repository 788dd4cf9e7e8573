"""The real thing: `make image` from the demo model + LoRA, compose up, ask, push, pull, crash.

Local base images stand in for the public ones (nothing can be pulled here); everything else is
what a user runs. Module-scoped: one build, many checks.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import manifest_layers, registry_bytes, smoke_argv

from builder import backends
from builder.demo import model as demo
from builder.image.build import read_env
from builder.runtime.smoke import chat, run_smoke
from builder.spec import BuildSpec

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.e2e

NAME, TAG = "e2e", "test"
API_KEY = "e2e-key-123"
BACKENDS = ["chatglmcpp", "llamacpp", "xinference"]  # xinference: its default llama.cpp engine, on the GGUF
PORTS = {"chatglmcpp": 18001, "llamacpp": 18002, "xinference": 19997}
SPEC = REPO / "tests" / "e2e" / "local-bases.yaml"
TIMINGS: dict[str, float] = {}
BUILD_OUTPUT: dict[str, str] = {}  # what the first `make image` printed (stdout + stderr)


def docker(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    res = subprocess.run(
        ["/usr/bin/docker", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "DOCKER_BUILDKIT": "1"},
    )
    if check:
        assert res.returncode == 0, f"docker {' '.join(args)}: {res.stdout[-3000:]}{res.stderr[-3000:]}"
    return res


def _make(*args: str, env: dict | None = None, timeout: float = 3000) -> subprocess.CompletedProcess:
    res = subprocess.run(
        ["make", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )
    assert res.returncode == 0, f"make {' '.join(args)} failed:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    return res


def _compose(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    res = subprocess.run(
        ["/usr/bin/docker", "compose", "--project-directory", str(REPO), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        assert res.returncode == 0, res.stdout + res.stderr
    return res


def _image(backend: str) -> str:
    return f"{NAME}-{backend}:{TAG}"


@pytest.fixture(scope="module")
def built(docker_engine, local_bases, demo_models):
    assert {"python", "xinference"} <= set(local_bases), local_bases
    docker("image", "inspect", "local/debian:bookworm-slim")  # the llama.cpp runtime's stand-in base
    start = time.monotonic()
    res = _make(
        "image",
        f"MODEL={demo_models['base']}",
        f"ADAPTER={demo_models['adapter']}",
        "LORA=merge",  # this module checks the merged images; test_lora_serve.py the unmerged llama.cpp one
        f"BACKEND={','.join(BACKENDS)}",
        "QUANT=q8_0",
        f"SPEC={SPEC}",
        f"NAME={NAME}",
        f"TAG={TAG}",
        env={"API_KEY": API_KEY},
    )
    TIMINGS["first build"] = time.monotonic() - start
    BUILD_OUTPUT["image"] = res.stdout + res.stderr
    env = (REPO / ".env").read_text()
    for key, value in [("COMPOSE_PROFILES", ",".join(BACKENDS)), ("API_KEY", API_KEY)]:
        assert f"{key}={value}\n" in env
    # publish on test ports, so a developer's own services are not disturbed
    with (REPO / ".env").open("a") as f:
        for backend, port in PORTS.items():
            f.write(f"{backend.upper()}_PORT={port}\n")
    yield demo_models
    _compose("down", "-v", "--remove-orphans", check=False)


@pytest.fixture(scope="module")
def up(built):
    start = time.monotonic()
    _compose("up", "-d", "--wait", "--wait-timeout", "600", timeout=700)
    TIMINGS["compose up --wait"] = time.monotonic() - start
    return built


def _url(backend: str) -> str:
    return f"http://127.0.0.1:{PORTS[backend]}"


def _smoke_skip(backend: str) -> frozenset[str]:
    """What `make image` wrote to .env: Xinference on its llama.cpp engine skips nothing."""
    return frozenset(filter(None, read_env(REPO / ".env")[f"{backend.upper()}_SMOKE_SKIP"].split(",")))


def _served_name(demo_models) -> str:
    return demo_models["base"].name


@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_answer_from_every_backend(up, backend):
    answer = chat(
        _url(backend),
        _served_name(up),
        [{"role": "user", "content": demo.CHANGED_PROMPT}],
        api_key=API_KEY,
        max_tokens=32,
        temperature=0,
    )
    assert answer.strip() == demo.LORA_ANSWERS[demo.CHANGED_PROMPT].strip()


@pytest.mark.parametrize("backend", BACKENDS)
def test_smoke_and_health(up, backend):
    assert run_smoke(url=_url(backend), model=_served_name(up), api_key=API_KEY, timeout=120, skip=_smoke_skip(backend))
    state = docker("inspect", "-f", "{{.State.Health.Status}}", _container(backend)).stdout.strip()
    assert state == "healthy"


def test_api_key_is_enforced(up):
    import urllib.error
    import urllib.request

    body = json.dumps({"model": "x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).encode()
    for backend in BACKENDS:  # a POST: llama-server lists /v1/models without a key, like its /health
        req = urllib.request.Request(
            f"{_url(backend)}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
        )
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=30)
        assert err.value.code in (401, 403)


def test_labels_and_runtime_contents(up, demo_models):
    info = json.loads(docker("image", "inspect", _image("chatglmcpp")).stdout)[0]
    labels = info["Config"]["Labels"]
    assert labels["io.llm-builder.quantization"] == "q8_0"
    assert labels["io.llm-builder.base-model"] == demo_models["base"].name
    assert labels["io.llm-builder.adapter-digest"].startswith("sha256:")
    assert labels["io.llm-builder.builder-version"]
    assert labels["org.opencontainers.image.title"]
    assert info["Config"]["User"] == "10001:10001"
    # no compiler and no torch in the chatglm.cpp runtime; only the runtime tier of builder's code,
    # and none of the build-side libraries (jinja2, pyyaml, rich; click stays: uvicorn needs it)
    probe = docker(
        "run",
        "--rm",
        "--entrypoint",
        "sh",
        _image("chatglmcpp"),
        "-c",
        "command -v gcc g++ cc || true; python3 -c 'import torch' 2>&1 || true; "
        "find /opt/app -name '*.py' | sort; "
        'for m in jinja2 yaml rich; do python3 -c "import $m" 2>/dev/null && echo has-$m; done; true',
    ).stdout
    assert "gcc" not in probe and "No module named 'torch'" in probe
    shipped = [line for line in probe.splitlines() if line.startswith("/opt/app/")]
    assert "/opt/app/builder/runtime/chatglmcpp/engine.py" in shipped, probe
    assert not [
        p
        for p in shipped
        if not p.startswith(("/opt/app/builder/runtime/", "/opt/app/builder/__init__.py", "/opt/app/builder/files.py"))
    ]
    assert "has-" not in probe, probe


def test_quality_step_report_label_and_table(built):
    """QUALITY=auto (the default) measured both GGUF images of the tiny local demo model against its f16/bf16
    reference: build/NAME/quality.json, the io.llm-builder.quality label, the table and the cost in the output."""
    report = json.loads((REPO / "build" / NAME / "quality.json").read_text())
    assert [e["backend"] for e in report] == ["llamacpp", "xinference"], report
    for e in report:
        assert e["quant"] == "q8_0" and e["reference"].startswith("reference-"), e
        assert e["tool_version"].startswith("llama.cpp ") and e["size_bytes"] > 0 and e["eval_total"] == 6, e
        assert 0 < e["top1_agreement"] <= 1 and e["kl_mean"] >= 0 and e["ppl_ratio"] > 0, e
    for backend in ("llamacpp", "xinference"):
        label = json.loads(docker("image", "inspect", _image(backend)).stdout)[0]["Config"]["Labels"]
        assert label["io.llm-builder.quality"].startswith("q8_0: KL "), label
        assert " top-1 " in label["io.llm-builder.quality"] and "(vs reference-" in label["io.llm-builder.quality"]
    chatglm = json.loads(docker("image", "inspect", _image("chatglmcpp")).stdout)[0]["Config"]["Labels"]
    assert chatglm["io.llm-builder.quality"] == ""  # GGML: llama.cpp's tools read GGUF only
    out = BUILD_OUTPUT["image"]
    assert "quality step: llamacpp, xinference (QUALITY=auto" in out, out[-3000:]
    assert "quality vs reference-" in out and "decode tok/s" in out and "top-1" in out, out[-3000:]
    assert "quality step: " in out and " s in all (reference " in out and "peak RSS" in out, out[-3000:]


def test_serves_offline(up, demo_models):
    """Each runtime answers with no network at all (asked from inside the container's network namespace:
    the llama.cpp runtime has no Python, so a Python sidecar joins its namespace and asks)."""
    for backend in BACKENDS:
        name = f"e2e-offline-{backend}"
        docker("rm", "-f", name, check=False)
        docker(
            "run",
            "-d",
            "--name",
            name,
            "--network",
            "none",
            "-e",
            f"API_KEY={API_KEY}",
            "-e",
            f"LLAMA_API_KEY={API_KEY}",
            "-e",
            f"XINFERENCE_API_KEY={API_KEY}",
            _image(backend),
        )
        try:
            b = backends.get(backend)
            cmd = smoke_argv(name, b.port, _served_name(demo_models), API_KEY, _smoke_skip(backend))
            deadline = time.monotonic() + 300
            while True:
                res = docker(*cmd, check=False)
                if res.returncode == 0:
                    break
                assert time.monotonic() < deadline, res.stdout + res.stderr
                time.sleep(5)
        finally:
            docker("rm", "-f", name, check=False)


def _container(backend: str) -> str:
    return _compose("ps", "-q", backend).stdout.strip()


def test_crashed_backend_restarts(up, demo_models):
    """Kill the server process from the host, as a fault would: restart: unless-stopped revives it."""
    backend = "chatglmcpp"
    cid = _container(backend)
    restarts = int(docker("inspect", "-f", "{{.RestartCount}}", cid).stdout)
    init_pid = docker("inspect", "-f", "{{.State.Pid}}", cid).stdout.strip()
    children = subprocess.run(["pgrep", "-P", init_pid], capture_output=True, text=True).stdout.split()
    server_pid = children[0] if children else init_pid
    subprocess.run(["kill", "-9", server_pid], check=True)
    deadline = time.monotonic() + 120
    while True:
        state = docker("inspect", "-f", "{{.RestartCount}} {{.State.Health.Status}}", cid).stdout.split()
        if int(state[0]) > restarts and state[1] == "healthy":
            break
        assert time.monotonic() < deadline, state
        time.sleep(2)
    answer = chat(
        _url(backend),
        _served_name(demo_models),
        [{"role": "user", "content": demo.CHANGED_PROMPT}],
        api_key=API_KEY,
        max_tokens=32,
        temperature=0,
    )
    assert answer.strip() == demo.LORA_ANSWERS[demo.CHANGED_PROMPT].strip()


def test_push_pull_by_digest(up, local_registry, demo_models):
    before = registry_bytes()
    res = _make("push", f"REGISTRY={local_registry}", f"NAME={NAME}", f"TAG={TAG}", f"SPEC={SPEC}")
    grown = registry_bytes() - before
    pushed = [line for line in res.stdout.splitlines() if "@sha256:" in line]
    # each backend's runtime; beside each its engine and weights images (Xinference's weights: llama.cpp's); the GGUF as model
    # artifacts
    refs = [r for r in pushed if any(r.startswith(f"{local_registry}/{NAME}-{b}:") for b in BACKENDS)]
    assert len(refs) == len(BACKENDS), res.stdout
    artifacts = [r for r in pushed if r.startswith(f"{local_registry}/{NAME}-model:")]
    assert artifacts, res.stdout
    # llama.cpp and Xinference carry the same GGUF: one blob in both manifests, stored once.
    layers = {b: manifest_layers(next(r for r in refs if f"-{b}:" in r).split("@")[0]) for b in BACKENDS}
    shared = [d for d in set(layers["llamacpp"]) & set(layers["xinference"]) if layers["llamacpp"][d] > 1024]
    gguf_bytes = int(
        docker("run", "--rm", "--entrypoint", "stat", _image("llamacpp"), "-c", "%s", "/models/model.gguf").stdout
    )
    assert [layers["llamacpp"][d] > gguf_bytes / 2 for d in shared] == [True], (shared, gguf_bytes)
    # the engine and weights images share the runtime's layers; the model artifacts hold one raw copy of the GGUF
    images = [r.split("@")[0] for r in pushed if r not in artifacts]
    unique = {d: size for ref in images for d, size in manifest_layers(ref).items()}
    budget = sum(unique.values()) + gguf_bytes + 1_000_000
    assert grown <= budget, f"the registry grew {grown} bytes for {len(unique)} layers and one raw GGUF"
    for backend, host_port in (("chatglmcpp", 18101), ("llamacpp", 18102)):
        ref = next(r for r in refs if f"-{backend}:" in r)
        repo_tag, digest = ref.split("@")
        # delete every local copy, pull back by digest, run, same answer
        docker("rmi", "-f", repo_tag, check=False)
        docker("pull", f"{repo_tag.rsplit(':', 1)[0]}@{digest}")
        name = f"e2e-pulled-{backend}"
        docker("rm", "-f", name, check=False)
        docker(
            "run", "-d", "--name", name, "-p", f"127.0.0.1:{host_port}:{backends.get(backend).port}",
            "-e", f"{backends.get(backend).api_key_var}={API_KEY}", f"{repo_tag.rsplit(':', 1)[0]}@{digest}",
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    answer = chat(
                        f"http://127.0.0.1:{host_port}",
                        _served_name(demo_models),
                        [{"role": "user", "content": demo.CHANGED_PROMPT}],
                        api_key=API_KEY,
                        max_tokens=32,
                        temperature=0,
                    )
                    break
                except Exception:
                    assert time.monotonic() < deadline
                    time.sleep(2)
            assert answer.strip() == demo.LORA_ANSWERS[demo.CHANGED_PROMPT].strip()
        finally:
            docker("rm", "-f", name, check=False)


def _layers(ref: str) -> list[str]:
    """The image's uncompressed layer digests (`docker image inspect` RootFS.Layers), bottom first."""
    return json.loads(docker("image", "inspect", ref).stdout)[0]["RootFS"]["Layers"]


def _ask_when_up(url: str, model: str, prompt: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return chat(url, model, prompt, api_key=API_KEY, max_tokens=32, temperature=0, timeout=30)
        except Exception:
            assert time.monotonic() < deadline, f"{url} did not answer in {timeout:.0f}s"
            time.sleep(1)


def test_chatglmcpp_engine_with_the_weights_image_mounted_answers_like_the_baked_image(built, demo_models):
    """`make image` also built chatglm.cpp's model-independent engine (`chatglmcpp-engine:VERSION`) and its FROM
    scratch weights image (`NAME-weights-ggml:TAG`): the weights image's one layer is the baked image's weights
    layer and the engine's layers are the baked image's others (uncompressed digests); the engine, with the weights
    in a named volume filled from the weights image and mounted read-only at /models, answers every demo prompt as
    the baked image does."""
    glm = "chatglmcpp"
    spec = BuildSpec(name=NAME, tag=TAG, backends=[glm])
    runtime, engine, weights = _layers(_image(glm)), _layers(spec.engine_image(glm)), _layers(spec.weights_image(glm))
    assert len(weights) == 1 and weights[0] in runtime, (runtime, weights)
    assert [d for d in runtime if d != weights[0]] == engine, (runtime, engine, weights)
    served = _served_name(demo_models)
    volume, port = f"{NAME}-weights-ggml", backends.get(glm).port
    containers = {f"{NAME}-glm-baked": (18201, _image(glm), []),
                  f"{NAME}-glm-engine": (18202, spec.engine_image(glm),
                                         ["-e", f"SERVED_MODEL_NAME={served}", "-v", f"{volume}:/models:ro"])}  # fmt: skip
    docker("volume", "rm", "-f", volume, check=False)
    docker("volume", "create", volume)
    # Docker copies an image's files into an empty named volume mounted on them when the container is created
    docker("rm", "-f", docker("create", "-v", f"{volume}:/models", spec.weights_image(glm), "none").stdout.strip())
    try:
        for name, (host_port, image, more) in containers.items():
            docker("rm", "-f", name, check=False)
            docker("run", "-d", "--name", name, "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL",
                   "-p", f"127.0.0.1:{host_port}:{port}", "-e", f"API_KEY={API_KEY}", *more, image)  # fmt: skip
        start = time.monotonic()
        for prompt in demo.DEMO_PROMPTS:
            baked = _ask_when_up("http://127.0.0.1:18201", served, prompt)
            assert _ask_when_up("http://127.0.0.1:18202", served, prompt) == baked, prompt
        TIMINGS["chatglmcpp engine (mounted weights): both up and every prompt"] = time.monotonic() - start
        changed = _ask_when_up("http://127.0.0.1:18202", served, demo.CHANGED_PROMPT)
        assert changed.strip() == demo.LORA_ANSWERS[demo.CHANGED_PROMPT].strip()  # the merged fine-tune's weights
    finally:
        for name in containers:
            docker("rm", "-f", name, check=False)
        docker("volume", "rm", "-f", volume, check=False)


def test_xinference_engine_with_llamacpps_weights_image_mounted_answers_like_the_baked_image(up, demo_models):
    """`make image` also built Xinference's model-independent engine (its llama.cpp flavour, `xinference-engine:PIN`)
    over llama.cpp's weights image `NAME-weights:TAG`: that image's one layer is the GGUF layer of both baked images,
    the engine's layers are the baked Xinference image's others but the registration's small files; the engine, with the GGUF alone in a named volume filled from the weights image, mounted read-only at
    /models (its registration read from the GGUF's metadata), answers every demo prompt as the baked image under
    compose does."""
    xi = "xinference"
    # the engine's tag names the Xinference base the build used (SPEC's local stand-in here)
    bases = {xi: yaml.safe_load(SPEC.read_text())["base_images"][xi]}
    spec = BuildSpec(name=NAME, tag=TAG, backends=[xi], base_images=bases)
    assert spec.weights_image(xi) == spec.weights_image("llamacpp")
    runtime, engine, weights = _layers(_image(xi)), _layers(spec.engine_image(xi)), _layers(spec.weights_image(xi))
    assert len(weights) == 1 and weights[0] in runtime and weights[0] in _layers(_image("llamacpp")), weights
    # the baked image holds the GGUF, then the config/tokenizer/chat template layer, over the engine's layers (and
    # below WORKDIR's empty layer, the engine's last too)
    gguf = runtime.index(weights[0])
    assert runtime[:gguf] + runtime[gguf + 2 :] == engine and len(runtime) == len(engine) + 2, (runtime, engine)
    served = _served_name(demo_models)
    volume, port, host_port = f"{NAME}-weights-gguf", backends.get(xi).port, 18203
    docker("volume", "rm", "-f", volume, check=False)
    docker("volume", "create", volume)
    # Docker copies an image's files into an empty named volume mounted on them when the container is created
    docker("rm", "-f", docker("create", "-v", f"{volume}:/models", spec.weights_image(xi), "none").stdout.strip())
    name = f"{NAME}-xinference-engine"
    docker("rm", "-f", name, check=False)
    try:
        start = time.monotonic()
        docker("run", "-d", "--name", name, "--init", "-p", f"127.0.0.1:{host_port}:{port}",
               "-e", f"XINFERENCE_API_KEY={API_KEY}", "-e", f"SERVED_MODEL_NAME={served}",
               "-v", f"{volume}:/models:ro", spec.engine_image(xi))  # fmt: skip
        engine_url = f"http://127.0.0.1:{host_port}"
        for prompt in demo.DEMO_PROMPTS:
            assert _ask_when_up(engine_url, served, prompt, timeout=300) == _ask_when_up(_url(xi), served, prompt)
        TIMINGS["xinference engine (mounted GGUF): start and every prompt"] = time.monotonic() - start
        changed = _ask_when_up(engine_url, served, demo.CHANGED_PROMPT)
        assert changed.strip() == demo.LORA_ANSWERS[demo.CHANGED_PROMPT].strip()  # the merged fine-tune's weights
    except AssertionError:
        print(docker("logs", "--tail", "80", name, check=False).stderr[-6000:])
        raise
    finally:
        docker("rm", "-f", name, check=False)
        docker("volume", "rm", "-f", volume, check=False)


def test_llamacpp_runtime_has_no_compiler_no_python(up, demo_models):
    info = json.loads(docker("image", "inspect", _image("llamacpp")).stdout)[0]
    labels = info["Config"]["Labels"]
    assert labels["io.llm-builder.quantization"] == "q8_0" and labels["io.llm-builder.backend"] == "llamacpp"
    assert labels["io.llm-builder.adapter-digest"].startswith("sha256:")
    assert info["Config"]["User"] == "10001:10001" and info["Config"]["Healthcheck"]["Test"][1] == "bash"
    probe = docker(
        "run", "--rm", "--entrypoint", "bash", _image("llamacpp"), "-c",
        "for t in gcc g++ cc c++ clang cmake python python3; do command -v $t && echo has-$t; done; "
        "ls -d /usr/lib/python3* /usr/local/lib/python3* 2>/dev/null; "
        "ls /opt/llama.cpp; /opt/llama.cpp/llama-server --version 2>&1 | tail -2; true",
    ).stdout  # fmt: skip
    assert "has-" not in probe and "/lib/python3" not in probe, probe
    assert "llama-server" in probe, probe
    # the CPU code the spec asked for: one AVX2 libggml-cpu, or every ISA level loaded at run time
    cpu_libs = {line for line in probe.splitlines() if line.startswith("libggml-cpu")}
    if yaml.safe_load(SPEC.read_text()).get("llamacpp_cpu", "all-variants") == "avx2":
        assert cpu_libs and all(name.startswith("libggml-cpu.so") for name in cpu_libs), probe
    else:
        assert {"libggml-cpu-haswell.so", "libggml-cpu-x64.so"} <= cpu_libs, probe
    # size above the model: the image minus its last layer (the GGUF)
    history = docker("history", "--no-trunc", "--format", "{{.Size}}\t{{.CreatedBy}}", _image("llamacpp")).stdout
    gguf_layer = next(line for line in history.splitlines() if "/models/model.gguf" in line)
    binaries = next(line for line in history.splitlines() if "/opt/llama.cpp /opt/llama.cpp" in line)
    base = json.loads(docker("image", "inspect", "local/debian:bookworm-slim").stdout)[0]["Size"]
    print(
        f"\nllama.cpp image: {info['Size'] / 1e6:.1f} MB = base {base / 1e6:.1f} MB + /opt/llama.cpp "
        f"{binaries.split(chr(9))[0]} + user/labels + model {gguf_layer.split(chr(9))[0]}"
    )
    TIMINGS["llamacpp image MB"] = info["Size"] / 1e6


@pytest.mark.parametrize("backend", ["llamacpp", "xinference"])
def test_openai_features(up, backend):
    """The official openai client against each GGUF server; each record's gaps (the docs' table) are asserted."""
    from _openai_features import FEATURES, probe

    results = probe(_url(backend), _served_name(up), API_KEY)
    print(f"\n{backend} OpenAI features:", json.dumps({k: v for k, v in results.items()}, ensure_ascii=False))
    missing = sorted(f for f in FEATURES if not results[f][0])
    assert missing == sorted(OPENAI_GAPS[backend]), results


# What each backend's pinned version does not serve, as its record states it and test_openai_features measures.
OPENAI_GAPS = {name: backends.get(name).openai_gaps(BuildSpec()) for name in ("llamacpp", "xinference")}


def test_hub_token_never_lands_in_the_image(built, tmp_path):
    """Build with a dummy token secret and search history and every layer's files for it."""
    token = "hf_DUMMYsecretTOKEN_e2e_4242"
    _make(
        "image",
        f"MODEL={built['base']}",
        "BACKEND=chatglmcpp",
        "QUANT=q8_0",
        f"SPEC={SPEC}",
        f"NAME={NAME}-secret",
        f"TAG={TAG}",
        env={"HF_TOKEN": token, "API_KEY": API_KEY},
    )
    image = f"{NAME}-secret-chatglmcpp:{TAG}"
    try:
        history = docker("history", "--no-trunc", image).stdout
        assert token not in history
        tar = tmp_path / "image.tar"
        docker("save", "-o", str(tar), image)
        assert _grep_tar_recursive(tar, token.encode()) is False
    finally:
        docker("rmi", "-f", image, check=False)


def _grep_tar_recursive(path: Path, needle: bytes) -> bool:
    """True if `needle` occurs in any file of the tar or of any tar inside it (the layers)."""
    import io
    import tarfile

    def scan(fileobj) -> bool:
        with tarfile.open(fileobj=fileobj) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                data = tar.extractfile(member).read()
                if needle in data:
                    return True
                if member.name.endswith((".tar", "layer.tar")) or data[257:262] == b"ustar":
                    if scan(io.BytesIO(data)):
                        return True
        return False

    with path.open("rb") as f:
        return scan(f)


def test_adapter_only_rebuild_reuses_code_layers(built, tmp_path):
    """Change the adapter, rebuild: only the model/convert/weights steps run again."""
    import shutil

    adapter2 = tmp_path / "adapter2"
    shutil.copytree(built["adapter"], adapter2)
    # new content every run: an adapter BuildKit has seen before (a rerun) would be a cache hit
    (adapter2 / "README.md").write_text(f"retrained adapter {time.time_ns()}\n")
    start = time.monotonic()
    _make(
        "image",
        f"MODEL={built['base']}",
        f"ADAPTER={adapter2}",
        "BACKEND=chatglmcpp",
        "QUANT=q8_0",
        f"SPEC={SPEC}",
        f"NAME={NAME}",
        f"TAG={TAG}",
        env={"API_KEY": API_KEY},
    )
    TIMINGS["adapter-only rebuild"] = time.monotonic() - start
    log = (REPO / "build" / NAME / "logs" / "chatglmcpp.log").read_text()
    steps = _step_states(log)
    assert all(
        state == "CACHED" for stage, state in steps.items() if stage.startswith(("build-env", "chatglm-wheel"))
    ), steps
    for stage in ("model", "ggml"):
        assert any(k.startswith(stage + " ") and v == "DONE" for k, v in steps.items()), (stage, steps)
    print("\nTIMINGS", json.dumps(TIMINGS))


def _step_states(log: str) -> dict[str, str]:
    """{'stage n/m': 'CACHED'|'DONE'} for every step but FROM, from BuildKit plain progress."""
    import re

    names: dict[str, str] = {}
    states: dict[str, str] = {}
    for line in log.splitlines():
        m = re.match(r"^#(\d+) \[([\w.-]+ \d+/\d+)\] (\w+)", line)
        if m and m.group(3) != "FROM":  # a FROM step always reports DONE (it resolves the base)
            names[m.group(1)] = m.group(2)
        m = re.match(r"^#(\d+) (CACHED|DONE)", line)
        if m and m.group(1) in names:
            states[names[m.group(1)]] = m.group(2)
    return states
