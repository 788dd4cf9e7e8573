"""`builder build` (what `make image` runs): spec -> render -> context -> docker build -> .env.

The merge and the GGML conversion run inside the image build (the Dockerfiles' build stage);
this module decides what goes into the build context, which build args and secrets each backend
gets, and writes the .env that lets a plain `docker compose up` start exactly what was built.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from builder import __version__, backends
from builder.errors import BuilderError
from builder.files import write_atomic
from builder.image import quality
from builder.image.docker import Docker
from builder.image.render import render_all
from builder.model.quality.prompts import copy_eval, load_eval
from builder.model.quality.report import QualityEntry, check_threshold
from builder.selection import Selection, select_backends
from builder.spec import BuildSpec, read_model_config

PACKAGE = Path(__file__).resolve().parents[1]  # builder/, copied whole into the build context
console = Console(stderr=True)


@dataclass
class Built:
    backend: str
    image: str
    image_id: str
    size_mb: float
    seconds: float


def digest_dir(path: Path | None) -> str:
    """sha256 over a folder's relative file names and contents (adapter provenance label)."""
    if path is None:
        return ""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode() + b"\0")
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return f"sha256:{h.hexdigest()}"


# What a SWIFT / HF Trainer checkpoint holds besides the adapter: never needed to serve it.
_TRAINING_STATE = shutil.ignore_patterns(".git", "optimizer.pt", "scheduler.pt", "rng_state*.pth", "global_step*")


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def prepare_context(
    spec: BuildSpec,
    root: Path,
    adapter: Path | None = None,
    served: dict[str, Path] | None = None,
    files: dict[str, str] | None = None,
) -> Path:
    """A minimal build context: builder's code, the model (local only), the adapter to merge, the adapters
    served unmerged (adapters/NAME/), the files their images need (`files`, {context path: text}), wheels.

    Weights are hard-linked where the filesystem allows, so even a 70B folder costs no copy.
    """
    ctx = root / "context"
    if ctx.exists():
        shutil.rmtree(ctx)
    ctx.mkdir(parents=True)
    shutil.copytree(PACKAGE, ctx / "src" / "builder", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (ctx / "quality").mkdir()  # the quality stage's inputs: EVAL's prompts
    if spec.quality_eval is not None:
        copy_eval(spec.quality_eval, ctx / "quality" / "eval.jsonl")  # images inline: nothing read outside it
    for name, source in (
        ("model", Path(spec.model) if spec.model_source == "local" else None),
        ("adapter", adapter),
        ("wheels", spec.wheelhouse),
    ):
        if source is None:
            (ctx / name).mkdir()
        else:
            shutil.copytree(source, ctx / name, copy_function=_link_or_copy, ignore=shutil.ignore_patterns(".git"))
    for name, source in (served or {}).items():
        shutil.copytree(source, ctx / "adapters" / name, copy_function=_link_or_copy, ignore=_TRAINING_STATE)
    for name, text in (files or {}).items():
        write_atomic(ctx / name, text)
    (ctx / ".dockerignore").write_text("**/__pycache__\n**/*.pyc\n**/.git\n")
    return ctx


@contextmanager
def build_secrets(spec: BuildSpec) -> Iterator[dict[str, Path]]:
    """CA bundle and hub token as BuildKit secret files; the token file lives outside the context."""
    found: dict[str, Path] = {}
    if spec.ca_bundle:
        found["ca"] = spec.ca_bundle.resolve()
    token = os.environ.get(spec.hub_token_env)
    with tempfile.TemporaryDirectory(prefix="builder-secrets-") as tmp:
        if token:
            found["hub_token"] = write_atomic(Path(tmp) / "hub_token", token, mode=0o600)
        yield found


def build_args(
    spec: BuildSpec, backend: str, adapter: Path | None = None, served: dict[str, Path] | None = None
) -> dict[str, str]:
    """`adapter`: the one merged in; `served`: the adapters this image serves unmerged (its digest label
    lists each, NAME=sha256:...)."""
    record = backends.get(backend)
    source = spec.model_source
    digest = ",".join(f"{n}={digest_dir(p)}" for n, p in served.items()) if served else digest_dir(adapter)
    return {
        "BUILD_BASE": spec.base_images.build,
        # a GGUF-serving image compiles llama.cpp on the base its record names (one cached compile for all)
        **(dict([record.gguf_toolchain_base(spec)]) if record.serves_gguf(spec) else {}),
        record.base_arg: spec.runtime_base(backend),
        "MODEL_SOURCE": source,
        "MODEL_ID": spec.model if source != "local" else "",
        "MODEL_REVISION": spec.hub_revision if source != "local" else "",
        "QUANT": record.quant_for(spec) or "",
        "SERVED_MODEL_NAME": spec.served_model_name or "model",
        "BASE_MODEL": spec.model if source != "local" else Path(spec.model).resolve().name,
        "ADAPTER_DIGEST": digest,
        "BUILDER_VERSION": __version__,
        "SOURCE_REVISION": _git_revision(),
        "TRUST_REMOTE_CODE": "1" if spec.trust_remote_code else "0",
        **(record.adapter_build_args(spec, served) if served else {}),
    }


def merged_adapter(selection: Selection) -> Path | None:
    """The one adapter the merging backends bake into their weights (None: no adapter)."""
    if not any(plan.mode == "merge" for plan in selection.lora.values()):
        return None
    (path,) = selection.adapters.values()  # selection refuses merging several
    return path


def adapter_context(spec: BuildSpec, selection: Selection) -> tuple[dict[str, Path], dict[str, str]]:
    """What the build context needs for the backends that serve adapters unmerged: the adapters, and each
    such backend's own files (its record's adapter_files)."""
    served, files = {}, {}
    for name in selection.backends:
        adapters = selection.served_by(name)
        if adapters:
            served = adapters
            files.update(backends.get(name).adapter_files(spec, list(adapters)))
    return served, files


def _git_revision() -> str:
    res = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=PACKAGE)
    return res.stdout.strip() if res.returncode == 0 else ""


