"""Command line: one thin function per subcommand; the stage modules hold the logic.

Heavy stage modules (torch, chatglm_cpp, xinference) are imported inside their command so that
`render`, `smoke` and `--help` start instantly and work in images that lack them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from builder import __version__
from builder.convert import QUANTS

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


@cli.command("demo-model")
@click.option("--out", type=PathArg, required=True, help="Folder for base/ (tiny GLM) and adapter/ (its LoRA).")
@click.option("--force", is_flag=True, help="Retrain even when the folder is up to date.")
def demo_model(out, force) -> None:
    """Train the embedded demo model (tiny GLM + LoRA, seconds on CPU); print the two folders."""
    from builder.demo import build_demo

    for path in build_demo(out, force=force, quiet=True):
        click.echo(path)


@cli.command()
@spec_options
def build(**flags) -> None:
    """Render, prepare a build context and build the requested backend images."""
    from builder.build import build as build_images
    from builder.spec import load_spec

    build_images(load_spec(flags))


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
    from builder.fetch import prepare_model as run

    click.echo(run(source, model_id, revision or None, local, adapter, out, dtype))


@cli.command()
@spec_options
def push(**flags) -> None:
    """Push every built backend image and verify its digest in the registry."""
    from builder.push import push as push_images
    from builder.spec import load_spec

    push_images(load_spec(flags, resolve=False))


@cli.command()
@click.option("--ggml", type=PathArg, required=True, envvar="GGML_MODEL", help="GGML model file ($GGML_MODEL).")
@click.option("--host", default="0.0.0.0", show_default=True)
@click.option("--port", type=int, default=8001, envvar="PORT", show_default=True, help="($PORT)")
@click.option("--served-model-name", default=None, envvar="SERVED_MODEL_NAME",
              help="Model name the API answers to ($SERVED_MODEL_NAME; default: file stem).")
@click.option("--max-queue", type=int, default=16, show_default=True, help="Requests waiting beyond this get 503.")
def serve(ggml, host, port, served_model_name, max_queue) -> None:
    """OpenAI-compatible server over chatglm_cpp.Pipeline (API key from $API_KEY)."""
    from builder.serve import serve as run_server

    run_server(ggml=ggml, host=host, port=port, served_model_name=served_model_name, max_queue=max_queue)


@cli.command()
@click.option("--ggml", type=PathArg, required=True, envvar="GGML_MODEL", help="GGML model file ($GGML_MODEL).")
@click.option("--system", default=None, help="System prompt.")
@click.option("--max-tokens", type=int, default=None, help="New tokens per reply (default: up to the context).")
@click.option("--temperature", type=float, default=0.8, show_default=True, help="0: greedy.")
@click.option("--top-p", type=float, default=0.8, show_default=True)
@click.option("--top-k", type=int, default=0, show_default=True, help="0: off.")
@click.option("--repetition-penalty", type=float, default=1.0, show_default=True)
def chat(ggml, system, max_tokens, temperature, top_p, top_k, repetition_penalty) -> None:
    """Interactive terminal chat with a GGML model (like chatglm.cpp's `main -i`; `docker run -it IMAGE chat`)."""
    from builder.serve import chat_repl

    chat_repl(ggml, system=system, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
              repetition_penalty=repetition_penalty)


@cli.command()
@click.option("--url", required=True, help="Base URL, e.g. http://127.0.0.1:8001")
@click.option("--model", required=True, help="Served model name.")
@click.option("--api-key", default=None, envvar="API_KEY", help="Bearer key (default: $API_KEY).")
@click.option("--timeout", type=float, default=120.0, show_default=True)
@click.option("--skip", multiple=True, type=click.Choice(["models", "completions", "chat", "chat-stream"]),
              help="A check the backend cannot pass (Xinference's transformers engine: completions).")
def smoke(url, model, api_key, timeout, skip) -> None:
    """Check one OpenAI-compatible server: models, completions, chat (plain and streaming)."""
    from builder.smoke import run_smoke

    if not run_smoke(url=url, model=model, api_key=api_key, timeout=timeout, skip=frozenset(skip)):
        sys.exit(1)


@cli.command()
def demo() -> None:
    """Train the demo model + LoRA, build its images, serve them, ask the LoRA's question."""
    from builder.quickstart import run_demo

    run_demo()


@cli.command("smoke-up")
def smoke_up() -> None:
    """Run `smoke` against every compose service that is up (ports and key from .env)."""
    from builder.quickstart import smoke_running

    if not smoke_running():
        sys.exit(1)


def main() -> None:
    cli(prog_name="builder")


if __name__ == "__main__":
    main()
