"""Serving benchmark of the chatglm.cpp server: prints figures, asserts nothing.

On a random GLM (default ~180M parameters, q4_0; built once into .cache/bench/):
  1. single client, greedy, N new tokens: in-process Engine vs HTTP non-streaming vs HTTP streaming
  2. 16 concurrent clients: total tokens/s, request latency p50 / p95
  3. /health latency while the engine prefills a prompt near the context

    .venv/bin/python bench/serve.py [--tokens 64] [--clients 16] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from builder.runtime.chatglmcpp.engine import Engine, SamplingParams  # noqa: E402

PROMPT = "Write a long story about a robot who learns to paint."


def build_model(hidden: int, layers: int, intermediate: int) -> Path:
    from builder.demo.tiny import make_random_glm
    from builder.model.convert import convert_model

    out = REPO / ".cache" / "bench"
    ggml = out / f"glm-h{hidden}-l{layers}-i{intermediate}.q4_0.ggml"
    if not ggml.exists():
        folder = make_random_glm(out / ggml.stem, hidden_size=hidden, num_layers=layers, num_heads=16,
                                 num_kv_heads=2, intermediate_size=intermediate)  # fmt: skip
        convert_model(folder, quant="q4_0", out=ggml, quiet=True)
    return ggml


def parameters(hidden: int, layers: int, intermediate: int, vocab: int, kv: int = 2, heads: int = 16) -> int:
    head = hidden // heads
    attn = hidden * hidden * 2 + 2 * hidden * kv * head
    return layers * (attn + 3 * hidden * intermediate) + 2 * vocab * hidden


class Server:
    def __init__(self, ggml: Path, port: int, **env: str):
        self.url = f"http://127.0.0.1:{port}"
        argv = [sys.executable, "-m", "builder.runtime.chatglmcpp", "serve", "--ggml", str(ggml), "--host",
                "127.0.0.1", "--port", str(port), "--served-model-name", "bench", "--log-level", "warning"]  # fmt: skip
        self.proc = subprocess.Popen(argv, env={**os.environ, **env})
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert self.proc.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def completion(url: str, tokens: int, stream: bool, prompt=PROMPT) -> tuple[int, float]:
    """(completion tokens, seconds) of one greedy /v1/completions request."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": tokens, "temperature": 0}
    t0 = time.perf_counter()
    with httpx.Client(timeout=600) as c:
        if not stream:
            r = c.post(f"{url}/v1/completions", json=body)
            r.raise_for_status()
            return r.json()["usage"]["completion_tokens"], time.perf_counter() - t0
        body.update(stream=True, stream_options={"include_usage": True})
        n = 0
        with c.stream("POST", f"{url}/v1/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: {") and '"usage"' in line:
                    usage = json.loads(line[6:]).get("usage")
                    n = usage["completion_tokens"] if usage else n
        return n, time.perf_counter() - t0


def median_rate(samples: list[tuple[int, float]]) -> tuple[float, int]:
    return statistics.median(n / s for n, s in samples), samples[0][0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=14)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--port", type=int, default=18991)
    args = ap.parse_args()

    ggml = build_model(args.hidden, args.layers, args.intermediate)
    engine = Engine.load(ggml)
    n_params = parameters(args.hidden, args.layers, args.intermediate, int(engine.model.config.vocab_size))
    print(f"model: random GLM, {n_params / 1e6:.0f}M parameters, q4_0, {ggml.stat().st_size / 1e6:.0f} MB, "
          f"context {engine.max_length}; {os.cpu_count()} CPUs; {args.tokens} new tokens per request")  # fmt: skip

    ids = engine.encode_prompt(PROMPT)
    inproc = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        n = sum(1 for _ in engine.generate_ids(ids, SamplingParams(temperature=0), args.tokens))
        inproc.append((n, time.perf_counter() - t0))
    del engine

    server = Server(ggml, args.port, MAX_QUEUE=str(max(16, args.clients)))
    try:
        completion(server.url, 4, False)  # warm-up
        plain, streamed = [], []
        for _ in range(args.repeat):  # alternate, so drift hits both
            plain.append(completion(server.url, args.tokens, False))
            streamed.append(completion(server.url, args.tokens, True))
        rate_in, n_in = median_rate(inproc)
        rate_plain, n_plain = median_rate(plain)
        rate_stream, _ = median_rate(streamed)
        print(f"\n1. one client (median of {args.repeat})")
        print(f"   in-process Engine        {rate_in:7.1f} tok/s   ({n_in} tokens)")
        print(f"   HTTP, non-streaming      {rate_plain:7.1f} tok/s   ({rate_plain / rate_in - 1:+.1%} vs in-process)")
        print(
            f"   HTTP, streaming          {rate_stream:7.1f} tok/s   ({rate_stream / rate_in - 1:+.1%} vs in-process)"
        )

        results: list[tuple[int, float]] = []
        lock = threading.Lock()

        def client():
            r = completion(server.url, args.tokens, False)
            with lock:
                results.append(r)

        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        lat = sorted(s for _, s in results)
        total = sum(n for n, _ in results)
        print(f"\n2. {args.clients} concurrent clients")
        print(f"   throughput {total / wall:7.1f} tok/s ({total} tokens in {wall:.1f} s)")
        print(f"   latency p50 {statistics.median(lat):.2f} s, p95 {lat[int(0.95 * (len(lat) - 1))]:.2f} s")

        prompt = [1 + i % 600 for i in range(1790)]  # 1,790 ids: a prefill near the 2,048 context
        done = threading.Event()
        health: list[float] = []

        def prefill():
            with httpx.Client(timeout=600) as c:
                c.post(f"{server.url}/v1/completions", json={"model": "bench", "prompt": prompt, "max_tokens": 1})
            done.set()

        t_start = time.perf_counter()
        threading.Thread(target=prefill).start()
        with httpx.Client(timeout=30) as c:
            while not done.is_set():
                t0 = time.perf_counter()
                c.get(f"{server.url}/health")
                health.append(time.perf_counter() - t0)
                time.sleep(0.02)
        print(f"\n3. /health during a {len(prompt)}-token prefill ({time.perf_counter() - t_start:.1f} s)")
        print(
            f"   {len(health)} probes: median {statistics.median(health) * 1000:.1f} ms, max {max(health) * 1000:.1f} ms"
        )
    finally:
        server.close()


if __name__ == "__main__":
    main()
