"""Serving benchmarks: prints figures, asserts nothing.

On a random transformers-native GLM (default ~183M parameters, q4_0; built once into .cache/bench/):

  default         our chatglm.cpp server:
                  1. one client, greedy, N new tokens: in-process Engine vs HTTP non-streaming vs streaming
                  2. 16 concurrent clients: tokens/s, request latency p50 / p95
                  3. /health latency while the engine prefills a prompt near the context
  --vs-llamacpp   llama-server (8 slots, unified KV cache, as its image runs it) vs our chatglm.cpp
                  server on the same model: tokens/s for 1 and 8 concurrent clients, in alternating
                  rounds, medians printed (llama-server from `make llamacpp`, or $LLAMA_SERVER)

    .venv/bin/python bench/serve.py [--tokens 64] [--clients 16] [--repeat 5]
    .venv/bin/python bench/serve.py --vs-llamacpp [--repeat 5]
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

PROMPTS = [
    "Write a long story about a robot who learns to paint.",
    "The quick brown fox jumps over the lazy dog.",
    "Machine learning models are trained on data, then",
    "Hello, world! How are you today?",
    "def fibonacci(n: int) -> int:",
    "Please summarize the following paragraph in one sentence.",
    "机器学习模型需要大量的数据来训练",
    '{"name": "glm", "layers": [1, 2, 3], "ok": true}',
]


def build_model(hidden: int, layers: int, intermediate: int, gguf: bool = False) -> tuple[Path, Path | None]:
    """The bench model as chatglm.cpp GGML (and llama.cpp GGUF), q4_0, both from the same folder."""
    import torch

    from builder.demo.tiny import make_random_glm
    from builder.model.convert import convert_model

    out = REPO / ".cache" / "bench"
    stem = f"glm-h{hidden}-l{layers}-i{intermediate}"
    folder, ggml, gguf_path = out / stem, out / f"{stem}.q4_0.ggml", out / f"{stem}.q4_0.gguf"
    if not (folder / "config.json").exists():
        make_random_glm(folder, hidden_size=hidden, num_layers=layers, num_heads=hidden // 128, num_kv_heads=2,
                        intermediate_size=intermediate, dtype=torch.bfloat16)  # fmt: skip
    if not ggml.exists():
        convert_model(folder, quant="q4_0", out=ggml, quiet=True)
    if gguf and not gguf_path.exists():
        from builder.model.gguf.convert import convert_gguf

        convert_gguf(folder, "q4_0", gguf_path, quiet=True)
    return ggml, gguf_path if gguf else None


def parameters(hidden: int, layers: int, intermediate: int, vocab: int, kv: int = 2) -> int:
    head = 128
    attn = hidden * hidden * 2 + 2 * hidden * kv * head
    return layers * (attn + 3 * hidden * intermediate) + 2 * vocab * hidden


class Server:
    """Our chatglm.cpp server (`python -m builder serve`), or llama-server as the llama.cpp image runs it."""

    def __init__(self, kind: str, model: Path, port: int, threads: int = os.cpu_count() or 2, **env: str):
        self.url = f"http://127.0.0.1:{port}"
        if kind == "llama.cpp":
            from builder.model.gguf.llamacpp import host_binary

            argv = [str(host_binary("llama-server", "LLAMA_SERVER")), "-m", str(model),
                    "--host", "127.0.0.1", "--port", str(port), "-t", str(threads), "-np", "8", "--kv-unified",
                    "-c", "4096", "--no-webui", "--alias", "bench"]  # fmt: skip
        else:
            argv = [sys.executable, "-m", "builder", "serve", "--ggml", str(model), "--host", "127.0.0.1",
                    "--port", str(port), "--served-model-name", "bench", "--log-level", "warning"]  # fmt: skip
        quiet = subprocess.DEVNULL if kind == "llama.cpp" else None  # llama-server logs every request
        self.proc = subprocess.Popen(argv, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=quiet, cwd=REPO)
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert self.proc.poll() is None and time.monotonic() < deadline, f"{kind} server did not start"
            time.sleep(0.2)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def completion(url: str, tokens: int, stream: bool = False, prompt=PROMPTS[0]) -> tuple[int, float]:
    """(completion tokens, seconds) of one greedy /v1/completions request. The client is made before
    the clock starts: building httpx's TLS context alone takes ~25 ms, 3% of a 64-token request."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": tokens, "temperature": 0}
    with httpx.Client(timeout=600) as c:
        t0 = time.perf_counter()
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


