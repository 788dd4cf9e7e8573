"""Jinja2 templates -> Dockerfile.vllm, Dockerfile.chatglmcpp, Dockerfile.xinference, compose.yaml.

Templates hold layout; every decision (which base, which flags) is made here or in the spec and
handed to them as plain values. Per-model values (model id, quantization, labels) are not
rendered in: they reach the build as build args, so the committed top-level files serve any model.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import jinja2

from builder import __version__
from builder.spec import BuildSpec

TEMPLATES = Path(__file__).parent / "templates"
OUTPUTS = {
    "Dockerfile.vllm": "vllm.Dockerfile.j2",
    "Dockerfile.chatglmcpp": "chatglmcpp.Dockerfile.j2",
    "Dockerfile.xinference": "xinference.Dockerfile.j2",
    "compose.yaml": "compose.yaml.j2",
}
# Where each backend's server listens inside its container (compose publishes them on the host).
CONTAINER_PORTS = {"vllm": 8000, "chatglmcpp": 8001, "xinference": 9997}


def environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )


def context(spec: BuildSpec) -> dict:
    return {
        "spec": spec,
        "version": __version__,
        "container_ports": CONTAINER_PORTS,
    }


def render_text(spec: BuildSpec) -> dict[str, str]:
    env = environment()
    ctx = context(spec)
    return {name: env.get_template(template).render(**ctx) for name, template in OUTPUTS.items()}


def render_all(spec: BuildSpec, out: Path) -> list[Path]:
    """Write the four files into `out`, each atomically (temp file + rename)."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render_text(spec).items():
        written.append(write_atomic(out / name, text))
    return written


def write_atomic(path: Path, text: str) -> Path:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
