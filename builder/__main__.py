"""Command line: one thin function per subcommand; the stage modules hold the logic.

Heavy stage modules (torch, chatglm_cpp, xinference) are imported inside their command so that
`render`, `smoke` and `--help` start instantly and work in images that lack them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from builder import __version__
from builder.errors import BuilderError

QUANTS = ["f32", "f16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]
PathArg = click.Path(path_type=Path)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="builder")
def cli() -> None:
    """Build and serve fine-tuned LLMs as vLLM, chatglm.cpp and Xinference images."""


def spec_options(f):
    """The build-spec flags shared by `render`, `build` and `push` (Make variables map onto them)."""
    from builder.spec import cli_options

    for option in reversed(cli_options()):
        f = option(f)
    return f


@cli.command()
@spec_options
@click.option("--out", type=PathArg, default=Path("."), show_default=True, help="Folder for the four rendered files.")
def render(out: Path, **flags) -> None:
    """Render Dockerfile.vllm, Dockerfile.chatglmcpp, Dockerfile.xinference and compose.yaml."""
    from builder.render import render_all
    from builder.spec import load_spec

    spec = load_spec(flags, resolve=False)
    for path in render_all(spec, out):
        click.echo(path)


@cli.command()
@click.option("--base", type=PathArg, help="Base model folder (default: from the adapter's config or SWIFT args).")
@click.option("--adapter", type=PathArg, help="LoRA adapter folder (peft or SWIFT checkpoint-N).")
@click.option("--out", type=PathArg, help="Output folder (default: {adapter}-merged).")
@click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float16", "float32"]), default="auto", show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing --out.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def merge(base, adapter, out, dtype, device, force, quiet) -> None:
    """Merge a LoRA adapter into its base, one shard at a time."""
    from builder.merge import merge_model

    path = merge_model(base=base, adapter=adapter, out=out, dtype=dtype, device=device, force=force, quiet=quiet)
    click.echo(path)


@cli.command()
@click.option("--model", "model", type=PathArg, required=True, help="Model folder (ChatGLM2/3, GLM-4 or native GLM).")
@click.option("--quant", type=click.Choice(QUANTS), default="q4_0", show_default=True)
@click.option("--out", type=PathArg, required=True, help="Output GGML file.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def convert(model, quant, out, quiet) -> None:
    """Convert a model folder to chatglm.cpp's GGML format, without running code from the folder."""
    from builder.convert import convert_model

    click.echo(convert_model(model, quant=quant, out=out, quiet=quiet))


@cli.command()
@click.argument("file", type=PathArg)
def inspect(file) -> None:
    """Print and validate a chatglm.cpp GGML file."""
    from builder.convert.inspect import main as inspect_main

    inspect_main(file)


@cli.command()
@spec_options
def build(**flags) -> None:
    """Render, prepare a build context and build the requested backend images."""
    _not_implemented("build")


@cli.command()
@spec_options
def push(**flags) -> None:
    """Push every built backend image and verify its digest in the registry."""
    _not_implemented("push")


@cli.command()
@click.option("--ggml", type=PathArg, required=True, help="GGML model file.")
@click.option("--host", default="0.0.0.0", show_default=True)
@click.option("--port", type=int, default=8001, show_default=True)
@click.option("--served-model-name", default=None, help="Model name the API answers to (default: file stem).")
@click.option("--max-queue", type=int, default=16, show_default=True, help="Requests waiting beyond this get 503.")
def serve(ggml, host, port, served_model_name, max_queue) -> None:
    """OpenAI-compatible server over chatglm_cpp.Pipeline (API key from $API_KEY)."""
    from builder.serve import serve as run_server

    run_server(ggml=ggml, host=host, port=port, served_model_name=served_model_name, max_queue=max_queue)


@cli.command()
@click.option("--url", required=True, help="Base URL, e.g. http://127.0.0.1:8001")
@click.option("--model", required=True, help="Served model name.")
@click.option("--api-key", default=None, envvar="API_KEY", help="Bearer key (default: $API_KEY).")
@click.option("--timeout", type=float, default=120.0, show_default=True)
def smoke(url, model, api_key, timeout) -> None:
    """Check one OpenAI-compatible server: models, completions, chat (plain and streaming)."""
    from builder.smoke import run_smoke

    if not run_smoke(url=url, model=model, api_key=api_key, timeout=timeout):
        sys.exit(1)


def _not_implemented(name: str) -> None:
    raise BuilderError(f"`builder {name}` is not implemented yet")


def main() -> None:
    cli(prog_name="builder")


if __name__ == "__main__":
    main()
