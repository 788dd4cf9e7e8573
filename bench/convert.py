"""Peak RSS and wall time of builder.model.convert against the anchor (full state dict + chatglm.cpp's converter).

The anchor is what chatglm.cpp's own `convert()` does: load the whole model in float32, then hand its
state dict to `ChatGLM4Converter.convert`. Ours streams one tensor at a time into the same converter.
Each run is a separate subprocess that reports its own ru_maxrss; the two output files must be
byte-identical.

    .venv/bin/python bench/convert.py                       # ~490 MB bf16 native GLM, q4_0
    .venv/bin/python bench/convert.py --layers 4 --quant f16
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child_baseline(model: Path, out: Path, quant: str) -> None:
    """Just the imports both sides need (torch, transformers, chatglm.cpp's convert.py)."""
    from builder.model.convert import load_chatglm_convert

    load_chatglm_convert()


def child_ours(model: Path, out: Path, quant: str) -> None:
    from builder.model.convert import convert_model

    convert_model(model, quant=quant, out=out, quiet=True)


def child_anchor(model: Path, out: Path, quant: str) -> None:
    """Whole model in memory (float32, as AutoModel.from_pretrained loads it), then chatglm.cpp's converter."""
    import contextlib
    import io
    from types import SimpleNamespace

    import torch
    from transformers import GlmForCausalLM

    from builder.model.convert import _chatglm_config, _plan, load_chatglm_convert
    from builder.model.convert.layouts import GlmToChatGLM
    from builder.model.convert.vocab import glm4_vocab

    cc = load_chatglm_convert()
    hf = GlmForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    config = json.loads((model / "config.json").read_text())
    plan = _plan(config)
    renamed = GlmToChatGLM(hf.state_dict(), plan.layers, plan.tied, hidden_size=plan.heads * plan.head_dim,
                           kv_dim=plan.kv_heads * plan.head_dim)  # fmt: skip
    state = {
        name: renamed[name] for name in renamed.names()
    }  # the whole converted state dict, as a manual run holds it

    text, n, _ = glm4_vocab(model)
    vocab_file = out.with_suffix(".tiktoken")
    vocab_file.write_bytes(text)
    adapter = SimpleNamespace(config=_chatglm_config(plan, config, n), state_dict=lambda: state)
    cc.tqdm = lambda it, **kw: it
    with open(out, "wb") as f, contextlib.redirect_stdout(io.StringIO()):
        cc.ChatGLM4Converter.convert(
            f, adapter, SimpleNamespace(vocab_file=str(vocab_file)), cc.GGMLType[quant.upper()]
        )
    vocab_file.unlink()


CHILDREN = {"baseline": child_baseline, "ours": child_ours, "anchor": child_anchor}


def run_child(kind: str, model: Path, out: Path, quant: str) -> dict:
    cmd = [sys.executable, __file__, "--_child", kind, str(model), str(out), quant]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{r.stderr[-3000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["wall_s"] = wall
    return res


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--quant", default="q4_0")
    ap.add_argument("--workdir", type=Path, help="Keep the model and outputs here (default: a temp folder).")
    ap.add_argument("--repeat", type=int, default=1, help="Runs per side; the best wall time is reported.")
    args = ap.parse_args()

    from tabulate import tabulate

    # The parent stays small (no torch): Linux carries ru_maxrss across fork+exec into the children.
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-convert-")
        args.workdir = Path(tmp.name)
    work = args.workdir
    model = work / "glm"
    if not (model / "config.json").is_file():
        t0 = time.perf_counter()
        code = (
            "import sys, torch; sys.path.insert(0, sys.argv[1]); from builder.demo.tiny import make_random_glm; "
            "make_random_glm(sys.argv[2], hidden_size=int(sys.argv[3]), num_layers=int(sys.argv[4]), "
            "num_heads=int(sys.argv[5]), num_kv_heads=int(sys.argv[6]), intermediate_size=int(sys.argv[7]), "
            "dtype=torch.bfloat16)"
        )
        dims = [args.hidden, args.layers, args.heads, args.kv_heads, args.intermediate]
        subprocess.run(
            [sys.executable, "-c", code, str(REPO), str(model), *map(str, dims)], check=True, capture_output=True
        )
        print(f"built model in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    size_mb = sum(p.stat().st_size for p in model.glob("*.safetensors")) / 2**20
    n_params = size_mb * 2**20 / 2

    rows, results = [], {}
    for kind in ("baseline", "ours", "anchor"):
        out = work / f"{kind}-{args.quant}.bin"
        runs = [run_child(kind, model, out, args.quant) for _ in range(args.repeat)]
        best = min(runs, key=lambda r: r["wall_s"])
        best["maxrss_mb"] = max(r["maxrss_mb"] for r in runs)
        results[kind] = best
        rows.append([kind, f"{best['maxrss_mb']:.0f}", f"{best['wall_s']:.1f}", f"{best['inner_s']:.1f}"])
    same = sha256(work / f"ours-{args.quant}.bin") == sha256(work / f"anchor-{args.quant}.bin")
    ratio = results["ours"]["maxrss_mb"] / results["anchor"]["maxrss_mb"]
    print(
        f"model: native GLM, {n_params / 1e6:.0f}M params, bf16 safetensors {size_mb:.0f} MB "
        f"(hidden {args.hidden}, {args.layers} layers, ffn {args.intermediate}); quant {args.quant}"
    )
    print(tabulate(rows, headers=["run", "peak RSS MB", "wall s (process)", "convert s"], tablefmt="github"))
    over = (results["ours"]["maxrss_mb"] - results["baseline"]["maxrss_mb"]) / max(
        results["anchor"]["maxrss_mb"] - results["baseline"]["maxrss_mb"], 1e-9
    )
    print(f"peak RSS ours/anchor = {ratio:.3f} (target <= 0.35); above import baseline: {over:.3f}")
    print(f"output files byte-identical: {same}")
    if tmp is not None:
        tmp.cleanup()
    if not same or ratio > 0.35:
        raise SystemExit(1)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_child":
        kind, model, out, quant = sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), sys.argv[5]
        t0 = time.perf_counter()
        CHILDREN[kind](model, out, quant)
        print(json.dumps({"maxrss_mb": _maxrss_mb(), "inner_s": time.perf_counter() - t0}))
    else:
        main()
