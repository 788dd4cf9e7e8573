"""Peak RSS and wall time of the GGUF conversion: llama.cpp's converter in lazy mode (what builder runs)
against its eager mode (--no-lazy: every tensor in memory before the file is written), on a random
bf16 GLM (default ~246M parameters, ~490 MB, the GGML bench's model). Peak RSS is the converter
process's VmHWM; quantized types add llama-quantize (a separate process, mmaps its input).

    .venv/bin/python bench/convert_gguf.py                  # f16 and q4_0, lazy vs eager
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    import torch

    from builder.demo.tiny import make_random_glm
    from builder.model.gguf.convert import convert_gguf

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--intermediate", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--quant", action="append", default=None, help="f16, q4_0, ... (repeatable)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-gguf-") as tmp:
        model = make_random_glm(
            Path(tmp) / "glm", hidden_size=a.hidden, num_layers=a.layers, num_heads=a.hidden // 128,
            num_kv_heads=2, intermediate_size=a.intermediate, dtype=torch.bfloat16,
        )  # fmt: skip
        size = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 1e6
        print(f"model: random GLM bf16, {size:.0f} MB of safetensors")
        for quant in a.quant or ["f16", "q4_0"]:
            for eager in (False, True):
                t0 = time.perf_counter()
                out = convert_gguf(model, quant, Path(tmp) / f"m-{quant}-{eager}.gguf", quiet=True, eager=eager)
                took = time.perf_counter() - t0
                mode = "eager (--no-lazy)" if eager else "lazy (builder)   "
                print(f"  {quant:<5} {mode}: converter peak RSS {out.converter_peak_rss_mb:6.0f} MB, {took:5.1f} s")


if __name__ == "__main__":
    main()
