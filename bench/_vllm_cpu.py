"""bench/serve.py --vllm-cpu: vLLM on CPU (its image's base, `local/vllm-cpu:latest` or $VLLM_CPU_IMAGE, run as
the CPU image runs: --shm-size 1g, read-only root, VLLM_CPU_KVCACHE_SPACE) against llama-server (the host build,
router mode as the llama.cpp image runs it) on the same random Llama and its three LoRAs: the HF folder at
float32 (and bfloat16 with --vllm-dtypes) for vLLM, the q8_0 GGUF and f16 GGUF LoRAs for llama-server.

1 client (base, ad1) and 8 clients (base; ad1 ad2 ad3 round-robin), request tokens/s, medians of alternating
rounds; time to ready; peak memory of each server (vLLM: its container's memory cgroup high-water mark;
llama-server: the sum of VmHWM over the router and its children)."""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

DOCKER = "/usr/bin/docker"


class VllmContainer:
    """`vllm serve` in the CPU base image on the bench folder (mounted read-only at /m), LoRAs unmerged."""

    def __init__(self, image: str, folder: Path, adapters: tuple[str, ...], port: int, dtype: str, kv_gib: int = 1):
        self.name = f"bench-vllm-cpu-{dtype}"
        self.url = f"http://127.0.0.1:{port}"
        subprocess.run([DOCKER, "rm", "-f", self.name], capture_output=True)
        argv = [DOCKER, "run", "-d", "--name", self.name, "--shm-size", "1g", "--read-only", "--tmpfs", "/tmp",
                "-v", "/home/app/.cache", "--cap-drop", "ALL", "-e", f"VLLM_CPU_KVCACHE_SPACE={kv_gib}",
                "-e", "HOME=/home/app", "-e", "XDG_CACHE_HOME=/home/app/.cache",
                "-e", "TORCHINDUCTOR_CACHE_DIR=/home/app/.cache/torchinductor", "-v", f"{folder}:/m:ro",
                "-p", f"127.0.0.1:{port}:8000", image, "/m/base", "--served-model-name", "bench", "--port", "8000",
                "--dtype", dtype, "--max-model-len", "2048", "--enable-lora", "--max-lora-rank", "16",
                "--max-loras", str(len(adapters) + 1),  # the spare slot the image keeps on CPU
                "--lora-modules", *(f"{a}=/m/{a}" for a in adapters)]  # fmt: skip
        start = time.monotonic()
        self.id = subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()
        while True:
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            state = subprocess.run([DOCKER, "inspect", "-f", "{{.State.Running}}", self.name], capture_output=True,
                                   text=True).stdout.strip()  # fmt: skip
            if state != "true" or time.monotonic() - start > 600:
                logs = subprocess.run([DOCKER, "logs", "--tail", "30", self.name], capture_output=True, text=True)
                self.close()
                raise RuntimeError(f"vLLM ({dtype}) did not start:\n{logs.stdout}{logs.stderr}")
            time.sleep(1)
        self.ready_s = time.monotonic() - start

    def peak_mb(self) -> float | None:
        """The container's memory high-water mark (cgroup v1 max_usage_in_bytes, or v2 memory.peak)."""
        for pattern in (f"memory/**/{self.id}*/memory.max_usage_in_bytes", f"**/*{self.id}*/memory.peak"):
            for path in Path("/sys/fs/cgroup").glob(pattern):
                return int(path.read_text()) / 2**20
        return None

    def freeze(self, frozen: bool) -> None:
        """Pause the container (its cgroup frozen) while another server is measured: vLLM's CPU workers keep
        spinning for a while after a request, which would slow the server measured next."""
        subprocess.run([DOCKER, "pause" if frozen else "unpause", self.name], capture_output=True)

    def close(self) -> None:
        subprocess.run([DOCKER, "rm", "-f", "-v", self.name], capture_output=True)


