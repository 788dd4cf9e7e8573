"""The models bench/lora_router/router_vs_single.py serves (run from the repo root first:
PYTHONPATH=$PWD .venv/bin/python bench/lora_router/make_models.py; LORA_BENCH_DIR=folder). A ~85M-parameter random Llama (hidden 768, 12 layers), f16 and q4_k_m GGUFs, 3 r=16 all-linear LoRAs."""

import os
import sys
import time
from pathlib import Path

sys.path[:0] = ["tests"]
import torch  # noqa: E402
from _tiny_hf import make_adapter  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from builder.demo.tiny import make_random_llama  # noqa: E402
from builder.model.gguf.convert import convert_gguf  # noqa: E402
from builder.model.gguf.lora import convert_lora  # noqa: E402

root = Path(os.environ.get("LORA_BENCH_DIR", "/tmp/lora-scratch/router"))
base = root / "base"
if not base.exists():
    make_random_llama(base, hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=4, intermediate_size=2048)
m = AutoModelForCausalLM.from_pretrained(base)
print("params", sum(p.numel() for p in m.parameters()) / 1e6, "M")
for q in ("f16", "q4_k_m"):
    if not (root / f"base-{q}.gguf").exists():
        t = time.time()
        convert_gguf(base, q, root / f"base-{q}.gguf", quiet=True)
        print(q, time.time() - t)
for i in range(1, 4):
    ad = root / f"ad{i}"
    if not ad.exists():
        make_adapter(
            AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
            ad,
            seed=10 + i,
            base_path=str(base),
            r=16,
            lora_alpha=32,
            target_modules="all-linear",
        )
    if not (root / f"ad{i}.gguf").exists():
        t = time.time()
        r = convert_lora(ad, None, root / f"ad{i}.gguf", quiet=True)
        print(r.path, r.size, time.time() - t)
for f in sorted(root.glob("*.gguf")):
    print(f.name, f.stat().st_size)
