"""KL divergence, top-1 agreement and perplexity ratio with llama.cpp's own `llama-perplexity`.

Two runs: the reference (the f16/bf16 GGUF, with the same LoRA GGUFs as the artifact) saves its
log-probabilities over a text sample (`--kl-divergence-base FILE`); each quantized artifact then
reads them back (`--kl-divergence`) and prints its statistics against them. The tool scores the
second half of every `ctx`-token chunk, so 8 chunks of 512 score 8 x 255 tokens.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from builder.errors import BuilderError
from builder.model.quality.tools import Served, ToolRun, binary, run_tool, threads

NUMBER = r"([-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|-?inf))"


@dataclass(frozen=True)
class KLStats:
    kl_mean: float
    kl_p99: float
    kl_max: float
    top1_agreement: float  # fraction of scored tokens where both models' most likely token is the same
    ppl: float  # PPL(Q): the artifact's perplexity on the sample
    ppl_base: float  # PPL(base): the reference's
    ppl_ratio: float  # PPL(Q)/PPL(base) as the tool computes it (exp of the mean log ratio)
    chunks: int

    def as_dict(self) -> dict:
        return {
            "kl_mean": self.kl_mean,
            "kl_p99": self.kl_p99,
            "kl_max": self.kl_max,
            "top1_agreement": self.top1_agreement,
            "ppl": self.ppl,
            "ppl_base": self.ppl_base,
            "ppl_ratio": self.ppl_ratio,
            "kl_chunks": self.chunks,
        }


def _field(text: str, label: str) -> float | None:
    """The first number after `label` (a regex) and a colon, or None when the line is absent."""
    m = re.search(label + r"\s*:\s*" + NUMBER, text)
    return float(m.group(1)) if m else None


def _errors(text: str) -> str:
    """The lines of a tool log that explain a failure (the tool often exits 0 after one)."""
    keep = [
        ln for ln in text.splitlines() if re.search(r"error|failed|need at least|inconsistent|increase it", ln, re.I)
    ]
    return "\n".join(keep[-8:]) or "\n".join(text.splitlines()[-8:])


def parse_kl_output(text: str) -> KLStats:
    """The statistics block `llama-perplexity --kl-divergence` prints; BuilderError naming what is missing."""
    fields = {
        "kl_mean": _field(text, r"Mean\s+KLD"),
        "kl_p99": _field(text, r"99\.0%\s+KLD"),
        "kl_max": _field(text, r"Maximum\s+KLD"),
        "top1": _field(text, r"Same top p"),
        "ppl": _field(text, r"Mean PPL\(Q\)"),
        "ppl_base": _field(text, r"Mean PPL\(base\)"),
        "ppl_ratio": _field(text, r"Mean PPL\(Q\)/PPL\(base\)"),
    }
    missing = [k for k, v in fields.items() if v is None]
    if missing:
        raise BuilderError(
            f"llama-perplexity printed no {', '.join(missing)} (too little text? it needs at least 2 chunks "
            f"and 100 scored tokens):\n{_errors(text)}"
        )
    m = re.search(r"computing over (\d+) chunks", text)
    return KLStats(
        kl_mean=fields["kl_mean"],
        kl_p99=fields["kl_p99"],
        kl_max=fields["kl_max"],
        top1_agreement=fields["top1"] / 100.0,
        ppl=fields["ppl"],
        ppl_base=fields["ppl_base"],
        ppl_ratio=fields["ppl_ratio"],
        chunks=int(m.group(1)) if m else 0,
    )


def parse_base_output(text: str) -> float:
    """The reference's perplexity from its `--kl-divergence-base` run ('Final estimate: PPL = ...')."""
    m = re.search(r"Final estimate: PPL = " + NUMBER, text)
    if not m:
        raise BuilderError(f"llama-perplexity saved no reference logits:\n{_errors(text)}")
    ppl = float(m.group(1))
    if not math.isfinite(ppl):
        raise BuilderError(f"the reference model's perplexity is {ppl}: its GGUF is broken (NaN or inf logits)")
    return ppl


# --no-repack: no extra CPU buffer types. With them, the pinned commit's AMX kernel crashes (SIGSEGV in
# ggml_backend_amx_mul_mat) on q8_0 in --kl-divergence on AMX CPUs (Sapphire Rapids and later); the
# weights and the results are the same, only the kernel that multiplies them differs.
NO_REPACK = "--no-repack"


def _common(ctx: int) -> list[str]:
    # -b = ctx: one sequence per batch, so the scores do not depend on how chunks are batched together.
    return ["-c", str(ctx), "-b", str(ctx), "-t", str(threads()), "--no-warmup", NO_REPACK]


def save_reference_logits(
    reference: Served, text: Path, logits: Path, ctx: int = 512, chunks: int = 8
) -> tuple[float, ToolRun]:
    """Run the reference over `text`, saving its log-probabilities to `logits`; returns its PPL and the run."""
    cmd = [str(binary("llama-perplexity")), *reference.args(), "-f", str(text), "--kl-divergence-base", str(logits)]
    cmd += [*_common(ctx), "--chunks", str(chunks)]
    run = run_tool(cmd, f"llama-perplexity on the reference {reference.describe()}")
    if not Path(logits).is_file() or Path(logits).stat().st_size <= 16:
        raise BuilderError(f"llama-perplexity wrote no reference logits to {logits}:\n{_errors(run.output)}")
    return parse_base_output(run.output), run


def kl_divergence(artifact: Served, logits: Path, ctx: int = 512) -> tuple[KLStats, ToolRun]:
    """The artifact's statistics against the reference's saved log-probabilities."""
    cmd = [str(binary("llama-perplexity")), *artifact.args(), "--kl-divergence-base", str(logits), "--kl-divergence"]
    run = run_tool([*cmd, *_common(ctx)], f"llama-perplexity --kl-divergence on {artifact.describe()}")
    return parse_kl_output(run.output), run
