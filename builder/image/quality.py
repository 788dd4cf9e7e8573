"""The quality step on the host: which images `make image` measures (QUALITY), collecting the reports
their `quality` build stage writes into build/NAME/quality.json with the cost of the step, the image
label, the QUALITY_MIN_TOP1 check; and `builder quality` (`make quality`): several GGUF types of one
model side by side.

The measuring itself is builder/model/quality (llama.cpp's llama-perplexity and llama-server against
the f16/bf16 reference); this module only decides, collects and reports.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from builder import backends
from builder.errors import BuilderError
from builder.model.quality.report import QualityEntry, check_threshold, print_report, read_report, summary, write_report
from builder.spec import BuildSpec

console = Console(stderr=True)
# QUALITY=auto measures local models whose weight files total at most this: ~2B parameters at 16 bit.
# Measured on 2 cores (docs/quality.md): 135M ~1 min and < 0.5 GB, 0.9B ~4 min and 2 GB; a 7B reference
# alone would be ~10 min and ~15 GB of RSS, so larger models are measured on request (QUALITY=on).
AUTO_MAX_WEIGHT_BYTES = 4_500_000_000
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
LABEL = "io.llm-builder.quality"  # the image label holding `summary()` of its entries


@dataclass
class Plan:
    backends: list[str]  # the chosen backends whose images are measured
    reason: str  # why (or why not), one line for the log


def weight_bytes(model: Path) -> int:
    """Bytes of the weight files in a model folder (what the reference's size follows)."""
    return sum(p.stat().st_size for p in Path(model).iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def plan(spec: BuildSpec, chosen: Sequence[str]) -> Plan:
    """The images the quality step measures: the GGUF ones (llama-perplexity reads GGUF only), unless
    QUALITY=off; under QUALITY=auto only local models up to AUTO_MAX_WEIGHT_BYTES (a QUALITY_MIN_TOP1
    asks for the measurement whatever the size)."""
    gguf = [b for b in chosen if backends.get(b).serves_gguf(spec)]
    if not gguf:
        return Plan([], "no chosen backend serves a GGUF (the quality step measures GGUF files)")
    if spec.quality == "off":
        return Plan([], "QUALITY=off")
    if spec.quality == "on" or spec.quality_min_top1 is not None:
        return Plan(gguf, "QUALITY=on" if spec.quality == "on" else f"QUALITY_MIN_TOP1={spec.quality_min_top1:g}")
    if spec.model_source != "local":
        return Plan([], "QUALITY=auto measures local models only (a hub model's size is unknown here); QUALITY=on")
    size = weight_bytes(Path(spec.model))
    if size > AUTO_MAX_WEIGHT_BYTES:
        return Plan(
            [],
            f"QUALITY=auto: the weights are {size / 1e9:.1f} GB, above {AUTO_MAX_WEIGHT_BYTES / 1e9:.1f} GB "
            "(~2B parameters, minutes on 2 cores); QUALITY=on measures it, `make quality` compares types",
        )
    return Plan(gguf, f"QUALITY=auto: {size / 1e9:.2f} GB of weights")


def collect(
    measured: Sequence[str], build_report: Callable[[str, Path], None], root: Path
) -> tuple[list[QualityEntry], float]:
    """Run each measured backend's `quality` stage (`build_report(backend, folder)` leaves its quality.json
    in the folder), label its entries with the backend, write root/quality.json; entries and wall seconds."""
    start = time.monotonic()
    entries: list[QualityEntry] = []
    for backend in measured:
        folder = root / "quality" / backend
        build_report(backend, folder)
        found = read_report(folder / "quality.json")
        if not found:
            raise BuilderError(f"{backend}'s quality stage wrote an empty report ({folder / 'quality.json'})")
        for entry in found:
            entry.backend = backend
        entries += found
    write_report(entries, root / "quality.json")
    return entries, time.monotonic() - start


def label(entries: Sequence[QualityEntry], backend: str) -> str:
    """The io.llm-builder.quality label of one backend's image ("" when it was not measured)."""
    mine = [e for e in entries if e.backend == backend]
    return f"{summary(mine)} (vs {mine[0].reference})" if mine else ""


def cost_line(entries: Sequence[QualityEntry], wall_s: float) -> str:
    """What the step cost: the host's wall time (the stage builds) and the tools' time and peak RSS."""
    if not entries:
        return ""
    first = entries[0]
    tools = first.reference_wall_s + sum({e.artifact: e.wall_s for e in entries}.values())
    peak = max([first.reference_peak_rss_mb, *(e.peak_rss_mb for e in entries)])
    return (
        f"quality step: {wall_s:.0f} s in all (reference {first.reference_wall_s:.0f} s, "
        f"{len(entries)} artifact(s); measuring {tools:.0f} s), peak RSS {peak:.0f} MB, {first.threads} threads"
    )


def report_and_check(entries: Sequence[QualityEntry], wall_s: float, min_top1: float | None, path: Path) -> None:
    """The table, the cost and where the report is; then QUALITY_MIN_TOP1 (BuilderError naming a passing type)."""
    if not entries:
        return
    # beside the build's other output (stderr), as wide as the table in a log
    print_report(entries, console if console.is_terminal else Console(stderr=True, soft_wrap=True, width=150))
    console.print(cost_line(entries, wall_s), soft_wrap=True)  # one line each in logs (no wrap at 80)
    console.print(f"quality report: {path}", soft_wrap=True)
    check_threshold(entries, min_top1, name="QUALITY_MIN_TOP1")


# -- `builder quality` (make quality) ------------------------------------------------------------------


def compare(
    spec: BuildSpec,
    quants: Sequence[str],
    out: Path,
    *,
    calibration: Path | None = None,
    adapter: Path | None = None,
) -> list[QualityEntry]:
    """Quantize the model (the adapter merged in first) to each type, measure all against its f16/bf16
    reference; write out/quality.json, print the table and the cost; QUALITY_MIN_TOP1 names the types
    that pass (a comparison does not fail on the others)."""
    from builder.model.quality import compare_quants, imatrix_effect

    if spec.model_source != "local":
        raise BuilderError("`make quality` measures a local model folder: pass MODEL=<folder>")
    start = time.monotonic()
    model = Path(spec.model)
    if adapter is not None:
        from builder.model.merge import merge_model

        console.print(f"merging {adapter} into {model}")
        model = merge_model(base=model, adapter=adapter, out=out / "merged", force=True, quiet=True)
    entries = compare_quants(model, quants, out, eval_file=spec.quality_eval, calibration=calibration)
    path = write_report(entries, out / "quality.json")
    print_report(entries)
    for row in imatrix_effect(entries):
        console.print(f"importance matrix, {row['quant']}: KL mean {row['kl_mean'][0]:.4f} -> {row['kl_mean'][1]:.4f}")
    peak_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    console.print(
        f"quality comparison: {time.monotonic() - start:.0f} s in all (conversion, quantization, measuring), "
        f"largest tool process {peak_children:.0f} MB RSS; report: {path}"
    )
    if spec.quality_min_top1 is not None:
        passing = [e for e in entries if e.top1_agreement >= spec.quality_min_top1]
        names = ", ".join(f"{e.quant}{'+imatrix' if e.imatrix else ''}" for e in passing) or "none"
        console.print(f"types passing QUALITY_MIN_TOP1={spec.quality_min_top1:g}: {names}")
    return entries


def parse_quants(value: str) -> list[str]:
    """QUANTS=q8_0,q4_k_m -> the GGUF types, checked."""
    from builder.model.gguf.convert import FLOAT_TYPES, QUANTS

    quants = [q.strip().lower() for q in value.split(",") if q.strip()]
    bad = [q for q in quants if q not in QUANTS or q in FLOAT_TYPES]
    if not quants or bad:
        choices = ", ".join(q for q in QUANTS if q not in FLOAT_TYPES)
        raise BuilderError(f"QUANTS={value!r}: give a comma list of quantized GGUF types ({choices})")
    return quants
