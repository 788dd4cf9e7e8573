"""Importance matrix from calibration text (`llama-imatrix`) and quantization with it (`llama-quantize`).

The matrix records, for every weight matrix, how strongly each input column is activated on the
user's own text; llama-quantize then spends its rounding error where it matters least. It is
computed on the reference (f16/bf16 GGUF, with the LoRA GGUFs applied when they are served
unmerged, so the activations are the fine-tuned model's).
"""

from __future__ import annotations

import re
from pathlib import Path

from builder.errors import BuilderError
from builder.files import atomic_file
from builder.model.quality.kld import NO_REPACK
from builder.model.quality.tools import Served, ToolRun, binary, run_tool, threads

# Types llama-quantize quantizes differently with an importance matrix (q8_0 and the float types ignore it).
USES_IMATRIX = frozenset(
    {
        "q4_0",
        "q4_1",
        "q5_0",
        "q5_1",
        "q2_k",
        "q3_k_s",
        "q3_k_m",
        "q3_k_l",
        "q4_k_s",
        "q4_k_m",
        "q5_k_s",
        "q5_k_m",
        "q6_k",
    }
)


def compute_imatrix(reference: Served, text: Path, out: Path, ctx: int = 512, chunks: int = 64) -> ToolRun:
    """The importance matrix of `reference` over `text` (GGUF format) at `out`, written atomically.

    The tool needs two chunks of text: a short calibration file is read in shorter chunks (down to 64 tokens)."""
    while True:
        try:
            return _imatrix_run(reference, text, out, ctx, chunks)
        except BuilderError as e:
            if "need at least" not in str(e) or ctx <= 64:
                raise
            ctx //= 2


def _imatrix_run(reference: Served, text: Path, out: Path, ctx: int, chunks: int) -> ToolRun:
    with atomic_file(out) as tmp:
        cmd = [
            str(binary("llama-imatrix")),
            *reference.args(),
            "-f",
            str(text),
            "-o",
            str(tmp),
            "--output-format",
            "gguf",
        ]
        cmd += ["-c", str(ctx), "-b", str(ctx), "--chunks", str(chunks), "-t", str(threads()), "--no-ppl", NO_REPACK]
        run = run_tool(cmd, f"llama-imatrix on {reference.describe()}")
        if not tmp.is_file() or tmp.stat().st_size == 0:
            raise BuilderError(f"llama-imatrix wrote no matrix:\n{run.output[-2000:]}")
    return run


def imatrix_chunks(output: str) -> int:
    """How many chunks of calibration text llama-imatrix used (0 if it does not say)."""
    m = re.search(r"computing over (\d+) chunks", output)
    return int(m.group(1)) if m else 0


def quantize(source: Path, quant: str, out: Path, imatrix: Path | None = None) -> ToolRun:
    """`source` (a float GGUF) quantized to `quant` at `out` (atomically), with the importance matrix if given."""
    with atomic_file(out) as tmp:
        cmd = [str(binary("llama-quantize"))]
        if imatrix is not None:
            cmd += ["--imatrix", str(imatrix)]
        cmd += [str(source), str(tmp), quant.upper(), str(threads())]
        run = run_tool(cmd, f"llama-quantize {quant}")
    return run
