"""Which backends a build gets: the spec's list, or (BACKEND=auto) every backend whose record accepts
the model and can produce QUANT. Decisions come back with their reasons; callers print them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from builder import backends
from builder.errors import BuilderError
from builder.model.vision import vision_architecture
from builder.spec import BuildSpec

if TYPE_CHECKING:
    from builder.model.adapter import AdapterFacts


@dataclass
class Selection:
    backends: list[str]  # in registry order
    skipped: dict[str, str] = field(default_factory=dict)  # BACKEND=auto: backend -> why not
    lora: dict[str, LoraPlan] = field(default_factory=dict)  # with adapters: backend -> merged or served, and why
    adapters: dict[str, Path] = field(default_factory=dict)  # served name -> adapter folder
    facts: dict[str, AdapterFacts] = field(default_factory=dict)  # served name -> the adapter read on a local base
    vision: str | None = None  # a vision-language model: its architecture
    spec: BuildSpec | None = None

    def vision_lines(self) -> list[str]:
        """For `make spec`: a vision-language model, what each adapter changes of it (language model, vision
        tower, projector) and what each chosen backend does with its images."""
        if not self.vision:
            return []
        lines = [f"VISION: {self.vision} (images in through the OpenAI image_url content part)"]
        lines += [f"ADAPTER {name} changes: " + "; ".join(f"{p}: {what}" for p, what in f.parts.items())
                  for name, f in self.facts.items()]  # fmt: skip
        for name in self.backends:
            plan = backends.get(name).vision_plan(self.spec) if self.spec is not None else None
            if plan:
                lines.append(f"IMAGES on {name}: {plan}")
        return lines

    def served_by(self, backend: str) -> dict[str, Path]:
        """The adapters `backend` serves unmerged ({}: none, or it merges the one adapter)."""
        plan = self.lora.get(backend)
        return dict(self.adapters) if plan is not None and plan.mode == "serve" else {}


def select_backends(spec: BuildSpec, config: dict | None) -> Selection:
    """The backends to build, and how each serves the adapters. A chosen backend that cannot serve the
    model, its adapters, or QUANT is an error that says why; `config` None (a hub model, not readable before
    the build) skips the model checks."""
    adapters = served_adapters(spec)
    facts = adapter_facts(spec, adapters) if config is not None else None
    per_adapter = facts or dict.fromkeys(adapters)
    if not spec.backends and config is None:
        raise BuilderError("BACKEND=auto needs a local model to read config.json from; for hub models pass BACKEND=...")
    chosen, skipped, lora = [], {}, {}
    vision = vision_architecture(config) if config is not None else None
    for backend in backends.REGISTRY.values():
        if spec.backends and backend.name not in spec.backends:
            continue
        explicit = bool(spec.backends)
        reason = None
        if config is not None and (backend.check_explicit or not explicit):
            reason = backend.check(config, spec)
        if reason is None and vision:  # a backend without image input is never built text-only
            reason = backend.vision_gap(config, spec)
        plan = plan_lora(spec, backend, per_adapter) if adapters else None
        if reason is None and isinstance(plan, str):
            reason = plan
            if explicit:
                reason += _adapter_hint(spec, per_adapter)
        if reason is None and not explicit:
            reason = _quant_gap(spec, backend)
        if reason and explicit:
            raise BuilderError(f"BACKEND={backend.name}: {backend.title} cannot serve this model: {reason}")
        if reason:
            skipped[backend.name] = reason
            continue
        chosen.append(backend.name)
        if isinstance(plan, LoraPlan):
            lora[backend.name] = plan
    if not chosen:
        raise BuilderError("no backend serves this model:\n  " + "\n  ".join(f"{k}: {v}" for k, v in skipped.items()))
    for name in chosen:
        _check_quant(spec, backends.get(name))
    return Selection(chosen, skipped, lora, adapters, facts or {}, vision, spec)


def _adapter_hint(spec: BuildSpec, facts: dict[str, AdapterFacts | None]) -> str:
    """Which backends would serve these adapters unmerged."""
    able = [b.name for b in backends.REGISTRY.values() if isinstance(plan_lora(spec, b, facts), LoraPlan)]
    return f"; BACKEND={','.join(able)} can serve them" if able else "; no backend can serve them unmerged yet"


def _quant_gap(spec: BuildSpec, backend: backends.Backend) -> str | None:
    types = backend.quant_types(spec)
    return f"it cannot produce QUANT={spec.quant}" if spec.quant and types and spec.quant not in types else None


def _check_quant(spec: BuildSpec, backend: backends.Backend) -> None:
    """QUANT, when given, must be a type every chosen backend that quantizes can produce."""
    types = backend.quant_types(spec)
    if spec.quant and types and spec.quant not in types:
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


# -- adapters: merged, or served unmerged -------------------------------------------------------------


@dataclass
class LoraPlan:
    mode: str  # "merge" (the one adapter merged into the weights) or "serve" (adapters unmerged)
    reason: str


def served_adapters(spec: BuildSpec) -> dict[str, Path]:
    """The adapters a build serves, by served name: the named ones; a SWIFT run folder's checkpoints
    (checkpoint-N, and `best`); or the one ADAPTER, under the model's served name (it is the fine-tune)."""
    if spec.adapters:
        return dict(spec.adapters)
    if spec.adapter is None:
        return {}
    if spec.adapter.is_dir() and not (spec.adapter / "adapter_config.json").is_file():
        from builder.model.adapter import run_checkpoints

        checkpoints = run_checkpoints(spec.adapter)
        if checkpoints:
            return checkpoints
    return {spec.served_model_name or "model": spec.adapter}


def adapter_facts(spec: BuildSpec, adapters: dict[str, Path]) -> dict[str, AdapterFacts] | None:
    """Each adapter read on the build's base (a local MODEL), before any heavy step; None for a hub model,
    whose weights the host cannot read (the build stage checks again)."""
    if not adapters or spec.model_source != "local":
        return None
    from builder.model.adapter import read_adapter

    return {name: read_adapter(path, Path(spec.model)) for name, path in adapters.items()}


def plan_lora(spec: BuildSpec, backend: backends.Backend, facts: dict[str, AdapterFacts | None]) -> LoraPlan | str:
    """How `backend` serves the adapters: a LoraPlan, or (a string) why it cannot serve them at all."""
    problems = [f"{name}: {p}" for name, f in facts.items() if f is not None for p in backend.adapter_problems(f)]
    if not backend.serves_adapters:
        problems = [f"{backend.title} serves merged weights only"]
    if spec.lora_mode != "merge" and not problems:
        return LoraPlan("serve", f"{len(facts)} adapter(s) unmerged over one base")
    if spec.lora_mode == "serve":
        return "LORA=serve, but " + "; ".join(problems)
    if len(facts) > 1:
        return f"it merges one adapter and {len(facts)} are given ({'; '.join(problems)})"
    return LoraPlan("merge", "LORA=merge" if spec.lora_mode == "merge" else "merged: " + "; ".join(problems))
