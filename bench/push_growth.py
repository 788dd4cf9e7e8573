"""What a fine-tune costs in a registry: build time and registry growth for a first and a second
fine-tune of the same base, merged (LORA=merge) vs served unmerged (LORA=serve), and the GGUF stored once
when the llama.cpp and Xinference images both carry it. Prints figures, asserts nothing.

A random Llama (default hidden 2048, 16 layers, FFN 5632: 0.72B parameters with the small test vocabulary,
bf16: 1448 MB) and two r=16 all-linear peft LoRAs, made once into --out. Each scenario pushes into a registry of its own (docker-registry on
127.0.0.1:5055 with empty storage), so "first push" is what a new registry receives:

  merge    BACKEND=llamacpp LORA=merge QUANT=q4_k_m: fine-tune 1 built and pushed, then fine-tune 2 (same repository)
  serve    the same with LORA=serve: base GGUF + adapter GGUF layers
  shared   BACKEND=llamacpp,xinference LORA=merge, fine-tune 1: both images pushed

Needs the e2e environment: scripts/harness.sh engine-up bases (run here), docker-registry (Debian package).
Build times depend on BuildKit's cache: the llama.cpp compile and the Python stages are cached after the first
scenario (and after `make e2e`); the model stages are not, as each model here is new.

    .venv/bin/python bench/push_growth.py [--hidden 2048 --layers 16 --ffn 5632] [--out .cache/bench/push]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from builder import backends  # noqa: E402
from builder.image.build import build  # noqa: E402
from builder.image.docker import Docker  # noqa: E402
from builder.image.push import manifest_layers, push  # noqa: E402
from builder.spec import BuildSpec, load_spec  # noqa: E402

SPEC = REPO / "tests" / "e2e" / "local-bases.yaml"
# The images that carry a GGUF (llama.cpp's, Xinference's on its llama.cpp engine), and of those the one that
# serves adapters unmerged (llama.cpp).
GGUF_IMAGES = [n for n in backends.NAMES if backends.get(n).serves_gguf(BuildSpec())]
UNMERGED = [n for n in GGUF_IMAGES if backends.get(n).serves_adapters]
PORT = 5055
MB = 1e6


def make_models(out: Path, hidden: int, layers: int, ffn: int) -> tuple[Path, list[Path]]:
    """The base (bf16) and two adapters, made once."""
    import torch
    from _tiny_hf import make_adapter
    from transformers import AutoModelForCausalLM

    from builder.demo.tiny import make_random_llama

    base = out / f"llama-{hidden}x{layers}"
    if not (base / "config.json").is_file():
        make_random_llama(base, hidden_size=hidden, num_layers=layers, num_heads=hidden // 64,
                          num_kv_heads=max(1, hidden // 256), intermediate_size=ffn, dtype=torch.bfloat16)  # fmt: skip
    adapters = []
    for i in (1, 2):
        path = out / f"{base.name}-ft{i}"
        if not (path / "adapter_config.json").is_file():
            model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
            make_adapter(model, path, seed=i, base_path=str(base), r=16, lora_alpha=32, target_modules="all-linear")
        adapters.append(path)
    return base, adapters


class Registry:
    """docker-registry on 127.0.0.1:PORT over an empty storage folder; bytes() = what it stores."""

    def __init__(self, work: Path):
        self.storage = work / "storage"
        self.storage.mkdir(parents=True)
        config = work / "config.yml"
        config.write_text(
            f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {self.storage}\n"
            f"http:\n  addr: 127.0.0.1:{PORT}\n"
        )
        self.proc = subprocess.Popen(["docker-registry", "serve", str(config)], stderr=subprocess.DEVNULL)
        for _ in range(60):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{PORT}/v2/", timeout=2).close()
                return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("docker-registry did not answer")

    def bytes(self) -> int:
        return sum(f.stat().st_size for f in self.storage.rglob("*") if f.is_file() and not f.is_symlink())

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)


def gguf_sizes(docker: Docker, image: str) -> dict[str, int]:
    """{path: bytes} of the GGUF files in an image (the base and any adapter)."""
    res = docker.run("run", "--rm", "--entrypoint", "find", image, "/models", "-name", "*.gguf", "-printf", "%p %s\n")
    return {line.split()[0]: int(line.split()[1]) for line in res.stdout.splitlines()}


def scenario(name: str, base: Path, adapters: list[Path], work: Path, docker: Docker, **spec_kw) -> list[dict]:
    """Build + push each adapter in turn (same repository, tags ft1, ft2) into a fresh registry."""
    registry = Registry(work / f"registry-{name}")
    rows = []
    try:
        for i, adapter in enumerate(adapters, 1):
            spec = load_spec({"model": str(base), "adapters": {"tuned": str(adapter)}, "quant": "q4_k_m",
                              "quality": "off", "spec_file": SPEC, "name": f"bench-push-{name}", "tag": f"ft{i}",
                              "registry": f"127.0.0.1:{PORT}", **spec_kw})  # fmt: skip
            t0 = time.perf_counter()
            built = build(spec, workdir=work / "build", env_file=work / f"{name}-ft{i}.env", docker=docker)
            t1 = time.perf_counter()
            before = registry.bytes()
            refs = push(spec, docker=docker)
            t2 = time.perf_counter()
            ggufs = {}
            for b in built:
                ggufs.update(gguf_sizes(docker, b.image))
            layers = [manifest_layers(docker, ref) for ref in refs]
            unique = {d: size for blobs in layers for d, size in blobs.items()}
            shared = [d for d in unique if sum(d in blobs for blobs in layers) > 1 and unique[d] > 1024]
            rows.append({"scenario": name, "fine-tune": i, "build_s": t1 - t0, "push_s": t2 - t1,
                         "registry_growth_mb": (registry.bytes() - before) / MB,
                         "gguf_mb": {k: v / MB for k, v in ggufs.items()},
                         "image_layers_mb": sum(unique.values()) / MB,
                         "shared_layers_mb": [unique[d] / MB for d in shared]})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    finally:
        registry.stop()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--out", type=Path, default=REPO / ".cache" / "bench" / "push")
    ap.add_argument("--scenarios", default="merge,serve,shared")
    args = ap.parse_args()
    if not shutil.which("docker-registry"):
        sys.exit("docker-registry not found: scripts/harness.sh engine-up installs it")
    subprocess.run(["bash", str(REPO / "scripts" / "harness.sh"), "engine-up"], check=True)
    bases = ",".join(filter(None, (backends.get(n).demo.harness_base for n in GGUF_IMAGES)))
    subprocess.run(["bash", str(REPO / "scripts" / "harness.sh"), "bases"], check=True,
                   env={**os.environ, "HARNESS_BASES": bases})  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    base, adapters = make_models(args.out, args.hidden, args.layers, args.ffn)
    docker = Docker.detect()
    rows = []
    with tempfile.TemporaryDirectory(prefix="push-growth-") as tmp:
        work = Path(tmp)
        wanted = args.scenarios.split(",")
        if "merge" in wanted:
            rows += scenario("merge", base, adapters, work, docker, backends=UNMERGED[0], lora_mode="merge")
        if "serve" in wanted:
            rows += scenario("serve", base, adapters, work, docker, backends=UNMERGED[0], lora_mode="serve")
        if "shared" in wanted:
            rows += scenario(
                "shared", base, adapters[:1], work, docker, backends=",".join(GGUF_IMAGES), lora_mode="merge"
            )
    report(base, rows)


def report(base: Path, rows: list[dict]) -> None:
    safetensors = sum(f.stat().st_size for f in base.glob("*.safetensors")) / MB
    print(f"\nbase {base.name}: {safetensors:.0f} MB bf16 safetensors; QUANT q4_k_m; adapters r=16 all-linear")
    print("registry +MB: what the registry's storage grew by; layers MB: the pushed images' distinct compressed")
    print("layers; shared MB: those more than one image of the push references (the registry stores them once)")
    print(f"{'scenario':<8} {'fine-tune':>9} {'build s':>8} {'push s':>7} {'registry +MB':>13} {'layers MB':>10}  "
          f"{'shared MB':>9}  GGUFs in the image(s) (MB)")  # fmt: skip
    for r in rows:
        ggufs = ", ".join(f"{Path(k).name} {v:.1f}" for k, v in r["gguf_mb"].items())
        shared = ", ".join(f"{v:.1f}" for v in r["shared_layers_mb"]) or "-"
        print(f"{r['scenario']:<8} {r['fine-tune']:>9} {r['build_s']:>8.0f} {r['push_s']:>7.0f} "
              f"{r['registry_growth_mb']:>13.1f} {r['image_layers_mb']:>10.1f}  {shared:>9}  {ggufs}")  # fmt: skip


if __name__ == "__main__":
    main()