def tree_peak_mb(pid: int) -> float:
    """Sum of VmHWM (peak RSS) over `pid` and its descendants (llama-server's router and its children)."""
    pids, total = [pid], 0.0
    while pids:
        p = pids.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        total += next((int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmHWM")), 0)
        pids += [int(c) for c in children]
    return total


@contextmanager
def alone(servers: dict, measured: str):
    """Every vLLM container but the measured server's paused for the duration."""
    others = [s for name, s in servers.items() if name != measured and isinstance(s, VllmContainer)]
    for other in others:
        other.freeze(True)
    try:
        yield
    finally:
        for other in others:
            other.freeze(False)


def vllm_cpu_figures(args, serve) -> None:
    """serve: bench/serve.py (its model builder, Server, completion, concurrent), passed in to keep one copy."""
    from builder.model.gguf.router import models_max, router_preset

    adapters = serve.ADAPTERS
    files = serve.build_lora_models("q8_0")
    folder = files["base"].parent
    preset = folder / "preset.q8_0.ini"
    preset.write_text(router_preset("bench", adapters, str(files["base"]), {n: str(files[n]) for n in adapters}))
    image = os.environ.get("VLLM_CPU_IMAGE", "local/vllm-cpu:latest")
    load = os.getloadavg()[0]
    print(f"model: the random Llama of --lora (hidden 768, 12 layers), 3 LoRAs r=16 all-linear; vLLM {image} on the "
          f"HF folder ({', '.join(args.vllm_dtypes)}), llama-server router on the q8_0 GGUF (-t {args.threads}); "
          f"{os.cpu_count()} CPUs, load average {load:.1f} before; {args.tokens} new tokens a request (ignore_eos)")  # fmt: skip
    servers: dict[str, object] = {}
    ready: dict[str, float] = {}
    try:
        start = time.monotonic()
        router = serve.Server("router", preset, args.port, args.threads, ("--models-max", str(models_max(adapters))))
        serve.completion(router.url, 4, model="ad1")  # the children load on first use
        servers["llama-server q8_0"], ready["llama-server q8_0"] = router, time.monotonic() - start
        for k, dtype in enumerate(args.vllm_dtypes, 1):
            container = VllmContainer(image, folder, adapters, args.port + k, dtype)
            servers[f"vLLM {dtype}"], ready[f"vLLM {dtype}"] = container, container.ready_s
        one = {(s, m): [] for s in servers for m in ("bench", "ad1")}
        eight = {(s, m): [] for s in servers for m in ("base", "ad1-3")}
        for server in servers.values():  # warm-up
            serve.completion(server.url, 4, model="ad1")
        for r in range(args.repeat):
            print(f"round {r + 1}:", flush=True)
            for key in list(one)[r % len(one) :] + list(one)[: r % len(one)]:
                with alone(servers, key[0]):
                    n, s = serve.completion(servers[key[0]].url, args.tokens, model=key[1], ignore_eos=True)
                one[key].append(n / s)
                print(f"  1 client  {key[0]:<20} {key[1]:<6} {n / s:7.1f} tok/s", flush=True)
            for key in list(eight)[r % len(eight) :] + list(eight)[: r % len(eight)]:
                models = ("bench",) if key[1] == "base" else adapters
                with alone(servers, key[0]):
                    tps, _ = serve.concurrent(servers[key[0]].url, 8, args.tokens, models=models, ignore_eos=True)
                eight[key].append(tps)
                print(f"  8 clients {key[0]:<20} {key[1]:<6} {tps:7.1f} tok/s", flush=True)
        peak = {name: (s.peak_mb() if isinstance(s, VllmContainer) else tree_peak_mb(s.proc.pid))
                for name, s in servers.items()}  # fmt: skip
    finally:
        for server in servers.values():
            server.close()
    print(f"\nmedians of {args.repeat} alternating rounds, tokens/s; load average {os.getloadavg()[0]:.1f} after\n")
    print("| server | ready s | peak MB | 1 client base | 1 client ad1 | 8 clients base | 8 clients ad1-3 |")
    print("|---|---|---|---|---|---|---|")
    for name in servers:
        cells = [statistics.median(one[(name, "bench")]), statistics.median(one[(name, "ad1")]),
                 statistics.median(eight[(name, "base")]), statistics.median(eight[(name, "ad1-3")])]  # fmt: skip
        mb = f"{peak[name]:.0f}" if peak[name] else "?"
        print(f"| {name} | {ready[name]:.0f} | {mb} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
