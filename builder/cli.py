"""Command line: one thin function per subcommand; the stage modules hold the logic.

Heavy stage modules (torch, chatglm_cpp, xinference) are imported inside their command so that
`render`, `smoke` and `--help` start instantly and work in images that lack them.

Make variables arrive as BUILDER_<VARIABLE> environment variables (see the Makefile), which click
reads as the value of the matching flag: a value is never pasted into a shell command line.
"""

from __future__ import annotations

import errno
import sys
from pathlib import Path
from typing import Literal, get_args, get_origin

import click

from builder import __version__, backends
from builder.errors import BuilderError

PathArg = click.Path(path_type=Path)


class _Group(click.Group):
    """Maps BuilderError, raised anywhere below, to its message and exit status, in one place (and a full
    disk, which a user fixes too, to what to do about it)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except BuilderError as e:
            error = click.ClickException(str(e))
            error.exit_code = e.exit_code
            raise error from None
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            from builder.image.hints import disk_hint

            error = click.ClickException(f"{e}\nwhat to do: {disk_hint()}")
            error.exit_code = BuilderError.exit_code
            raise error from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="builder")
def cli() -> None:
    """Build and serve fine-tuned LLMs as container images, one per backend."""


# (flag, spec field, Make variable or None, click kwargs). Nested spec fields use "__".
SPEC_OPTIONS: list[tuple[str, str, str | None, dict]] = [
    ("--spec", "spec_file", "SPEC", {"type": click.Path(dir_okay=False, path_type=Path), "help": "YAML build spec."}),
    ("--model", "model", "MODEL", {"help": "Model folder or hub id (org/name)."}),
    ("--model-hub", "model_hub", None, {"type": click.Choice(["auto", "local", "huggingface", "modelscope"])}),
    ("--revision", "revision", None, {"help": "Hub revision."}),
    ("--adapter", "adapter", "ADAPTER", {"help": "LoRA adapter folder, SWIFT run folder, or name=path,name=path."}),
    (
        "--lora",
        "lora_mode",
        "LORA",
        {"type": click.Choice(["auto", "merge", "serve"]), "help": "Adapters merged or served unmerged."},
    ),
    ("--backend", "backends", "BACKEND", {"help": f"Comma list of {','.join(backends.NAMES)}, or auto."}),
    ("--quant", "quant", "QUANT", {"type": click.Choice(backends.QUANTS), "help": "Quantization type."}),
    (
        "--quality",
        "quality",
        "QUALITY",
        {"type": click.Choice(["auto", "on", "off"]), "help": "Measure GGUF images against their f16/bf16 reference."},
    ),
    ("--quality-min-top1", "quality_min_top1", "QUALITY_MIN_TOP1", {"type": float, "help": "Minimum top-1 agreement."}),
    ("--eval", "quality_eval", "EVAL", {"help": "Eval prompts (JSONL) for the quality step."}),
    ("--served-model-name", "served_model_name", None, {}),
    ("--name", "name", "NAME", {"help": "Image repository name."}),
    ("--tag", "tag", "TAG", {"help": "Image tag."}),
    ("--registry", "registry", "REGISTRY", {"help": "Registry prefix."}),
    ("--build-base", "base_images__build", None, {"help": "Base image of the build stage."}),
    *[(f"--{name}-base", f"base_images__{name}", None, {}) for name in backends.NAMES],
    *[
        (f"--{b.name}-cpu-base", f"base_images__{b.name}_cpu", None, {})
        for b in backends.REGISTRY.values()
        if b.cpu_base
    ],
    (
        "--device",
        "device",
        "DEVICE",
        {
            "type": click.Choice(["auto", "cpu", "cuda"]),
            "help": "Variant of each backend: auto (vLLM on CUDA, the others on CPU), cpu, cuda.",
        },
    ),
    ("--cuda/--no-cuda", "cuda", None, {"help": "Build the CUDA variant of backends that have one (= --device cuda)."}),
    ("--cuda-architectures", "cuda_architectures", None, {}),
    ("--ca-bundle", "ca_bundle", "CA_BUNDLE", {"help": "CA bundle file, a BuildKit secret."}),
    ("--wheelhouse", "wheelhouse", "WHEELHOUSE", {"help": "Local wheels for pip inside the build."}),
    ("--trust-remote-code/--no-trust-remote-code", "trust_remote_code", None, {}),
]


def backend_option_flags() -> list[tuple[str, str, None, dict]]:
    """Each backend's own options (its record's `options` model) as flags `--<backend>-<option>`."""
    flags = []
    for b in backends.REGISTRY.values():
        for key, option in b.option_fields().items():
            info = b.options.model_fields[option]
            kwargs: dict = {"help": info.description}
            if get_origin(info.annotation) is Literal:
                kwargs["type"] = click.Choice(get_args(info.annotation))
            flag = f"--{key.replace('_', '-')}"
            if info.annotation is bool:
                flag = f"{flag}/--no-{key.replace('_', '-')}"
            flags.append((flag, key, None, kwargs))
    return flags


SPEC_OPTIONS += backend_option_flags()


def spec_options(f):
    """The build-spec flags shared by `render`, `build` and `push`; Make variables map onto them."""
    for flag, field, make_var, kwargs in reversed(SPEC_OPTIONS):
        extra = {}
        if make_var:
            extra = {"envvar": f"BUILDER_{make_var}", "show_envvar": True}
            kwargs = {**kwargs, "help": f"{kwargs.get('help', '')} (Make: {make_var})".strip()}
        f = click.option(flag, field, default=None, **extra, **kwargs)(f)
    return f


def _spec(flags: dict, resolve: bool = True):
    from builder.spec import load_spec

    return load_spec(flags, resolve=resolve)


@cli.command()
@spec_options
@click.option("--out", type=PathArg, default=Path("."), show_default=True, help="Folder for the rendered files.")
def render(out: Path, **flags) -> None:
    """Render every backend's Dockerfile and compose.yaml."""
    from builder.image.render import render_all

    for path in render_all(_spec(flags, resolve=False), out):
        click.echo(path)