def write_env(spec: BuildSpec, built: list[str], path: Path) -> Path:
    """.env for compose: images, profiles, ports, the smoke checks each build cannot pass, the API
    key (kept if one exists; else generated)."""
    existing = read_env(path)
    key = os.environ.get(spec.api_key_env) or existing.get(spec.api_key_env) or secrets.token_urlsafe(24)
    values = {
        "COMPOSE_PROFILES": ",".join(built),
        **{f"{b.upper()}_IMAGE": spec.image(b) for b in backends.NAMES},
        **{f"{b.upper()}_PORT": str(getattr(spec.ports, b)) for b in backends.NAMES},
        **{f"{b.upper()}_SMOKE_SKIP": ",".join(sorted(backends.get(b).smoke_gaps(spec))) for b in built},
        "SERVED_MODEL_NAME": spec.served_model_name or "model",
        spec.api_key_env: key,
    }
    text = "# Written by `builder build`; read by docker compose.\n" + "".join(f"{k}={v}\n" for k, v in values.items())
    return write_atomic(path, text, mode=0o600)


def read_env(path: Path) -> dict[str, str]:
    """KEY=VALUE pairs of a .env file ({} when there is none)."""
    if not path.is_file():
        return {}
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line and not line.startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


@dataclass
class Job:
    """One build's fixed inputs: what `run_target` hands to docker for every backend."""

    spec: BuildSpec
    docker: Docker
    root: Path
    ctx: Path
    merged: Path | None
    selection: Selection
    secrets: dict[str, Path]

    def run_target(
        self, backend: str, target: str = "runtime", output: Path | None = None, tag: str | None = None, **extra: str
    ) -> float:
        """`docker build` of one backend's target (its image, tagged `tag` or the spec's image, or with `output`
        the target's files); seconds."""
        start = time.monotonic()
        suffix = "" if target == "runtime" else f"-{target}"
        with console.status(f"[bold]{backend}{suffix}[/]: starting") as status:

            def show(line: str) -> None:
                if line.startswith("#") and ("[" in line or "DONE" in line or "CACHED" in line):
                    status.update(f"[bold]{backend}{suffix}[/]: {line[:110]}")

            self.docker.build(
                self.ctx,
                self.root / f"Dockerfile.{backend}",
                tag or self.spec.image(backend),
                {**build_args(self.spec, backend, self.merged, self.selection.served_by(backend)), **extra},
                self.secrets,
                log=self.root / "logs" / f"{backend}{suffix}.log",
                target=target,
                on_line=show,
                output=output,
            )
        return time.monotonic() - start


