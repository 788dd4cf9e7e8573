"""llama-server vs our chatglm.cpp server on the same random GLM at q4_0: tokens/s for one client and
for 8 concurrent clients (greedy `/v1/completions`, completion tokens counted from `usage`).

Both servers get the same model: a random transformers-native GLM (default ~183M parameters),
converted with the project's own paths (`convert --format ggml` for chatglm.cpp, `--format gguf` for
llama.cpp), each served as its image does (chatglm.cpp: `python -m builder serve`; llama.cpp:
llama-server with 8 slots and a unified KV cache). Runs alternate between the servers; medians
are printed. Prints figures, asserts nothing.

    .venv/bin/python bench/serve_llamacpp.py                 # ~183M GLM, 64 new tokens, 3 rounds
    .venv/bin/python bench/serve_llamacpp.py --layers 4 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Machine learning models are trained on data, then",
    "Hello, world! How are you today?",
    "In 2024 there were 1234567 requests, and",
    "def fibonacci(n: int) -> int:",
    "Please summarize the following paragraph in one sentence.",
    "机器学习模型需要大量的数据来训练",
    '{"name": "glm", "layers": [1, 2, 3], "ok": true}',
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_health(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"{url} not healthy in {timeout}s")


def complete(url: str, prompt: str, max_tokens: int) -> int:
    body = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    req = urllib.request.Request(
        url + "/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=600) as r:
        return int(json.load(r)["usage"]["completion_tokens"])


def throughput(url: str, clients: int, requests_each: int, max_tokens: int) -> float:
    """Completion tokens per second over all clients, each sending `requests_each` requests in a row."""
    counts = [0] * clients

    def client(i: int) -> None:
        for k in range(requests_each):
            counts[i] += complete(url, PROMPTS[(i + k) % len(PROMPTS)], max_tokens)

    complete(url, PROMPTS[0], 4)  # warm up
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - t0)


def make_model(root: Path, layers: int, hidden: int, ffn: int) -> tuple[Path, Path]:
    import torch

    from builder.demo.tiny import make_random_glm
    from builder.model.convert import convert_model
    from builder.model.gguf.convert import convert_gguf

    folder = make_random_glm(
        root / "glm", hidden_size=hidden, num_layers=layers, num_heads=hidden // 128, num_kv_heads=2,
        intermediate_size=ffn, dtype=torch.bfloat16,
    )  # fmt: skip
    ggml = convert_model(folder, quant="q4_0", out=root / "glm-q4_0.ggml", quiet=True)
    gguf = convert_gguf(folder, "q4_0", root / "glm-q4_0.gguf", quiet=True).path
    return Path(ggml), gguf


def start(kind: str, model: Path, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    if kind == "llama.cpp":
        from builder.model.gguf.convert import HOME

        server = os.environ.get("LLAMA_SERVER") or str(HOME / "host" / "llama-server")
        cmd = [server, "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-t", str(threads)]
        cmd += ["-np", "8", "--kv-unified", "-c", "4096", "--no-webui", "--alias", "m"]
    else:
        cmd = [
            sys.executable,
            "-m",
            "builder",
            "serve",
            "--ggml",
            str(model),
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--served-model-name",
            "m",
        ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    wait_health(url, proc)
    return proc, url


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=4096)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    a = p.parse_args()
    results: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        ggml, gguf = make_model(Path(tmp), a.layers, a.hidden, a.ffn)
        print(f"model: random GLM, {a.layers} layers, hidden {a.hidden}, ffn {a.ffn}; q4_0 GGML and GGUF")
        for _ in range(a.rounds):
            for kind, model in (("chatglm.cpp", ggml), ("llama.cpp", gguf)):
                proc, url = start(kind, model, a.threads)
                try:
                    for clients, each in ((1, 4), (8, 2)):
                        tps = throughput(url, clients, each, a.max_tokens)
                        results.setdefault((kind, clients), []).append(tps)
                        print(f"  {kind:<11} {clients} client(s): {tps:6.1f} tok/s", flush=True)
                finally:
                    proc.terminate()
                    proc.wait(30)
    print(f"\nmedians of {a.rounds} round(s), {a.max_tokens} new tokens a request, greedy /v1/completions:")
    for clients in (1, 8):
        ours = statistics.median(results[("chatglm.cpp", clients)])
        theirs = statistics.median(results[("llama.cpp", clients)])
        print(
            f"  {clients} client(s): llama-server {theirs:6.1f} tok/s, chatglm.cpp server {ours:6.1f} tok/s "
            f"({theirs / ours:.2f}x)"
        )


if __name__ == "__main__":
    main()