def concurrent(url: str, clients: int, tokens: int, requests_each: int = 1) -> tuple[float, list[float]]:
    """Total tokens/s of `clients` threads each sending `requests_each` requests; request latencies."""
    results: list[tuple[int, float]] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        for k in range(requests_each):
            r = completion(url, tokens, prompt=PROMPTS[(i + k) % len(PROMPTS)])
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(n for n, _ in results) / (time.perf_counter() - t0), sorted(s for _, s in results)


def chatglmcpp_figures(args, ggml: Path) -> None:
    engine = Engine.load(ggml)
    n_params = parameters(args.hidden, args.layers, args.intermediate, int(engine.model.config.vocab_size))
    print(f"model: random GLM, {n_params / 1e6:.0f}M parameters, q4_0, {ggml.stat().st_size / 1e6:.0f} MB, "
          f"context {engine.max_length}; {os.cpu_count()} CPUs; {args.tokens} new tokens per request")  # fmt: skip
    ids = engine.encode_prompt(PROMPTS[0])

    def in_process() -> tuple[int, float]:
        t0 = time.perf_counter()
        n = sum(1 for _ in engine.generate_ids(ids, SamplingParams(temperature=0), args.tokens))
        return n, time.perf_counter() - t0

    server = Server("chatglm.cpp", ggml, args.port, MAX_QUEUE=str(max(16, args.clients)))
    try:
        completion(server.url, 4)  # warm-up
        inproc, plain, streamed = [], [], []
        for _ in range(args.repeat):  # interleaved, so drift hits all three alike
            inproc.append(in_process())
            plain.append(completion(server.url, args.tokens))
            streamed.append(completion(server.url, args.tokens, stream=True))
        rate = {name: statistics.median(n / s for n, s in runs) for name, runs in
                (("in", inproc), ("plain", plain), ("stream", streamed))}  # fmt: skip
        print(f"\n1. one client (median of {args.repeat})")
        print(f"   in-process Engine        {rate['in']:7.1f} tok/s   ({inproc[0][0]} tokens)")
        for name, label in (("plain", "HTTP, non-streaming"), ("stream", "HTTP, streaming")):
            print(f"   {label:<24} {rate[name]:7.1f} tok/s   ({rate[name] / rate['in'] - 1:+.1%} vs in-process)")

        tps, lat = concurrent(server.url, args.clients, args.tokens)
        print(f"\n2. {args.clients} concurrent clients")
        print(f"   throughput {tps:7.1f} tok/s")
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


def vs_llamacpp(args, ggml: Path, gguf: Path) -> None:
    print(f"model: random GLM, {args.layers} layers, hidden {args.hidden}, ffn {args.intermediate}; q4_0 GGML "
          f"and GGUF; {args.tokens} new tokens a request, greedy /v1/completions")  # fmt: skip
    results: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.repeat):
        for kind, model in (("chatglm.cpp", ggml), ("llama.cpp", gguf)):
            server = Server(kind, model, args.port)
            try:
                completion(server.url, 4)  # warm-up
                for clients, each in ((1, 4), (8, 2)):
                    tps, _ = concurrent(server.url, clients, args.tokens, each)
                    results.setdefault((kind, clients), []).append(tps)
                    print(f"  {kind:<11} {clients} client(s): {tps:6.1f} tok/s", flush=True)
            finally:
                server.close()
    print(f"\nmedians of {args.repeat} round(s):")
    for clients in (1, 8):
        ours = statistics.median(results[("chatglm.cpp", clients)])
        theirs = statistics.median(results[("llama.cpp", clients)])
        print(f"  {clients} client(s): llama-server {theirs:6.1f} tok/s, chatglm.cpp server {ours:6.1f} tok/s "
              f"({theirs / ours:.2f}x)")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--intermediate", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--port", type=int, default=18991)
    ap.add_argument("--vs-llamacpp", action="store_true", help="llama-server vs the chatglm.cpp server")
    args = ap.parse_args()
    ggml, gguf = build_model(args.hidden, args.layers, args.intermediate, gguf=args.vs_llamacpp)
    if args.vs_llamacpp:
        vs_llamacpp(args, ggml, gguf)
    else:
        chatglmcpp_figures(args, ggml)


if __name__ == "__main__":
    main()