def mounted_targets(spec: BuildSpec, backend: str, selection: Selection) -> dict[str, str]:
    """{Dockerfile target: tag} of the images beside a mounted_weights backend's runtime: its engine (no
    weights), the weights image and one image per adapter it serves unmerged (each holding the runtime's layer)."""
    targets = {"engine": spec.engine_image(backend), "weights": spec.weights_image(backend)}
    for i, name in enumerate(selection.served_by(backend)):
        targets[f"lora-weights-{i}"] = spec.lora_image(name, backend)
    return targets


def measure_quality(job: Job, chosen: list[str]) -> tuple[list[QualityEntry], float]:
    """The quality step before the images (a failing QUALITY_MIN_TOP1 stops the build here, with the table):
    each measured backend's `quality` target, its report extracted into build/NAME/quality.json."""
    plan = quality.plan(job.spec, chosen)
    console.print(f"[bold]quality step[/]: {', '.join(plan.backends) or 'skipped'} ({plan.reason})", soft_wrap=True)
    if not plan.backends:
        (job.root / "quality.json").unlink(missing_ok=True)  # no stale report beside images it does not describe
        return [], 0.0
    if job.spec.quality_eval is not None:
        load_eval(job.spec.quality_eval)  # a bad EVAL file fails here, before any build, saying where

    def build_report(backend: str, folder: Path) -> None:
        if folder.exists():
            shutil.rmtree(folder)
        job.run_target(backend, "quality", output=folder)

    entries, wall_s = quality.collect(plan.backends, build_report, job.root)
    try:
        check_threshold(entries, job.spec.quality_min_top1, name="QUALITY_MIN_TOP1")
    except BuilderError:
        quality.report_and_check(entries, wall_s, None, job.root / "quality.json")
        raise
    return entries, wall_s


def build(
    spec: BuildSpec, workdir: Path = Path("build"), env_file: Path = Path(".env"), docker: Docker | None = None
) -> list[Built]:
    selection = select_backends(spec, read_model_config(spec))
    for name, reason in selection.skipped.items():
        console.print(f"[yellow]BACKEND=auto skips[/] {name}: {reason}")
    chosen = selection.backends
    merged = merged_adapter(selection)
    docker = docker or Docker.detect()
    docker.require_engine()
    root = workdir / spec.name
    render_all(spec, root, selection)
    served, files = adapter_context(spec, selection)
    console.print(
        f"[bold]building[/] {', '.join(chosen)} for [cyan]{spec.model}[/]"
        + (f" + adapter [cyan]{merged}[/]" if merged else "")
        + (f"; served unmerged as model {', '.join(repr(n) for n in served)}" if served else "")
    )
    for name, plan in selection.lora.items():
        console.print(f"{name}: adapters {'served unmerged' if plan.mode == 'serve' else 'merged'} ({plan.reason})")
    ctx = prepare_context(spec, root, merged, served, files)
    built: list[Built] = []
    with build_secrets(spec) as secret_files:
        job = Job(spec, docker, root, ctx, merged, selection, secret_files)
        entries, quality_wall_s = measure_quality(job, chosen)
        for backend in chosen:
            seconds = job.run_target(backend, QUALITY_SUMMARY=quality.label(entries, backend))
            info = docker.inspect(spec.image(backend))
            built.append(
                Built(
                    backend, spec.image(backend), info["Id"].removeprefix("sha256:")[:12], info["Size"] / 1e6, seconds
                )
            )
            console.print(f"[green]built[/] {built[-1].image} in {seconds:.0f}s")
            if backends.get(backend).mounts_weights(spec):
                for target, tag in mounted_targets(spec, backend, selection).items():
                    job.run_target(backend, target, tag=tag)
                    console.print(f"[green]built[/] {tag}")
    write_env(spec, chosen, env_file)
    table = Table(title="images")
    for col in ("backend", "image", "id", "size", "build time"):
        table.add_column(col)
    for b in built:
        table.add_row(b.backend, b.image, b.image_id, f"{b.size_mb:.0f} MB", f"{b.seconds:.0f}s")
    console.print(table)
    quality.report_and_check(entries, quality_wall_s, spec.quality_min_top1, root / "quality.json")
    if spec.device == "auto":
        console.print(f"compose settings written to {env_file}: `docker compose up -d --wait` starts them")
    else:  # the committed compose.yaml is device auto's (vLLM reserves a GPU); this build's is in its folder
        up = f"docker compose --env-file {env_file} -f {root / 'compose.yaml'} up -d --wait"
        console.print(f"compose settings written to {env_file}: `{up}` starts them (device {spec.device})")
    return built
