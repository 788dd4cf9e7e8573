"""Jinja2 templates -> one Dockerfile.<backend> per registered backend, compose.yaml, and
compose.xinference-cluster.yaml (Xinference's distributed mode on one host).

Templates hold layout; every decision (which base, which flags) is made here or in the spec and
handed to them as plain values. Per-model values (model id, quantization, labels) are not
rendered in: they reach the build as build args, so the committed top-level files serve any model.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import jinja2

from builder import __version__, backends
from builder.image.cluster import CLUSTER
from builder.spec import BuildSpec

TEMPLATES = Path(__file__).parent / "templates"
# Output file -> (template, the backend it belongs to or None).
OUTPUTS: dict[str, tuple[str, backends.Backend | None]] = {
    **{b.dockerfile: (b.template, b) for b in backends.REGISTRY.values()},
    "compose.yaml": ("compose.yaml.j2", None),
    "compose.xinference-cluster.yaml": ("compose.xinference-cluster.yaml.j2", None),
}


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["exec_form"] = lambda argv: json.dumps(list(argv))  # ["cmd", "arg", ...]
    return env


def render_text(spec: BuildSpec) -> dict[str, str]:
    """Every output file's text. Templates get the spec, the registry and (Dockerfiles) their backend."""
    env = environment()
    return {
        name: env.get_template(template).render(
            spec=spec,
            version=__version__,
            backends=backends.REGISTRY,
            backend=backend,
            cluster=CLUSTER,
            llamacpp=llamacpp_build(spec, backend),
            xllamacpp_version=backends.XLLAMACPP_VERSION,
        )
        for name, (template, backend) in OUTPUTS.items()
    }


def llamacpp_build(spec: BuildSpec, backend: backends.Backend | None) -> dict | None:
    """How a GGUF-serving image compiles llama.cpp (None for the others): CUDA or not, and the CMake flags."""
    if backend is None or not backend.serves_gguf(spec):
        return None
    from builder.model.gguf import llamacpp

    cuda = backend.uses_cuda(spec)
    return {
        "cuda": cuda,
        "flags": llamacpp.cmake_image_flags(spec.cuda_architectures if cuda else None, spec.llamacpp_cpu),
        "targets": llamacpp.TARGETS,
        "commit": llamacpp.COMMIT,
        "sdist": f"{llamacpp.SDIST} {llamacpp.VERSION}",
    }


def render_all(spec: BuildSpec, out: Path) -> list[Path]:
    """Write every output file into `out`, each atomically (temp file + rename)."""
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
