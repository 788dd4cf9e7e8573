"""`python -m builder.model.quality`: measure GGUF types of one model side by side, or given artifacts.

python -m builder.model.quality --reference model-f16.gguf --quants q8_0,q5_k_m,q4_k_m,q4_0 --out build/quality
python -m builder.model.quality --reference my-hf-model/ --lora adapter.gguf --eval eval.jsonl --calibration data.jsonl
python -m builder.model.quality --reference model-f16.gguf --artifact q4_0=model-q4_0.gguf --min-top1 0.9
python -m builder.model.quality --reference merged-model/ --artifact q4_k_m=model.gguf   (the image's quality stage)
python -m builder.model.quality --reference vl-model/ --artifact q4_k_m=model.gguf --mmproj mmproj.gguf --eval eval.jsonl
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from builder.errors import BuilderError
from builder.model.quality.compare import compare_quants, imatrix_effect, reference_gguf
from builder.model.quality.measure import Artifact, Settings, measure
from builder.model.quality.report import check_threshold, print_report, write_report
from builder.model.quality.tools import Served


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m builder.model.quality",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument(
        "--reference", type=Path, required=True, help="f16/bf16 GGUF of the model, or its HF folder (converted)"
    )
    p.add_argument(
        "--lora", type=Path, action="append", default=[], help="LoRA GGUF served unmerged on top (repeatable)"
    )
    p.add_argument(
        "--mmproj", type=Path, help="the artifacts' mmproj GGUF (vision-language models: answers EVAL's images)"
    )
    p.add_argument(
        "--reference-mmproj", type=Path, help="the reference's mmproj (default: f16, from the --reference folder)"
    )
    p.add_argument("--quants", help="comma list of GGUF types to make from the reference and compare")
    p.add_argument(
        "--artifact", action="append", default=[], metavar="TYPE=GGUF", help="an existing artifact to measure"
    )
    p.add_argument("--eval", type=Path, help="eval prompts: JSONL (messages, conversations, query/response, alpaca)")
    p.add_argument(
        "--calibration", type=Path, help="text or JSONL for an importance matrix (each type is measured both ways)"
    )
    p.add_argument(
        "--text", type=Path, help="text sample for KL divergence (default: a built-in 4.6k-token English sample)"
    )
    p.add_argument(
        "--out", type=Path, default=Path("build/quality"), help="folder for the quantized files and quality.json"
    )
    p.add_argument("--chunks", type=int, default=8, help="512-token chunks of the text sample (default 8)")
    p.add_argument("--n-predict", type=int, default=48, help="greedy tokens per eval prompt (default 48)")
    p.add_argument("--min-top1", type=float, help="fail when an artifact's top-1 agreement is below this (0-1)")
    p.add_argument("--min-eval-same", type=float, help="fail when the fraction of identical eval answers is below this")
    return p


def _artifacts(specs: list[str], loras: tuple[Path, ...], mmproj: Path | None = None) -> list[Artifact]:
    out = []
    for spec in specs:
        quant, sep, path = spec.partition("=")
        if not sep or not path:
            raise BuilderError(f"--artifact {spec!r}: give TYPE=PATH, e.g. q4_0=build/model.gguf")
        out.append(Artifact(Served(Path(path), loras, mmproj), quant))
    return out


def _reference_mmproj(a: argparse.Namespace) -> Path | None:
    """The reference's mmproj: --reference-mmproj, else (with --mmproj) f16 from the --reference folder."""
    if a.reference_mmproj is not None or a.mmproj is None:
        return a.reference_mmproj
    if not a.reference.is_dir():
        raise BuilderError("--mmproj with a GGUF --reference: give the reference's own --reference-mmproj too")
    from builder.model.gguf.convert import convert_mmproj

    return convert_mmproj(a.reference, a.out / "reference-mmproj-f16.gguf", "f16", quiet=True)


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    settings = Settings(chunks=a.chunks, n_predict=a.n_predict)
    try:
        if bool(a.quants) == bool(a.artifact):
            raise BuilderError("give either --quants (types to make and compare) or --artifact TYPE=GGUF")
        if a.quants:
            quants = [q.strip() for q in a.quants.split(",") if q.strip()]
            entries = compare_quants(
                a.reference, quants, a.out, loras=a.lora, eval_file=a.eval, calibration=a.calibration,
                text=a.text, settings=settings,
            )  # fmt: skip
        else:
            ref_file = reference_gguf(a.reference, a.out) if a.reference.is_dir() else a.reference
            loras = tuple(a.lora)
            reference = Served(ref_file, loras, _reference_mmproj(a))
            entries = measure(
                reference,
                _artifacts(a.artifact, loras, a.mmproj),
                work=a.out,
                text=a.text,
                eval_file=a.eval,
                settings=settings,
            )
        write_report(entries, a.out / "quality.json")
        print_report(entries)
        for row in imatrix_effect(entries):
            print(f"importance matrix, {row['quant']}: KL mean {row['kl_mean'][0]:.4f} -> {row['kl_mean'][1]:.4f}")
        check_threshold(entries, a.min_top1, a.min_eval_same, name="--min-top1")
    except BuilderError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
