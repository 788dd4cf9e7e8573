"""Measure artifacts against their reference: KL statistics over a text sample, greedy eval answers,
decode speed, and what the measuring cost."""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from builder.errors import BuilderError
from builder.model.quality import greedy, kld
from builder.model.quality.prompts import BUILTIN_PROMPTS, BUILTIN_TEXT, EvalPrompt, calibration_text, load_eval
from builder.model.quality.report import QualityEntry
from builder.model.quality.tools import Cost, Served, threads, tool_version


@dataclass(frozen=True)
class Artifact:
    """One thing an image serves: the GGUF (and LoRA GGUFs) a backend loads, and its type."""

    served: Served
    quant: str
    backend: str = "llama.cpp"
    imatrix: dict | None = None  # {"calibration": name, "chunks": n} when it was quantized with one


@dataclass
class Settings:
    ctx: int = 512  # tokens per KL chunk
    chunks: int = 8  # KL chunks (each scores ctx/2 tokens)
    n_predict: int = 48  # greedy tokens per eval prompt


def log(msg: str) -> None:
    print(f"[quality] {msg}", file=sys.stderr, flush=True)


def text_file(text: Path | None, work: Path) -> tuple[Path, str]:
    """The KL sample as a plain-text file, and how the report names it: the built-in one, a text file
    as it is, or chat data (JSONL/JSON) rendered to text."""
    if text is None:
        return BUILTIN_TEXT, "built-in sample"
    text = Path(text)
    if text.suffix.lower() in (".jsonl", ".json"):
        out = work / "kl-text.txt"
        out.write_text(calibration_text(text), encoding="utf-8")
        return out, text.name
    if not text.is_file():
        raise BuilderError(f"KL text {text} does not exist")
    return text, text.name


def _measure_one(
    artifact: Artifact, logits: Path, prompts: Sequence[EvalPrompt], reference: greedy.EvalRun, s: Settings
) -> tuple[kld.KLStats, greedy.EvalRun, list[dict]]:
    stats, run = kld.kl_divergence(artifact.served, logits, s.ctx)
    answers = greedy.greedy_answers(artifact.served, prompts, s.n_predict)
    answers.cost.add(run.cost)
    return stats, answers, greedy.compare_answers(prompts, reference.answers, answers.answers)


def split_prompts(prompts: Sequence[EvalPrompt]) -> tuple[list[EvalPrompt], list[EvalPrompt]]:
    """(text prompts, image prompts); an EVAL of image prompts only is measured on the built-in text ones too."""
    text = [p for p in prompts if not p.images]
    images = [p for p in prompts if p.images]
    return (text or list(BUILTIN_PROMPTS)) if images else text, images


def _image_prompts_for(
    images: list[EvalPrompt], served: Sequence[Served], progress: Callable[[str], None]
) -> list[EvalPrompt]:
    """The image prompts to answer: all of them when every model has an mmproj, none (said so) when none has
    one (a text-only comparison, `make quality`); BuilderError when only some have one."""
    missing = [m.describe() for m in served if m.mmproj is None]
    if not images or not missing:
        return images
    if len(missing) == len(served):
        progress(f"{len(images)} eval prompt(s) with images left out: no mmproj to answer them (the text part only)")
        return []
    raise BuilderError(
        f"{len(images)} eval prompt(s) show images, but {', '.join(missing)} has no mmproj (the vision tower "
        "and projector of a vision-language model) while the others have one: give --mmproj for each"
    )


def _found(rows: list[dict], key: str) -> int | None:
    marks = [r[key] for r in rows if r[key] is not None]
    return sum(marks) if marks else None


def measure(
    reference: Served,
    artifacts: Sequence[Artifact],
    *,
    work: Path | None = None,
    text: Path | None = None,
    eval_file: Path | None = None,
    prompts: Sequence[EvalPrompt] | None = None,
    settings: Settings | None = None,
    progress: Callable[[str], None] = log,
) -> list[QualityEntry]:
    """One QualityEntry per artifact, in order; artifacts that load the same files are measured once."""
    s = settings or Settings()
    text_prompts, image_prompts = split_prompts(list(prompts) if prompts is not None else load_eval(eval_file))
    image_prompts = _image_prompts_for(image_prompts, [reference, *(a.served for a in artifacts)], progress)
    prompts = text_prompts + image_prompts  # one server per model answers both; the rows are split after
    with tempfile.TemporaryDirectory(prefix="builder-quality-", dir=work) as tmp:
        tmp_path = Path(tmp)
        sample, sample_name = text_file(text, tmp_path)
        logits = tmp_path / "reference.kld"
        shown = f" ({len(image_prompts)} with images)" if image_prompts else ""
        progress(f"reference {reference.describe()}: logits over {sample_name}, {len(prompts)} eval prompts{shown}")
        _, base_run = kld.save_reference_logits(reference, sample, logits, s.ctx, s.chunks)
        ref_answers = greedy.greedy_answers(reference, prompts, s.n_predict)
        ref_cost = Cost().add(base_run.cost).add(ref_answers.cost)
        version = tool_version()
        done: dict[Served, tuple] = {}
        entries = []
        for artifact in artifacts:
            if artifact.served not in done:
                progress(f"{artifact.quant}: {artifact.served.describe()}")
                done[artifact.served] = _measure_one(artifact, logits, prompts, ref_answers, s)
            stats, answers, all_rows = done[artifact.served]
            rows, image_rows = all_rows[: len(text_prompts)], all_rows[len(text_prompts) :]
            entries.append(
                QualityEntry(
                    backend=artifact.backend,
                    quant=artifact.quant,
                    artifact=artifact.served.describe(),
                    size_bytes=artifact.served.size_bytes(),
                    **stats.as_dict(),
                    eval_same=sum(r["same"] for r in rows),
                    eval_total=len(rows),
                    eval_expected_found=_found(rows, "expected_found"),
                    decode_tokens_per_s=round(answers.decode_tokens_per_s, 2),
                    reference=reference.describe(),
                    reference_size_bytes=reference.size_bytes(),
                    reference_decode_tokens_per_s=round(ref_answers.decode_tokens_per_s, 2),
                    reference_expected_found=_found(rows, "reference_expected_found"),
                    tool_version=version,
                    text=sample_name,
                    imatrix=artifact.imatrix,
                    wall_s=round(answers.cost.wall_s, 2),
                    peak_rss_mb=round(answers.cost.peak_rss_mb, 1),
                    reference_wall_s=round(ref_cost.wall_s, 2),
                    reference_peak_rss_mb=round(ref_cost.peak_rss_mb, 1),
                    threads=threads(),
                    eval=rows,
                    image_eval_same=sum(r["same"] for r in image_rows),
                    image_eval_total=len(image_rows),
                    image_eval=image_rows,
                )
            )
    return entries