@cli.command()
@spec_options
@click.option("--out", type=PathArg, default=Path("k8s"), show_default=True, help="Folder the render replaces.")
@click.option(
    "--pushed",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Digests `builder push` verified (default: build/NAME/pushed.json); pins the images.",
)
@click.option(
    "--weights",
    type=click.Choice(["baked", "image-volume"]),
    default="baked",
    show_default=True,
    help="image-volume: also the engine + weights-image Deployments (image volumes) and a KServe pair.",
)
def k8s(out: Path, pushed: Path | None, weights: str, **flags) -> None:
    """Render Kubernetes manifests: a kustomize base per backend, Xinference's cluster, an overlay example."""
    from builder.image import k8s_weights
    from builder.image.k8s import render_k8s

    extras = k8s_weights.render if weights == "image-volume" else None
    paths = render_k8s(_spec(flags, resolve=False), out, pushed, extras=extras)
    kustomizations = [p for p in paths if p.name == "kustomization.yaml" and "kind: Component" not in p.read_text()]
    for base in sorted(p.parent for p in kustomizations):
        click.echo(f"{base}\tkubectl apply -k {base}")


@cli.command("spec")
@spec_options
def show_spec(**flags) -> None:
    """Print the resolved build spec as YAML (usable as a SPEC file) and the backends it builds."""
    import yaml

    from builder.selection import select_backends
    from builder.spec import read_model_config

    spec = _spec(flags)
    data = spec.model_dump(mode="json", exclude_none=True)
    selection = select_backends(spec, read_model_config(spec))
    data["backends"] = selection.backends
    click.echo(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), nl=False)
    for line in selection.vision_lines():
        click.echo(f"# {line}")
    for name, reason in selection.skipped.items():
        click.echo(f"# BACKEND=auto skips {name}: {reason}")
    for name, plan in selection.lora.items():
        names = f" {', '.join(selection.served_by(name))}" if plan.mode == "serve" else ""
        click.echo(f"# LORA on {name}: {plan.mode}{names} ({plan.reason})")
    for name in selection.backends:
        b = backends.get(name)
        click.echo(f"# DEVICE of {name}: {b.device_for(spec)} (base {spec.runtime_base(name)})")


@cli.command()
@spec_options
def build(**flags) -> None:
    """Render, prepare a build context and build the requested backend images."""
    from builder.image.build import build as build_images

    build_images(_spec(flags))


