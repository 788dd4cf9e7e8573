"""Benchmark: streamed LoRA merge (builder.model.merge) vs peft's merge_and_unload. Prints figures; asserts nothing.

Builds a random bf16 Llama (~0.9B params at multiplier 1: hidden 2048, 15 layers, 4 shards of ~500 MB)
and an r=16 all-linear LoRA for it, then runs each merge in its own fresh process and reports wall
time and peak RSS (ru_maxrss of that child, as /usr/bin/time -v reports it). Then the same at
--layers-multiplier x the layers (same tensor and shard sizes, so more shards) for ours, and for peft
too when MemAvailable allows it (peft holds the whole model: peak RSS ~1.25x its size).

    .venv/bin/python bench/merge.py                       # 1x and 4x
    .venv/bin/python bench/merge.py --layers-multiplier 1 # 1x only
    .venv/bin/python bench/merge.py --quick               # tiny model, seconds (smoke test of the script)
    .venv/bin/python bench/merge.py --verify              # also torch.equal every output tensor to peft's
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 1 << 30


def model_dims(quick: bool) -> dict:
    if quick:
        return dict(hidden=256, inter=688, vocab=4000, layers=4, heads=8, shard_mb=2)
    return dict(hidden=2048, inter=5632, vocab=32000, layers=15, heads=32, shard_mb=500)


def build_base(path: Path, dims: dict, layers: int) -> tuple[int, int]:
    """Write a random Llama checkpoint shard by shard (never the whole model in memory)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    h, i, v = dims["hidden"], dims["inter"], dims["vocab"]
    names: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for n in range(layers):
        p = f"model.layers.{n}."
        names += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (h, h)),
            (p + "self_attn.v_proj.weight", (h, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
        ]
    names += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    limit = dims["shard_mb"] * 10**6
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in names:
        nbytes = 2 * shape[0] * (shape[1] if len(shape) > 1 else 1)
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nbytes
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    weight_map, total, params = {}, 0, 0
    for k, group in enumerate(groups, 1):
        fname = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, shape in group:
            t = (
                torch.ones(shape, dtype=torch.bfloat16)
                if len(shape) == 1
                else torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=g)
            )
            tensors[name] = t
            weight_map[name] = fname
            total += t.numel() * 2
            params += t.numel()
        save_file(tensors, str(path / fname), metadata={"format": "pt"})
        del tensors
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    cfg = LlamaConfig(
        vocab_size=v, hidden_size=h, intermediate_size=i, num_hidden_layers=layers, num_attention_heads=dims["heads"],
        num_key_value_heads=dims["heads"], tie_word_embeddings=False, dtype="bfloat16",
    )  # fmt: skip
    cfg.save_pretrained(path)
    return params, len(groups)


def build_adapter(path: Path, dims: dict, layers: int, r: int = 16) -> None:
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    h, i = dims["hidden"], dims["inter"]
    shapes = {"q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "o_proj": (h, h),
              "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}  # fmt: skip
    g = torch.Generator().manual_seed(1)
    sd = {}
    for n in range(layers):
        for mod, (out_f, in_f) in shapes.items():
            kind = "self_attn" if mod.endswith("_proj") and mod[0] in "qkvo" else "mlp"
            p = f"base_model.model.model.layers.{n}.{kind}.{mod}."
            sd[p + "lora_A.weight"] = torch.empty(r, in_f, dtype=torch.bfloat16).normal_(0, 0.02, generator=g)
            sd[p + "lora_B.weight"] = torch.empty(out_f, r, dtype=torch.bfloat16).normal_(0, 0.02, generator=g)
    path.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    LoraConfig(r=r, lora_alpha=32, target_modules=list(shapes)).save_pretrained(path)


def child(kind: str, base: str, adapter: str, out: str) -> None:
    if kind == "ours":
        sys.path.insert(0, str(ROOT))
        from builder.model.merge import merge_model

        merge_model(base=Path(base), adapter=Path(adapter), out=Path(out), quiet=True)
    else:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        merged.save_pretrained(out, max_shard_size="500MB")


def measure(kind: str, base: Path, adapter: Path, out: Path, keep: bool = False) -> dict:
    """Run one merge in a fresh process; this wrapper is itself fresh so RUSAGE_CHILDREN is that run alone.
    Dirty pages (the model just built, the last run's output) are flushed first, so neither side's writes
    are throttled by writeback it did not cause."""
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    code = (
        "import json,resource,subprocess,sys,time;t=time.perf_counter();"
        f"rc=subprocess.call([sys.executable,{str(Path(__file__).resolve())!r},'--child',{kind!r},{str(base)!r},{str(adapter)!r},{str(out)!r}]);"
        "print(json.dumps({'rc':rc,'wall':time.perf_counter()-t,'rss_kib':(u:=resource.getrusage(resource.RUSAGE_CHILDREN)).ru_maxrss,'cpu':u.ru_utime+u.ru_stime}))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    line = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else "{}"
    data = json.loads(line) if line.startswith("{") else {"rc": res.returncode}
    if data.get("rc") != 0:
        data["error"] = res.stderr[-2000:]
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    return data


def compare_outputs(ours: Path, peft: Path) -> str:
    """torch.equal over every tensor of the two merged folders, one tensor in memory at a time."""
    import torch
    from safetensors import safe_open

    def tensors(folder: Path) -> dict[str, Path]:
        found = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), "pt") as st:
                found.update(dict.fromkeys(st.keys(), f))
        return found

    a, b = tensors(ours), tensors(peft)
    if set(a) != set(b):
        return f"tensor names differ: {sorted(set(a) ^ set(b))[:5]}"
    differ = []
    for name in sorted(a):
        with safe_open(str(a[name]), "pt") as fa, safe_open(str(b[name]), "pt") as fb:
            if not torch.equal(fa.get_tensor(name), fb.get_tensor(name)):
                differ.append(name)
    return (
        f"all {len(a)} tensors torch.equal"
        if not differ
        else f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:3]}"
    )


