"""The backend registry: one record per serving backend, the single place a backend varies.

Spec, selection, render, build, compose, k8s, smoke and the demo read the records; none of them names
a backend. The built-in records live one per module beside this file (`BUILTIN`, in registry order:
the order of compose services, .env entries and k8s bases). Out-of-tree backends are plug-ins: each
folder on $BUILDER_BACKENDS_PATH (os.pathsep-separated) may hold `<name>.py` defining `BACKEND` and
its template `<name>.Dockerfile.j2`; they are registered after the built-in ones.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import replace
from pathlib import Path

from builder.backends.base import (
    OPENAI_FEATURES,
    REMOTE_CODE,
    Backend,
    DemoBases,
    Healthcheck,
    NoOptions,
    Topology,
    bash_probe,
    http_probe,
)

__all__ = [
    "BUILTIN", "REGISTRY", "NAMES", "QUANTS", "DEMO", "OPENAI_FEATURES", "REMOTE_CODE", "Backend", "DemoBases", "Healthcheck",
    "NoOptions", "Topology", "bash_probe", "get", "http_probe",
]  # fmt: skip

BUILTIN = ("vllm", "chatglmcpp", "llamacpp", "xinference")
PLUGIN_PATH_ENV = "BUILDER_BACKENDS_PATH"


def _plugins() -> list[Backend]:
    """Records from the folders on $BUILDER_BACKENDS_PATH; their templates are looked up beside them."""
    found = []
    for folder in filter(None, os.environ.get(PLUGIN_PATH_ENV, "").split(os.pathsep)):
        for path in sorted(Path(folder).glob("*.py")):
            spec = importlib.util.spec_from_file_location(f"builder_backend_plugin_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            record = getattr(module, "BACKEND", None)
            if isinstance(record, Backend):
                found.append(replace(record, template_dir=path.parent))
    return found


def _load() -> dict[str, Backend]:
    records = [importlib.import_module(f"builder.backends.{name}").BACKEND for name in BUILTIN]
    registry: dict[str, Backend] = {}
    for record in records + _plugins():
        if record.name in registry:
            raise ValueError(f"backend {record.name!r} is registered twice")
        registry[record.name] = record
    return registry


REGISTRY: dict[str, Backend] = _load()
NAMES: tuple[str, ...] = tuple(REGISTRY)
QUANTS: tuple[str, ...] = tuple(dict.fromkeys(q for b in REGISTRY.values() for q in b.quants))
DEMO: tuple[str, ...] = tuple(b.name for b in REGISTRY.values() if b.demo)


def get(name: str) -> Backend:
    return REGISTRY[name]
