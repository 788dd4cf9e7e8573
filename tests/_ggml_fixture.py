"""Fixtures shared by test_serve.py and test_smoke.py (a plain module, no conftest): a tiny GLM-4 GGML
file for a real chatglm_cpp.Pipeline, and an OpenAI server running in a thread on a free port.

The GGML file comes from `builder.demo.tiny` + `builder.model.convert` (the project's own path). Only if those
modules cannot be imported does it fall back to writing a random byte-level GLM-4 state dict with
chatglm.cpp's own ChatGLM4Converter.
"""

from __future__ import annotations

import base64
import importlib.util
import os
import signal
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

_CACHE: dict[str, Path] = {}


def tiny_ggml(tmp_path_factory) -> Path:
    """A tiny random GLM-4 GGML file (f16), built once per pytest run."""
    if "ggml" not in _CACHE:
        out = tmp_path_factory.mktemp("tiny-ggml")
        try:
            from builder.demo.tiny import make_random_glm
            from builder.model.convert import convert_model
        except ImportError:
            _CACHE["ggml"] = _fallback_ggml(out / "tiny-fallback.ggml")
        else:
            model_dir = make_random_glm(out / "tiny-glm")
            path = convert_model(model_dir, quant="f16", out=out / "tiny.ggml", quiet=True)
            _CACHE["ggml"] = Path(path)
    return _CACHE["ggml"]


def _fallback_ggml(out: Path) -> Path:
    import torch

    spec = importlib.util.find_spec("chatglm_cpp")
    convert_py = Path(list(spec.submodule_search_locations)[0]) / "convert.py"
    mod_spec = importlib.util.spec_from_file_location("_chatglm_cpp_convert", convert_py)
    conv = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(conv)

    vocab = out.with_suffix(".vocab")
    vocab.write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)))
    hidden, heads, groups, ffn, layers, padded_vocab = 64, 4, 2, 128, 2, 288
    head_dim = hidden // heads
    config = SimpleNamespace(
        add_bias_linear=False,
        add_qkv_bias=True,
        apply_residual_connection_post_layernorm=False,
        kv_channels=head_dim,
        num_attention_heads=heads,
        hidden_size=hidden,
        multi_query_attention=True,
        original_rope=True,
        post_layer_norm=True,
        rmsnorm=True,
        padded_vocab_size=padded_vocab,
        multi_query_group_num=groups,
        num_layers=layers,
        ffn_hidden_size=ffn,
        layernorm_epsilon=1e-5,
        pre_seq_len=None,
        rope_ratio=1,
        seq_length=512,
        eos_token_id=256,
        pad_token_id=256,
        quantization_bit=None,
    )
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen) * 0.5

    qkv = hidden + 2 * groups * head_dim
    sd = {"transformer.embedding.word_embeddings.weight": rnd(padded_vocab, hidden)}
    for i in range(layers):
        p = f"transformer.encoder.layers.{i}."
        sd[p + "input_layernorm.weight"] = torch.ones(hidden)
        sd[p + "self_attention.query_key_value.weight"] = rnd(qkv, hidden)
        sd[p + "self_attention.query_key_value.bias"] = rnd(qkv)
        sd[p + "self_attention.dense.weight"] = rnd(hidden, hidden)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(hidden)
        sd[p + "mlp.dense_h_to_4h.weight"] = rnd(2 * ffn, hidden)
        sd[p + "mlp.dense_4h_to_h.weight"] = rnd(hidden, ffn)
    sd["transformer.encoder.final_layernorm.weight"] = torch.ones(hidden)
    sd["transformer.output_layer.weight"] = rnd(padded_vocab, hidden)
    model = SimpleNamespace(config=config, state_dict=lambda: sd)
    with open(out, "wb") as f:
        conv.ChatGLM4Converter.convert(f, model, SimpleNamespace(vocab_file=str(vocab)), conv.GGMLType.F16)
    return out


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1:<free port> in a daemon thread; use as a context manager."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def wait_http(url: str, timeout: float = 30.0, proc=None) -> None:
    """Poll `url` until it answers 200 (for servers started as subprocesses)."""
    import urllib.request

    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError as e:
            last = e
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer 200 within {timeout}s: {last}")


@contextmanager
def frozen(pid: int):
    """SIGSTOP a process (an engine stall as long as the test likes); SIGCONT on the way out."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)
