"""The quality report: one entry per artifact, written as a JSON list, shown as a table, checked against
the user's threshold."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from builder.errors import BuilderError
from builder.files import write_atomic

HOW_TO_READ = (
    "KL: mean KL divergence of the artifact's next-token distribution from the reference's (0 = identical; "
    "llama.cpp's rule of thumb: < 0.01 hard to tell apart, > 0.1 noticeable). top-1: how often both pick "
    "the same next token. PPL ratio: perplexity of the artifact / of the reference on the same text. "
    "eval: prompts whose greedy answer is token for token the reference's; image eval: the same for the "
    "eval prompts with images (vision-language models: text GGUF + mmproj against the reference's)."
)


@dataclass
class QualityEntry:
    backend: str
    quant: str
    artifact: str
    size_bytes: int
    kl_mean: float
    kl_p99: float
    kl_max: float
    top1_agreement: float
    ppl: float
    ppl_base: float
    ppl_ratio: float
    kl_chunks: int
    eval_same: int
    eval_total: int
    eval_expected_found: int | None
    decode_tokens_per_s: float
    reference: str
    reference_size_bytes: int
    reference_decode_tokens_per_s: float
    reference_expected_found: int | None
    tool_version: str
    text: str
    imatrix: dict | None = None  # {"calibration": file name, "chunks": n} when llama-quantize had one
    wall_s: float = 0.0  # this artifact's measurement (KL run + eval server)
    peak_rss_mb: float = 0.0
    reference_wall_s: float = 0.0  # the reference's logits and answers, shared by every entry
    reference_peak_rss_mb: float = 0.0
    threads: int = 0
    eval: list[dict] = field(default_factory=list)
    image_eval_same: int = 0  # eval prompts with images (vision-language models) answered token for token alike
    image_eval_total: int = 0
    image_eval: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> QualityEntry:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def write_report(entries: Sequence[QualityEntry], path: Path) -> Path:
    """quality.json: the JSON list of entries (atomically)."""
    return write_atomic(path, json.dumps([e.to_dict() for e in entries], indent=2, ensure_ascii=False) + "\n")


def read_report(path: Path) -> list[QualityEntry]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise BuilderError(f"cannot read the quality report {path}: {e}") from None
    return [QualityEntry.from_dict(d) for d in data]


def _label(e: QualityEntry) -> str:
    return e.quant + ("+imatrix" if e.imatrix else "")


def summary(entries: Sequence[QualityEntry]) -> str:
    """One line for an image label: per artifact type, KL mean, top-1 and eval agreement."""
    seen, parts = set(), []
    for e in entries:
        if _label(e) in seen:
            continue
        seen.add(_label(e))
        images = f", image eval {e.image_eval_same}/{e.image_eval_total}" if e.image_eval_total else ""
        parts.append(
            f"{_label(e)}: KL {e.kl_mean:.4f}, top-1 {e.top1_agreement:.3f}, eval {e.eval_same}/{e.eval_total}{images}"
        )
    return "; ".join(parts)


def _mb(n: float) -> str:
    return f"{n / 1e6:,.0f}"


def table(entries: Sequence[QualityEntry], title: str | None = None):
    """A rich Table of the entries, the reference first."""
    from rich.table import Table

    first = entries[0]
    images = any(e.image_eval_total for e in entries)
    t = Table(title=title or f"quality vs {first.reference} ({first.tool_version}, {first.kl_chunks} x 512 tokens)")
    for col in (
        "backend",
        "type",
        "size MB",
        "KL mean",
        "KL p99",
        "top-1",
        "PPL ratio",
        "eval same",
        *(["image eval same"] if images else []),
        "decode tok/s",
        "time s",
        "peak RSS MB",
    ):
        t.add_column(col, justify="left" if col in ("backend", "type") else "right")
    ref_eval = "" if first.reference_expected_found is None else f"(expected {first.reference_expected_found})"
    t.add_row(
        "reference", "", _mb(first.reference_size_bytes), "0", "0", "1", "1", ref_eval, *([""] if images else []),
        f"{first.reference_decode_tokens_per_s:.1f}", f"{first.reference_wall_s:.1f}", f"{first.reference_peak_rss_mb:.0f}",
    )  # fmt: skip
    for e in entries:
        t.add_row(
            e.backend, _label(e), _mb(e.size_bytes), f"{e.kl_mean:.4f}", f"{e.kl_p99:.3f}", f"{e.top1_agreement:.3f}",
            f"{e.ppl_ratio:.3f}", f"{e.eval_same}/{e.eval_total}",
            *([f"{e.image_eval_same}/{e.image_eval_total}"] if images else []), f"{e.decode_tokens_per_s:.1f}", f"{e.wall_s:.1f}",
            f"{e.peak_rss_mb:.0f}",
        )  # fmt: skip
    return t


def eval_differences(entries: Sequence[QualityEntry]) -> list[str]:
    """One line per prompt whose answer differs from the reference's."""
    lines = []
    for e in entries:
        for part, rows in (("", e.eval), ("image prompt ", e.image_eval)):
            for row in rows:
                if not row.get("same"):
                    lines.append(
                        f"{e.backend} {_label(e)}: {part}{row['prompt'][:60]!r} differs from token "
                        f"{row['differs_at_token']}"
                    )
    return lines