@cli.command()
@spec_options
@click.option(
    "--quants",
    envvar="BUILDER_QUANTS",
    show_envvar=True,
    default="q8_0,q5_k_m,q4_k_m,q4_0",
    show_default=True,
    help="GGUF types to compare (Make: QUANTS).",
)
@click.option(
    "--calibration",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="BUILDER_CALIBRATION",
    show_envvar=True,
    help="Text or JSONL for an importance matrix; each type is then measured with one too (Make: CALIBRATION).",
)
@click.option("--out", type=PathArg, default=None, help="Work folder and report (default: build/NAME/quality-compare).")
def quality(quants: str, calibration: Path | None, out: Path | None, **flags) -> None:
    """Compare GGUF types of one model (ADAPTER merged in) against its f16/bf16 reference: KL, top-1, PPL, eval, size, speed."""
    from builder.image.quality import compare, parse_quants

    spec = _spec(flags)
    if spec.adapters:
        raise BuilderError("`make quality` merges one adapter: ADAPTER=<folder>, not name=path,...")
    if calibration is not None and not calibration.is_file():
        raise BuilderError(f"CALIBRATION={calibration} is not a file")
    out = out or Path("build") / spec.name / "quality-compare"
    compare(spec, parse_quants(quants), out, calibration=calibration, adapter=spec.adapter)


@cli.command()
@spec_options
def push(**flags) -> None:
    """Push every built backend image and verify its digest in the registry."""
    from builder.image.push import push as push_images

    push_images(_spec(flags, resolve=False))


# -- the model stage (also run inside the image build) ------------------------------------------


@cli.command()
@click.option("--base", type=PathArg, help="Base model folder (default: from the adapter's config or SWIFT args).")
@click.option("--adapter", type=PathArg, help="LoRA adapter folder (peft or SWIFT checkpoint-N).")
@click.option("--out", type=PathArg, help="Output folder (default: {adapter}-merged).")
@click.option(
    "--dtype", type=click.Choice(["auto", "bfloat16", "float16", "float32"]), default="auto", show_default=True
)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing --out.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def merge(base, adapter, out, dtype, device, force, quiet) -> None:
    """Merge a LoRA adapter into its base, one shard at a time."""
    from builder.model.merge import merge_model

    path = merge_model(base=base, adapter=adapter, out=out, dtype=dtype, device=device, force=force, quiet=quiet)
    click.echo(path)


@cli.command()
@click.option("--model", "model", type=PathArg, required=True, help="Hugging Face model folder.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["ggml", "gguf"]),
    default="ggml",
    show_default=True,
    help="ggml: chatglm.cpp (GLM family); gguf: llama.cpp (every architecture its converter registers).",
)
@click.option(
    "--quant", type=click.Choice(backends.QUANTS), default=None, help="Type (default: gguf q4_k_m, ggml q8_0)."
)
@click.option("--out", type=PathArg, required=True, help="Output file.")
@click.option("--pre-tokenizer", help="gguf: llama.cpp pre-tokenizer for a BPE tokenizer it does not recognise.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
def convert(model, fmt, quant, out, pre_tokenizer, quiet) -> None:
    """Convert a model folder to GGML (chatglm.cpp) or GGUF (llama.cpp), without running code from the folder."""
    if fmt == "gguf":
        from builder.model.gguf.convert import DEFAULT_QUANT, convert_gguf

        quant = quant or DEFAULT_QUANT
        click.echo(convert_gguf(model, quant, out, pre_tokenizer=pre_tokenizer, quiet=quiet).path)
        return
    from builder.model.convert import DEFAULT_QUANT as GGML_DEFAULT
    from builder.model.convert import QUANTS as GGML_QUANTS
    from builder.model.convert import convert_model

    quant = quant or GGML_DEFAULT
    if quant not in GGML_QUANTS:
        raise BuilderError(f"--quant {quant} is not a GGML type ({', '.join(GGML_QUANTS)}); try --format gguf")
    click.echo(convert_model(model, quant=quant, out=out, quiet=quiet))


@cli.command("convert-mmproj")
@click.option(
    "--model", "model", type=PathArg, required=True, help="Vision-language model folder (Qwen2-VL, Qwen2.5-VL)."
)
@click.option("--quant", default=None, help="The text GGUF's type: f32 gives an f32 mmproj, anything else f16.")
@click.option("--out", type=PathArg, required=True, help="Output file (the mmproj GGUF).")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
def convert_mmproj(model, quant, out, quiet) -> None:
    """The vision tower and projector of a vision-language model as llama.cpp's mmproj GGUF."""
    from builder.model.gguf.convert import convert_mmproj as run
    from builder.model.gguf.convert import mmproj_type

    click.echo(run(model, out, mmproj_type(quant), quiet=quiet))


@cli.command("convert-lora")
@click.option("--adapter", type=PathArg, required=True, help="LoRA adapter folder (peft or SWIFT checkpoint-N).")
@click.option("--base", type=PathArg, default=None, help="Its base model folder (default: the one it names).")
@click.option("--out", type=PathArg, required=True, help="Output file (a GGUF LoRA for llama-server --lora).")
@click.option("--outtype", type=click.Choice(["f32", "f16", "bf16", "q8_0"]), default="f16", show_default=True)
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
def convert_lora(adapter, base, out, outtype, quiet) -> None:
    """Convert a LoRA adapter to a GGUF LoRA that llama.cpp applies unmerged over the base's GGUF."""
    from builder.model.gguf.lora import convert_lora as run

    click.echo(run(adapter, base, out, outtype=outtype, quiet=quiet).path)


@cli.command()
@click.argument("file", type=PathArg)
def inspect(file) -> None:
    """Print and validate a chatglm.cpp GGML or a llama.cpp GGUF file."""
    from builder.model.gguf.convert import describe_gguf, is_gguf, read_gguf

    if file.is_file() and is_gguf(file):
        click.echo(describe_gguf(read_gguf(file)))
        return
    from builder.model.convert.inspect import main as inspect_main

    inspect_main(file)


@cli.command("prepare-model", hidden=True)
@click.option("--source", type=click.Choice(["local", "huggingface", "modelscope"]), default="local")
@click.option("--model-id", default="")
@click.option("--revision", default="")
@click.option("--local", type=PathArg, default=Path("/ctx/model"))
@click.option("--adapter", type=PathArg, default=None)
@click.option("--dtype", default="auto")
@click.option("--out", type=PathArg, required=True)
def prepare_model(source, model_id, revision, local, adapter, dtype, out) -> None:
    """(build stage) Fetch the base model and merge the adapter into --out."""
    from builder.model.fetch import prepare_model as run

    click.echo(run(source, model_id, revision or None, local, adapter, out, dtype))


# -- serving and checking -----------------------------------------------------------------------


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []})
@click.pass_context
def serve(ctx: click.Context) -> None:
    """OpenAI-compatible chatglm.cpp server (what the chatglm.cpp image runs; `serve --help` lists its options)."""
    from builder.runtime.chatglmcpp.__main__ import main as runtime_main

    sys.exit(runtime_main(["serve", *ctx.args]))


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []})
@click.pass_context
def chat(ctx: click.Context) -> None:
    """Interactive terminal chat with a GGML model (`chat --help` lists its options)."""
    from builder.runtime.chatglmcpp.__main__ import main as runtime_main

    sys.exit(runtime_main(["chat", *ctx.args]))


