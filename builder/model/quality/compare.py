"""Several GGUF types side by side (`make quality QUANTS=q8_0,q5_k_m,q4_k_m,q4_0`): each quantized from
the same f16/bf16 reference, with an importance matrix from the user's calibration data too when
one is given, and all measured against that reference."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from builder.errors import BuilderError
from builder.files import write_atomic
from builder.model.quality.imatrix import USES_IMATRIX, compute_imatrix, imatrix_chunks, quantize
from builder.model.quality.measure import Artifact, Settings, log, measure
from builder.model.quality.prompts import calibration_text
from builder.model.quality.report import QualityEntry
from builder.model.quality.tools import Served


def reference_type(model: Path) -> str:
    """The reference's GGUF type for an HF folder: bf16 for bf16 weights, else f16."""
    from builder.model.gguf.convert import source_float_type

    return "bf16" if source_float_type(Path(model)) == "bf16" else "f16"


def _source_stamp(model: Path) -> str:
    """The folder and its files' names, sizes and times: a model merged again into the same folder is new."""
    files = sorted(p for p in model.iterdir() if p.is_file())
    return "\n".join([str(model.resolve()), *(f"{p.name} {p.stat().st_size} {p.stat().st_mtime_ns}" for p in files)])


def reference_gguf(model: Path, out_dir: Path, quiet: bool = True) -> Path:
    """The reference GGUF of an HF model folder (converted once into `out_dir`, reused after)."""
    from builder.model.gguf.convert import convert_gguf

    ftype = reference_type(model)
    out = Path(out_dir) / f"reference-{ftype}.gguf"
    stamp = out.with_suffix(".source")
    source = _source_stamp(Path(model))
    if out.is_file() and stamp.is_file() and stamp.read_text() == source:
        return out
    convert_gguf(Path(model), ftype, out, quiet=quiet)
    write_atomic(stamp, source)
    return out


def _imatrix_for(reference: Served, calibration: Path, out_dir: Path, progress) -> tuple[Path, dict]:
    text = out_dir / "calibration.txt"
    text.write_text(calibration_text(calibration), encoding="utf-8")
    matrix = out_dir / "imatrix.gguf"
    progress(f"importance matrix from {calibration.name}")
    run = compute_imatrix(reference, text, matrix)
    info = {
        "calibration": Path(calibration).name,
        "chunks": imatrix_chunks(run.output),
        "wall_s": round(run.cost.wall_s, 2),
    }
    return matrix, info


def quantized_artifacts(
    reference: Served,
    quants: Sequence[str],
    out_dir: Path,
    *,
    calibration: Path | None = None,
    backend: str = "llama.cpp",
    progress: Callable[[str], None] = log,
) -> list[Artifact]:
    """Quantize the reference to every type (and, with calibration data, each type that uses one again
    with an importance matrix); the LoRA GGUFs of the reference stay applied to each."""
    out_dir.mkdir(parents=True, exist_ok=True)
    matrix, info = _imatrix_for(reference, Path(calibration), out_dir, progress) if calibration else (None, None)
    artifacts = []
    for quant in quants:
        variants = [(None, None)] + ([(matrix, info)] if matrix is not None and quant in USES_IMATRIX else [])
        for imatrix, imatrix_info in variants:
            out = out_dir / f"model-{quant}{'-imatrix' if imatrix else ''}.gguf"
            progress(f"llama-quantize {quant}{' with the importance matrix' if imatrix else ''}")
            quantize(reference.gguf, quant, out, imatrix)
            artifacts.append(Artifact(Served(out, reference.loras), quant, backend, imatrix_info))
    return artifacts


def compare_quants(
    reference: Path,
    quants: Sequence[str],
    out_dir: Path,
    *,
    loras: Sequence[Path] = (),
    eval_file: Path | None = None,
    calibration: Path | None = None,
    text: Path | None = None,
    backend: str = "llama.cpp",
    settings: Settings | None = None,
    progress: Callable[[str], None] = log,
) -> list[QualityEntry]:
    """The report for several types of one model. `reference` is its f16/bf16 GGUF (an HF folder is
    converted first); `loras` are LoRA GGUFs served unmerged on top of it and of every artifact."""
    from builder.model.gguf.convert import QUANTS

    unknown = [q for q in quants if q not in QUANTS]
    if unknown:
        raise BuilderError(f"unknown GGUF type {', '.join(unknown)}; choose from {', '.join(QUANTS)}")
    reference = Path(reference)
    if reference.is_dir():
        reference = reference_gguf(reference, out_dir)
    ref = Served(reference, tuple(Path(p) for p in loras))
    artifacts = quantized_artifacts(
        ref, quants, Path(out_dir), calibration=calibration, backend=backend, progress=progress
    )
    return measure(
        ref, artifacts, work=Path(out_dir), text=text, eval_file=eval_file, settings=settings, progress=progress
    )


def imatrix_effect(entries: Sequence[QualityEntry]) -> list[dict]:
    """Per type measured both ways: KL mean and top-1 without and with the importance matrix."""
    plain = {e.quant: e for e in entries if not e.imatrix}
    return [
        {
            "quant": e.quant,
            "kl_mean": [plain[e.quant].kl_mean, e.kl_mean],
            "top1_agreement": [plain[e.quant].top1_agreement, e.top1_agreement],
        }
        for e in entries
        if e.imatrix and e.quant in plain
    ]
