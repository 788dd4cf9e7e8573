"""Serving benchmarks: prints figures, asserts nothing.

On a random transformers-native GLM (default ~183M parameters, q4_0; built once into .cache/bench/):

  default         our chatglm.cpp server:
                  1. one client, greedy, N new tokens: in-process Engine vs HTTP non-streaming vs streaming
                  2. 16 concurrent clients: tokens/s, request latency p50 / p95
                  3. /health latency while the engine prefills a prompt near the context
  --vs-llamacpp   llama-server (8 slots, unified KV cache, as its image runs it) vs our chatglm.cpp
                  server on the same model: tokens/s for 1 and 8 concurrent clients, in alternating
                  rounds, medians printed (llama-server from `make llamacpp`, or $LLAMA_SERVER)
  --lora          adapters unmerged vs merged on llama-server, on a random ~76M Llama (q4_k_m)
                  and three r=16 all-linear LoRAs (built once into .cache/bench/lora/): the router as the
                  llama.cpp image runs it (router_preset(): one child per name, `no-repack`) vs a plain
                  llama-server on the adapter merged into the base (repack on, as the merged image runs it,
                  and off). 1 client: decode tokens/s (llama-server's own timing) of adapter 1, and the
                  router's base vs a plain base server (the router's own cost); 8 clients: aggregate
                  tokens/s, the router's spread over the 3 adapters vs the merged server (which serves one
                  fine-tune only). Alternating rounds, medians; goal: unmerged within 15% of merged at 1 client.
                  --threads: -t of every server and router child (default: all CPUs, as the image's -1); on a
                  shared machine use fewer: a descheduled thread stalls every graph node's barrier
  --lora --variants default,poll=0,OMP_WAIT_POLICY=passive
                  the router only, one per variant ('+' joins settings: a lowercase key goes into its
                  preset's [*], e.g. `poll = 0`; an uppercase one into its environment, which every child
                  inherits), each child -t --threads: 1 client on ad1 (decode tokens/s) and 8 clients over
                  ad1 ad2 ad3 (aggregate), alternating rounds, medians. NB: llama.cpp built with OpenMP (the
                  host build and the image: libgomp) never reads `poll` (it only sets how ggml's own pthread
                  pool waits for work); its threads wait as libgomp's OMP_WAIT_POLICY / GOMP_SPINCOUNT say.
                  --lora-dir DIR: other GGUFs (DIR/base.QUANT.gguf, DIR/adN.gguf, a missing adN served
                  with ad1.gguf: 3 children contend all the same)

  --vllm-cpu      vLLM on CPU (the CPU base image, in Docker) vs llama-server (router, q8_0 GGUF) on the --lora
                  Llama and its LoRAs: 1 and 8 clients, base and adapters, ready time, peak memory
                  (bench/_vllm_cpu.py); --vllm-dtypes float32,bfloat16

    .venv/bin/python bench/serve.py [--tokens 64] [--clients 16] [--repeat 5]
    .venv/bin/python bench/serve.py --vs-llamacpp [--repeat 5]
    .venv/bin/python bench/serve.py --lora [--tokens 64] [--repeat 5] [--threads N]
    .venv/bin/python bench/serve.py --lora --variants default,OMP_WAIT_POLICY=passive [--threads N] [--lora-dir DIR]
    .venv/bin/python bench/serve.py --vllm-cpu [--vllm-dtypes float32,bfloat16] [--tokens 64] [--repeat 3]
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
    """Our chatglm.cpp server (`python -m builder serve`), or llama-server as the llama.cpp image runs it:
    kind "llama.cpp" serves the GGUF `model`, kind "router" the preset INI `model` (router mode, the image's
    settings as its ENV gives them, which every child inherits). `extra`: more llama-server arguments."""

    def __init__(self, kind: str, model: Path, port: int, threads: int = os.cpu_count() or 2,
                 extra: tuple[str, ...] = (), **env: str):  # fmt: skip
        self.url = f"http://127.0.0.1:{port}"
        if kind in ("llama.cpp", "router"):
            from builder.model.gguf.llamacpp import host_binary

            argv = [str(host_binary("llama-server", "LLAMA_SERVER")), "--host", "127.0.0.1", "--port", str(port)]
        if kind == "llama.cpp":
            argv += ["-m", str(model), "-t", str(threads), "-np", "8", "--kv-unified", "-c", "4096", "--no-webui",
                     "--alias", "bench", *extra]  # fmt: skip
        elif kind == "router":
            argv += ["--models-preset", str(model), *extra]
            env = {"LLAMA_ARG_THREADS": str(threads), "LLAMA_ARG_N_PARALLEL": "8", "LLAMA_ARG_CTX_SIZE": "4096",
                   "LLAMA_ARG_KV_UNIFIED": "1", "LLAMA_ARG_UI": "0", "LLAMA_ARG_OFFLINE": "1", **env}  # fmt: skip
        else:
            argv = [sys.executable, "-m", "builder", "serve", "--ggml", str(model), "--host", "127.0.0.1",
                    "--port", str(port), "--served-model-name", "bench", "--log-level", "warning"]  # fmt: skip
        quiet = subprocess.DEVNULL if kind != "chatglm.cpp" else None  # llama-server logs every request
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


def completion(url: str, tokens: int, stream: bool = False, prompt=PROMPTS[0], model: str = "bench",
               decode: list[float] | None = None, **extra) -> tuple[int, float]:  # fmt: skip
    """(completion tokens, seconds) of one greedy /v1/completions request. The client is made before
    the clock starts: building httpx's TLS context alone takes ~25 ms, 3% of a 64-token request.
    `decode` (non-streaming llama-server): gets llama-server's own decode tokens/s appended; `extra`: more
    body fields (ignore_eos=True)."""
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, **extra}
    with httpx.Client(timeout=600) as c:
        t0 = time.perf_counter()
        if not stream:
            r = c.post(f"{url}/v1/completions", json=body)
            r.raise_for_status()
            seconds = time.perf_counter() - t0
            if decode is not None:
                decode.append(r.json()["timings"]["predicted_per_second"])
            return r.json()["usage"]["completion_tokens"], seconds
        body.update(stream=True, stream_options={"include_usage": True})
        n = 0
        with c.stream("POST", f"{url}/v1/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: {") and '"usage"' in line:
                    usage = json.loads(line[6:]).get("usage")
                    n = usage["completion_tokens"] if usage else n
        return n, time.perf_counter() - t0


def concurrent(url: str, clients: int, tokens: int, requests_each: int = 1, models: tuple[str, ...] = ("bench",),
               **extra) -> tuple[float, list[float]]:  # fmt: skip
    """Total tokens/s of `clients` threads each sending `requests_each` requests (client i asks for model
    models[i % len(models)]); request latencies."""
    results: list[tuple[int, float]] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        for k in range(requests_each):
            r = completion(url, tokens, prompt=PROMPTS[(i + k) % len(PROMPTS)], model=models[i % len(models)], **extra)
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


ADAPTERS = ("ad1", "ad2", "ad3")


def build_lora_models(quant: str) -> dict[str, Path]:
    """.cache/bench/lora/: a random Llama (hidden 768, 12 layers, 12 heads / 4 KV heads, FFN 2048, as
    bench/lora_router), three peft LoRAs on it (r=16, alpha 32, all-linear), and the GGUFs: base (`quant`),
    each LoRA (f16, convert_lora), and ad1 merged into the base (the project's merge, then `quant`)."""
    out = REPO / ".cache" / "bench" / "lora"
    base, merged = out / "base", out / "ad1-merged"
    files = {"base": out / f"base.{quant}.gguf", "merged": out / f"ad1-merged.{quant}.gguf"}
    files.update((name, out / f"{name}.gguf") for name in ADAPTERS)
    if all(f.exists() for f in files.values()):
        return files
    import torch
    from transformers import AutoModelForCausalLM

    from builder.demo.tiny import make_random_llama
    from builder.model.gguf.convert import convert_gguf
    from builder.model.gguf.lora import convert_lora
    from builder.model.merge import merge_model

    sys.path.insert(0, str(REPO / "tests"))
    from _tiny_hf import make_adapter

    if not (base / "config.json").exists():
        make_random_llama(base, hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=4, intermediate_size=2048)
    for i, name in enumerate(ADAPTERS, 1):
        if not (out / name / "adapter_config.json").exists():
            model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
            make_adapter(model, out / name, seed=10 + i, base_path=str(base), r=16, lora_alpha=32,
                         target_modules="all-linear")  # fmt: skip
        if not files[name].exists():
            convert_lora(out / name, base, files[name], quiet=True)
    if not (merged / "config.json").exists():
        merge_model(base, out / "ad1", merged, quiet=True)
    for folder, gguf in ((base, files["base"]), (merged, files["merged"])):
        if not gguf.exists():
            convert_gguf(folder, quant, gguf, quiet=True)
    return files


def alternating_rounds(args, one: dict, eight: dict) -> tuple[dict, dict, dict]:
    """args.repeat rounds, each starting one further along the lists: `one` {label: (url, model)} asked by 1 client
    (llama-server's decode tokens/s, and the request's), then `eight` {label: (url, models)} by 8 clients spread
    over the models (aggregate tokens/s). Returns ({label: decode list}, {label: request list}, {label: aggregate list})."""
    decode: dict[str, list[float]] = {name: [] for name in one}
    e2e: dict[str, list[float]] = {name: [] for name in one}
    agg: dict[str, list[float]] = {name: [] for name in eight}
    for r in range(args.repeat):
        print(f"round {r + 1}:", flush=True)
        for name in list(one)[r % len(one) :] + list(one)[: r % len(one)]:
            url, model = one[name]
            n_tok, s = completion(url, args.tokens, model=model, decode=decode[name], ignore_eos=True)
            e2e[name].append(n_tok / s)
            print(f"  1 client  {name:<28} decode {decode[name][-1]:6.1f} tok/s, request {n_tok / s:6.1f} tok/s "
                  f"({n_tok} tokens)", flush=True)  # fmt: skip
        for name in list(eight)[r % len(eight) :] + list(eight)[: r % len(eight)]:
            url, models = eight[name]
            tps, _ = concurrent(url, 8, args.tokens, models=models, ignore_eos=True)
            agg[name].append(tps)
            print(f"  8 clients {name:<28} {tps:6.1f} tok/s", flush=True)
    return decode, e2e, agg


def lora_figures(args) -> None:
    from math import prod

    from builder.model.gguf.router import models_max, router_preset
    from builder.model.merge import base_shards

    files = build_lora_models(args.quant)
    preset = files["base"].parent / f"preset.{args.quant}.ini"
    preset.write_text(router_preset("bench", ADAPTERS, str(files["base"]), {n: str(files[n]) for n in ADAPTERS}))
    n_params = sum(prod(t.shape) for s in base_shards(files["base"].parent / "base") for t in s.tensors.values())
    mb = {name: f.stat().st_size / 1e6 for name, f in files.items()}
    print(f"model: random Llama, {n_params / 1e6:.1f}M parameters (hidden 768, 12 layers, FFN 2048), {args.quant} "
          f"GGUF {mb['base']:.1f} MB, merged ad1 {mb['merged']:.1f} MB; 3 LoRAs r=16 all-linear, f16 GGUF "
          f"{mb['ad1']:.1f} MB each\n{os.cpu_count()} CPUs; every llama-server (each router child too) -t "
          f"{args.threads}, -np 8, --kv-unified, -c 4096; {args.tokens} new tokens a request (ignore_eos), greedy")  # fmt: skip
    n = models_max(ADAPTERS)
    servers = {  # name: (kind, model, extra argv)
        "merged ad1": ("llama.cpp", files["merged"], ()),
        "merged ad1, no-repack": ("llama.cpp", files["merged"], ("--no-repack",)),
        "base": ("llama.cpp", files["base"], ()),
        "base, no-repack": ("llama.cpp", files["base"], ("--no-repack",)),
        "router": ("router", preset, ("--models-max", str(n))),
    }
    one = {  # 1 client: (server, model asked for)
        "merged ad1": ("merged ad1", "bench"),
        "merged ad1, no-repack": ("merged ad1, no-repack", "bench"),
        "router, ad1 (unmerged)": ("router", "ad1"),
        "base": ("base", "bench"),
        "base, no-repack": ("base, no-repack", "bench"),
        "router, base": ("router", "bench"),
    }
    eight = {  # 8 clients: (server, models asked for, round-robin)
        "merged ad1": ("merged ad1", ("bench",)),
        "merged ad1, no-repack": ("merged ad1, no-repack", ("bench",)),
        "router, ad1 ad2 ad3": ("router", ADAPTERS),
        "router, ad1 only": ("router", ("ad1",)),
    }
    running: dict[str, Server] = {}
    try:
        for k, (name, (kind, model, extra)) in enumerate(servers.items()):  # all up at once: idle ones sleep
            running[name] = Server(kind, model, args.port + k, args.threads, extra)
        for server, model in one.values():  # warm-up; the router's children load on startup, requests wait
            completion(running[server].url, 4, model=model)
        decode, e2e, agg = alternating_rounds(
            args,
            {name: (running[server].url, model) for name, (server, model) in one.items()},
            {name: (running[server].url, models) for name, (server, models) in eight.items()},
        )
    finally:
        for server in running.values():
            server.close()

    med = {name: statistics.median(v) for name, v in decode.items()}
    print(f"\n1 client, medians of {args.repeat} rounds (decode = llama-server's timings.predicted_per_second)")
    print(f"  {'':<24} {'decode tok/s':>12} {'request tok/s':>14}")
    for name in one:
        print(f"  {name:<24} {med[name]:12.1f} {statistics.median(e2e[name]):14.1f}")
    print(f"\n8 clients, medians of {args.repeat} rounds: aggregate tokens/s (the merged server serves ad1 only)")
    for name in eight:
        print(f"  {name:<24} {statistics.median(agg[name]):12.1f}")
    ratio = med["router, ad1 (unmerged)"] / med["merged ad1"]
    fair = med["router, ad1 (unmerged)"] / med["merged ad1, no-repack"]
    print(f"\nunmerged / merged decode, 1 client: {ratio:.2f} as the images run them (merged with repack); "
          f"goal >= 0.85: {'met' if ratio >= 0.85 else 'MISSED'}\n"
          f"  vs merged --no-repack (same kernels as the router's children): {fair:.2f}; "
          f"router base / base --no-repack: {med['router, base'] / med['base, no-repack']:.2f}")  # fmt: skip


def variant_figures(args) -> None:
    """--lora --variants: routers that differ only in their preset's [*] or their environment, alternating rounds."""
    from builder.model.gguf.router import models_max, router_preset

    if args.lora_dir:
        d = Path(args.lora_dir)
        files = {"base": d / f"base.{args.quant}.gguf"}
        files.update((n, d / f"{n}.gguf" if (d / f"{n}.gguf").exists() else d / "ad1.gguf") for n in ADAPTERS)
    else:
        files = build_lora_models(args.quant)
    text = router_preset("bench", ADAPTERS, str(files["base"]), {n: str(files[n]) for n in ADAPTERS})
    print(f"{files['base']} ({files['base'].stat().st_size / 1e6:.0f} MB), adapters "
          f"{', '.join(f'{n}={files[n].name}' for n in ADAPTERS)}; {os.cpu_count()} CPUs; router children -t "
          f"{args.threads}, -np 8, --kv-unified, -c 4096; {args.tokens} new tokens a request (ignore_eos), greedy")  # fmt: skip
    names = args.variants.split(",")
    running: dict[str, Server] = {}
    try:
        for k, name in enumerate(names):
            settings = dict(kv.split("=", 1) for kv in name.split("+") if kv != "default")
            shared = "".join(f"{key} = {v}\n" for key, v in settings.items() if key.islower())
            env = {key: v for key, v in settings.items() if not key.islower()}
            preset = Path(f"/tmp/bench-preset-{os.getpid()}-{k}.ini")
            preset.write_text(text.replace("[*]\n", f"[*]\n{shared}", 1))  # router_preset's SHARED + these
            extra = ("--models-max", str(models_max(ADAPTERS)))
            running[name] = Server("router", preset, args.port + k, args.threads, extra, **env)
            for m in ADAPTERS:
                completion(running[name].url, 4, model=m)
        decode, _, agg = alternating_rounds(
            args, {n: (running[n].url, "ad1") for n in names}, {n: (running[n].url, ADAPTERS) for n in names}
        )
    finally:
        for server in running.values():
            server.close()
    print(f"\nmedians of {args.repeat} rounds, router children -t {args.threads}")
    print(f"  {'':<28} {'1 client ad1 decode':>20} {'8 clients ad1-3 aggregate':>26}")
    for name in names:
        print(f"  {name:<28} {statistics.median(decode[name]):20.1f} {statistics.median(agg[name]):26.1f}")


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
    ap.add_argument("--lora", action="store_true", help="adapters unmerged (router) vs merged, on llama-server")
    ap.add_argument("--quant", default="q4_k_m", help="--lora: the base's GGUF type")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="--lora: -t of every llama-server")
    ap.add_argument("--variants", help="--lora: compare routers so set (e.g. default,poll=0,OMP_WAIT_POLICY=passive)")
    ap.add_argument("--lora-dir", help="--lora --variants: GGUFs from here instead of .cache/bench/lora/")
    ap.add_argument("--vllm-cpu", action="store_true", help="vLLM on CPU vs llama-server, base and adapters")
    ap.add_argument("--vllm-dtypes", default="float32", help="--vllm-cpu: comma list of vLLM --dtype values")
    args = ap.parse_args()
    if args.vllm_cpu:
        from _vllm_cpu import vllm_cpu_figures

        args.vllm_dtypes = args.vllm_dtypes.split(",")
        return vllm_cpu_figures(args, sys.modules[__name__])
    if args.lora and args.variants:
        return variant_figures(args)
    if args.lora:
        return lora_figures(args)
    ggml, gguf = build_model(args.hidden, args.layers, args.intermediate, gguf=args.vs_llamacpp)
    if args.vs_llamacpp:
        vs_llamacpp(args, ggml, gguf)
    else:
        chatglmcpp_figures(args, ggml)


if __name__ == "__main__":
    main()