def print_report(entries: Sequence[QualityEntry], console=None) -> None:
    from rich.console import Console

    if not entries:
        return
    if console is None:  # a log (make image, CI) is no terminal: wide enough for every column
        console = Console(soft_wrap=True)
        console = console if console.is_terminal else Console(soft_wrap=True, width=150)
    console.print(table(entries))
    for line in eval_differences(entries):
        console.print("  " + line)
    console.print(HOW_TO_READ, style="dim")


# GGUF types from least to most faithful, as measured (docs/quality.md: q4_k_m beats q5_0 on KL).
FIDELITY = ("q4_0", "q4_1", "q5_0", "q4_k_m", "q5_1", "q5_k_m", "q6_k", "q8_0", "bf16", "f16", "f32")


def _larger_type(quant: str) -> str:
    """The type to try when nothing measured passes: q8_0 below it, else the unquantized model."""
    rank = FIDELITY.index(quant) if quant in FIDELITY else -1
    return "QUANT=q8_0" if rank < FIDELITY.index("q8_0") else "QUANT=f16 (or bf16, unquantized)"


def _passing(entries: Sequence[QualityEntry], min_top1: float) -> list[QualityEntry]:
    return sorted((e for e in entries if e.top1_agreement >= min_top1), key=lambda e: e.size_bytes)


def check_threshold(
    entries: Sequence[QualityEntry],
    min_top1: float | None,
    min_eval_same: float | None = None,
    name: str = "QUALITY_MIN_TOP1",
) -> None:
    """BuilderError naming the metric, the value and a measured type that would pass, if any entry fails."""
    problems = []
    for e in entries:
        if min_top1 is not None and e.top1_agreement < min_top1:
            better = [p for p in _passing(entries, min_top1) if p.backend == e.backend] or _passing(entries, min_top1)
            hint = (
                f"{_label(better[0])} passes (top-1 agreement {better[0].top1_agreement:.3f}, {_mb(better[0].size_bytes)} MB)"
                if better
                else f"no measured type passes: {_larger_type(e.quant)} would (measure it: make quality QUANTS=...)"
            )
            problems.append(
                f"{e.backend} {_label(e)}: top-1 agreement {e.top1_agreement:.3f} is below {name}={min_top1:g} "
                f"(KL mean {e.kl_mean:.4f}); {hint}"
            )
        if min_eval_same is not None and e.eval_total and e.eval_same / e.eval_total < min_eval_same:
            problems.append(
                f"{e.backend} {_label(e)}: eval answers the same as the reference on {e.eval_same}/{e.eval_total} "
                f"prompts, below the minimum fraction {min_eval_same:g}"
            )
        if min_eval_same is not None and e.image_eval_total and e.image_eval_same / e.image_eval_total < min_eval_same:
            problems.append(
                f"{e.backend} {_label(e)}: eval prompts with images answered the same as the reference on "
                f"{e.image_eval_same}/{e.image_eval_total}, below the minimum fraction {min_eval_same:g}"
            )
    if problems:
        raise BuilderError("quality check failed:\n  " + "\n  ".join(problems))