@cli.command()
@click.option("--url", required=True, help="Base URL, e.g. http://127.0.0.1:8001")
@click.option("--model", required=True, help="Served model name.")
@click.option("--api-key", default=None, envvar="API_KEY", help="Bearer key (default: $API_KEY).")
@click.option("--timeout", type=float, default=120.0, show_default=True)
@click.option(
    "--skip",
    multiple=True,
    type=click.Choice(["models", "completions", "chat", "chat-stream"]),
    help="A check the backend cannot pass (Xinference's transformers engine: completions).",
)
def smoke(url, model, api_key, timeout, skip) -> None:
    """Check one OpenAI-compatible server: models, completions, chat (plain and streaming)."""
    from builder.runtime.smoke import run_smoke

    if not run_smoke(url=url, model=model, api_key=api_key, timeout=timeout, skip=frozenset(skip)):
        sys.exit(1)


@cli.command("smoke-up")
def smoke_up() -> None:
    """Run `smoke` against every compose service that is up (ports and key from .env)."""
    from builder.demo.quickstart import smoke_running

    if not smoke_running():
        sys.exit(1)


# -- the demo -----------------------------------------------------------------------------------


@cli.command("demo-model")
@click.option(
    "--out", type=PathArg, required=True, help="Folder for base/ (tiny GLM), adapter/ and adapter2/ (its LoRAs)."
)
@click.option("--force", is_flag=True, help="Retrain even when the folder is up to date.")
def demo_model(out, force) -> None:
    """Train the embedded demo model (tiny GLM + two LoRAs, seconds on CPU); print base/ and adapter/."""
    from builder.demo.model import build_demo

    for path in build_demo(out, force=force, quiet=True):
        click.echo(path)


@cli.command()
def demo() -> None:
    """Train the demo model + LoRAs, build its images, serve them, ask the LoRA's question, then each LoRA by name."""
    from builder.demo.quickstart import run_demo

    run_demo()


@cli.command("demo-vllm-cpu")
def demo_vllm_cpu() -> None:
    """The demo's last step on vLLM's CPU variant: both LoRAs unmerged over the demo base, each name asked."""
    from builder.demo.quickstart import run_vllm_cpu_demo

    run_vllm_cpu_demo()


def main() -> None:
    cli(prog_name="builder")
