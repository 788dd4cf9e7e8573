"""Which backends a build gets: the spec's list, or (BACKEND=auto) every backend whose record accepts
the model and can produce QUANT. Decisions come back with their reasons; callers print them."""

from __future__ import annotations

from dataclasses import dataclass, field

from builder import backends
from builder.errors import BuilderError
from builder.spec import BuildSpec


@dataclass
class Selection:
    backends: list[str]  # in registry order
    skipped: dict[str, str] = field(default_factory=dict)  # BACKEND=auto: backend -> why not


def select_backends(spec: BuildSpec, config: dict | None) -> Selection:
    """The backends to build. A chosen backend that cannot serve the model, or cannot produce QUANT, is an
    error that says why; `config` None (a hub model, not readable before the build) skips the model checks."""
    if spec.backends:
        chosen = list(spec.backends)
        skipped: dict[str, str] = {}
        if config is not None:
            for name in chosen:
                backend = backends.get(name)
                reason = backend.check(config, spec) if backend.check_explicit else None
                if reason:
                    raise BuilderError(f"BACKEND={name}: {backend.title} cannot serve this model: {reason}")
    elif config is None:
        raise BuilderError("BACKEND=auto needs a local model to read config.json from; for hub models pass BACKEND=...")
    else:
        chosen, skipped = [], {}
        for backend in backends.REGISTRY.values():
            reason = backend.check(config, spec) or _quant_gap(spec, backend)
            if reason:
                skipped[backend.name] = reason
            else:
                chosen.append(backend.name)
        if not chosen:
            raise BuilderError(
                "no backend serves this model:\n  " + "\n  ".join(f"{k}: {v}" for k, v in skipped.items())
            )
    for name in chosen:
        _check_quant(spec, backends.get(name))
    return Selection([name for name in backends.NAMES if name in chosen], skipped)


def _quant_gap(spec: BuildSpec, backend: backends.Backend) -> str | None:
    types = backend.quant_types(spec)
    return f"it cannot produce QUANT={spec.quant}" if types and spec.quant not in types else None


def _check_quant(spec: BuildSpec, backend: backends.Backend) -> None:
    """QUANT must be a type every chosen backend that quantizes can produce."""
    types = backend.quant_types(spec)
    if types and spec.quant not in types:
        accept = [b.name for b in backends.REGISTRY.values() if spec.quant in b.quant_types(spec)]
        raise BuilderError(
            f"QUANT={spec.quant}: {backend.title} cannot produce it (it builds {', '.join(types)})"
            + (f"; {spec.quant} is built by BACKEND={','.join(accept)}" if accept else "")
        )


def chosen_backends(spec: BuildSpec) -> list[str]:
    """For renders that need no model (k8s): the spec's backends; with BACKEND=auto, those that serve the
    local model; without one, all."""
    if spec.backends:
        return [n for n in backends.NAMES if n in spec.backends]
    if spec.model:
        from builder.spec import read_model_config

        config = read_model_config(spec)
        if config is not None:
            return select_backends(spec, config).backends
    return list(backends.NAMES)
