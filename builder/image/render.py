"""Jinja2 templates -> one Dockerfile.<backend> per registered backend, compose.yaml, and one
compose.<topology>.yaml per extra topology a backend has (Xinference's cluster).

Templates hold layout; every decision (which base, which flags) is made here, in the spec or in the
backend's record, and handed to them as plain values. Per-model values (model id, quantization,
labels) are not rendered in: they reach the build as build args, so the committed top-level files
serve any model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2

from builder import __version__, backends
from builder.files import write_atomic
from builder.spec import BuildSpec

if TYPE_CHECKING:
    from builder.selection import Selection

TEMPLATES = backends.base.TEMPLATES
UID = 10001  # the runtime user of every image (and of the Kubernetes security context)
HOME = "/home/app"  # its home: writable (an emptyDir) under a read-only root filesystem


@dataclass(frozen=True)
class Output:
    template: str
    backend: backends.Backend | None = None
    topology: backends.Topology | None = None


def outputs(spec: BuildSpec) -> dict[str, Output]:
    """Output file -> what renders it."""
    found = {b.dockerfile: Output(b.template_for(spec), b) for b in backends.REGISTRY.values()}
    found["compose.yaml"] = Output("compose.yaml.j2")
    for b in backends.REGISTRY.values():
        for t in b.topologies:
            found[f"compose.{t.name}.yaml"] = Output(f"compose.{t.name}.yaml.j2", b, t)
    return found


def environment() -> jinja2.Environment:
    folders = dict.fromkeys([TEMPLATES, *(b.template_dir for b in backends.REGISTRY.values())])
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader([str(f) for f in folders]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["exec_form"] = lambda argv: json.dumps(list(argv))  # ["cmd", "arg", ...]
    return env


def template_values(spec: BuildSpec, output: Output, selection: Selection | None = None) -> dict[str, Any]:
    """What one template gets: the spec, the registry, and for a backend's files its record, its pins,
    how it compiles llama.cpp, its topology's settings and the adapters it serves unmerged (`selection`:
    a build's; the committed files are rendered without one)."""
    b = output.backend
    return {
        "spec": spec,
        "version": __version__,
        "uid": UID,
        "home": HOME,
        "backends": backends.REGISTRY,
        "backend": b,
        "template": output.template,
        "cluster": output.topology.settings if output.topology else None,
        "llama_cpp": llamacpp_build(spec, b),
        "gguf_toolchain": b.gguf_toolchain_base(spec) if b and b.serves_gguf(spec) else None,
        "served_adapters": list(selection.served_by(b.name)) if selection and b else [],
        **(engine_values(spec, b) if b and b.mounts_weights(spec) else {}),
        # a vision-language model this backend serves with its images (llama.cpp: an mmproj beside the GGUF)
        "vision": bool(selection and selection.vision and b and b.vision_plan(spec)),
        **(b.template_values if b else {}),
    }


def engine_values(spec: BuildSpec, backend: backends.Backend) -> dict[str, str]:
    """The engine image's name in the Dockerfile's comments and labels (without the registry: the committed
    Dockerfiles serve any)."""
    repository, tag = spec.model_copy(update={"registry": None}).engine_image(backend.name).rsplit(":", 1)
    return {"engine_repository": repository, "engine_tag": tag}


def render_text(spec: BuildSpec, selection: Selection | None = None) -> dict[str, str]:
    """Every output file's text."""
    env = environment()
    return {
        name: env.get_template(output.template).render(**template_values(spec, output, selection))
        for name, output in outputs(spec).items()
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
        "targets": llamacpp.image_targets(quality=spec.quality != "off"),
        # the quality tools, copied apart (/opt/llama.cpp-quality) for the `quality` stage only
        "quality_tools": llamacpp.QUALITY_TARGETS if spec.quality != "off" else (),
        "commit": llamacpp.COMMIT,
        "sdist": f"{llamacpp.SDIST} {llamacpp.VERSION}",
    }


def render_all(spec: BuildSpec, out: Path, selection: Selection | None = None) -> list[Path]:
    """Write every output file into `out`, each atomically."""
    return [write_atomic(out / name, text) for name, text in render_text(spec, selection).items()]