def fmt_run(r: dict) -> str:
    return f" {r['wall']:7.1f}s  cpu {r['cpu']:6.1f}s  peak RSS {r['rss_kib'] / (1 << 20):6.2f} GiB"


def median_run(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in ("wall", "cpu", "rss_kib")}


def free_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / (1 << 20)
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=4, metavar=("KIND", "BASE", "ADAPTER", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="tiny model: checks the script in seconds")
    ap.add_argument("--layers-multiplier", type=int, nargs="*", default=[1, 4], help="multipliers to run (default 1 4)")
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "builder-merge-bench")
    ap.add_argument("--peft-at-large", choices=["auto", "yes", "no"], default="auto",
                    help="run peft at multipliers > 1 (auto: only if MemAvailable > 2x the model size + 2 GiB)")  # fmt: skip
    ap.add_argument("--keep", action="store_true", help="keep the generated models")
    ap.add_argument("--verify", action="store_true", help="also check our output is bit-equal to peft's (slower)")
    ap.add_argument(
        "--repeat", type=int, default=3, help="runs of each side per size, alternating; medians are reported"
    )
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return

    dims = model_dims(args.quick)
    rows = []
    first_ours = None
    try:
        for mult in args.layers_multiplier:
            layers = dims["layers"] * mult
            base, adapter, out = (args.workdir / f"{x}-x{mult}" for x in ("base", "adapter", "out"))
            t = time.perf_counter()
            params, nshards = build_base(base, dims, layers)
            build_adapter(adapter, dims, layers)
            size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
            print(f"x{mult} (load average {os.getloadavg()[0]:.0f} on {os.cpu_count()} cores): {layers} layers, {params / 1e9:.2f}B params, {nshards} shards, {size / GIB:.2f} GiB bf16 "
                  f"(built in {time.perf_counter() - t:.0f}s)", flush=True)  # fmt: skip
            run_peft = (
                mult == 1
                or args.peft_at_large == "yes"
                or (args.peft_at_large == "auto" and free_gib() > 2 * size / GIB + 2)
            )
            peft_out = out.with_name(out.name + "-peft")
            runs: dict[str, list[dict]] = {"ours": [], "peft": []}
            for rep in range(args.repeat):
                keep = args.verify and rep == 0
                kinds = ["ours", "peft"] if run_peft else ["ours"]
                for kind in kinds if rep % 2 == 0 else kinds[::-1]:  # take turns going first (right after a build or
                    # another run, the first one pays for fresh memory pages)
                    runs[kind].append(measure(kind, base, adapter, out if kind == "ours" else peft_out, keep=keep))
                    print(f"  {kind}:" + fmt_run(runs[kind][-1]), flush=True)
                if keep and run_peft:
                    print(f"  bit-equal check: {compare_outputs(out, peft_out)}", flush=True)
                shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(peft_out, ignore_errors=True)
            errors = [r["error"] for r in runs["ours"] + runs["peft"] if "error" in r]
            if errors:
                print(errors[0])
                return
            ours = median_run(runs["ours"])
            peft = median_run(runs["peft"]) if run_peft else None
            print(f"  median of {args.repeat}: ours" + fmt_run(ours), flush=True)
            if peft is not None:
                print(f"  median of {args.repeat}: peft" + fmt_run(peft), flush=True)
                print(f"  ratio ours/peft: RSS {ours['rss_kib'] / peft['rss_kib']:.2f}x, wall {ours['wall'] / peft['wall']:.2f}x, "
                      f"cpu {ours['cpu'] / peft['cpu']:.2f}x", flush=True)  # fmt: skip
            else:
                print(f"  peft: skipped (MemAvailable {free_gib():.1f} GiB; pass --peft-at-large yes to force)")
            if first_ours is None:
                first_ours = (mult, ours)
            else:
                m0, o0 = first_ours
                print(f"  ours x{mult} vs x{m0}: RSS {ours['rss_kib'] / o0['rss_kib']:.2f}x, "
                      f"wall {ours['wall'] / o0['wall']:.2f}x for {mult // m0}x the weights", flush=True)  # fmt: skip
            rows.append(
                {"mult": mult, "layers": layers, "params": params, "shards": nshards, "ours": ours, "peft": peft}
            )
            if not args.keep:
                shutil.rmtree(base, ignore_errors=True)
                shutil.rmtree(adapter, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    print(json.dumps(rows, default=str))


if __name__ == "__main__":
    main()
