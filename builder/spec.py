"""The build spec: one typed object that every stage receives.

Precedence, highest first: command-line flags (or their BUILDER_* environment variables, which is
how the Makefile hands over its variables), then the YAML file given with `--spec`, then the
defaults below.

Everything here that reaches a Dockerfile, a build arg or compose.yaml is validated against a
strict grammar, so a model name or path can never inject a line, a quote or a shell expansion.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from builder import backends
from builder.errors import BuilderError

Backend = Literal[backends.NAMES]  # type: ignore[valid-type]
Quant = Literal[backends.QUANTS]  # type: ignore[valid-type]
ModelHub = Literal["auto", "local", "huggingface", "modelscope"]
LoraMode = Literal["auto", "merge", "serve"]
QualityMode = Literal["auto", "on", "off"]
Device = Literal["auto", "cpu", "cuda"]

# OCI distribution-spec reference grammar (docker/distribution reference/regexp.go), anchored.
_ALNUM = r"[a-z0-9]+"
_SEP = r"(?:[._]|__|[-]+)"
_PATH_COMPONENT = rf"{_ALNUM}(?:{_SEP}{_ALNUM})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
_NAME = rf"(?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"
IMAGE_REF = re.compile(rf"^{_NAME}(?::{_TAG})?(?:@{_DIGEST})?$")
REPOSITORY = re.compile(rf"^{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*$")
REGISTRY = re.compile(rf"^{_DOMAIN}(?:/{_PATH_COMPONENT})*$")
TAG = re.compile(rf"^{_TAG}$")

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")
SERVED_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]{0,63}$")
CUDA_ARCHS = re.compile(r"^[0-9]{2,3}[a-z]?(?:;[0-9]{2,3}[a-z]?)*$")
# A local path may hold spaces, but nothing a shell, Dockerfile or YAML file would interpret.
SAFE_PATH = re.compile(r"^[A-Za-z0-9_./ +@,=-]+$")


def _named_path(item: str) -> tuple[str, str]:
    name, sep, path = item.strip().partition("=")
    if not sep or not name.strip() or not path.strip():
        raise ValueError(f"{item.strip()!r}: name each adapter, ADAPTER=name=path,name=path")
    return name.strip(), path.strip()


def _check(pattern: re.Pattern, value: str, what: str) -> str:
    if not pattern.fullmatch(value):
        raise ValueError(f"{value!r} is not a valid {what}")
    return value


class _BaseImages(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @field_validator("*")
    @classmethod
    def _image_ref(cls, v: str) -> str:
        return _check(IMAGE_REF, v, "image reference (OCI grammar, e.g. python:3.12-slim)")


# Base image of each stage, from the registry: `build` (the merge/convert stage), one per backend,
# and `<backend>_cuda` for a backend's CUDA variant. Real public defaults; tests use local bases.
BaseImages = create_model(
    "BaseImages",
    __base__=_BaseImages,
    build=(
        str,
        Field("nvidia/cuda:12.8.1-devel-ubuntu24.04", description="Base of the build stage (fetch, merge, convert)"),
    ),
    **{
        b.name: (str, Field(b.base_image, description=f"Runtime base of the {b.title} image"))
        for b in backends.REGISTRY.values()
    },
    **{
        f"{b.name}_cuda": (str, Field(b.cuda_base, description=f"Runtime base of the {b.title} image's CUDA variant"))
        for b in backends.REGISTRY.values()
        if b.cuda_base
    },
    **{
        f"{b.name}_cpu": (str, Field(b.cpu_base, description=f"Runtime base of the {b.title} image's CPU variant"))
        for b in backends.REGISTRY.values()
        if b.cpu_base
    },
)

# Host ports compose publishes on 127.0.0.1 (containers listen on the registry's port numbers).
Ports = create_model(
    "Ports",
    __config__=ConfigDict(extra="forbid"),
    **{
        b.name: (int, Field(b.port, ge=1, le=65535, description=f"Host port of the {b.title} service"))
        for b in backends.REGISTRY.values()
    },
)


class _BuildSpec(BaseModel):
    """What to build. Field descriptions are the reference page's (builder/reference.py). Each backend's own options
    are added below as `<backend>_<option>` fields (BuildSpec)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    model: str | None = Field(None, description="Local model folder, or a hub id (org/name)")
    model_hub: ModelHub = Field(
        "auto", description="Where `model` comes from; auto: folder if it exists, else Hugging Face"
    )
    revision: str | None = Field(None, description="Hub revision (default: main on Hugging Face, master on ModelScope)")
    adapter: Path | None = Field(
        None,
        description="LoRA adapter folder (peft or SWIFT checkpoint-N), a SWIFT run folder (every checkpoint-N "
        "and best, each a served name), or NAME=PATH,NAME=PATH (which fills `adapters`)",
    )
    adapters: dict[str, Path] = Field(
        default_factory=dict,
        description="LoRA adapters served unmerged under their own names, {NAME: PATH} (ADAPTER=name=path,...)",
    )
    lora_mode: LoraMode = Field(
        "auto",
        description="merge: the one adapter merged into the weights; serve: adapters unmerged over one base; "
        "auto: serve on every backend that can serve these adapters unmerged, merge elsewhere",
    )
    backends: list[Backend] | None = Field(
        None,
        description="Backends to build (comma list); unset or auto: every backend that supports the model "
        "and can produce QUANT",
    )
    quant: Quant | None = Field(
        None,
        description="Quantization type for every backend that quantizes (a type a chosen backend cannot produce "
        "is an error naming those that can); unset: each format's default (GGUF q4_k_m, chatglm.cpp's GGML q8_0)",
    )
    quality: QualityMode = Field(
        "auto",
        description="Measure each GGUF image's quantized model against its f16/bf16 reference during `make image` "
        "(build/NAME/quality.json, an image label): on, off, or auto (local models up to ~2B parameters)",
    )
    quality_min_top1: float | None = Field(
        None, ge=0, le=1, description="Fail the build when a measured artifact's top-1 agreement is below this (0-1)"
    )
    quality_eval: Path | None = Field(
        None, description="Eval prompts (JSONL: messages, conversations, query/response, alpaca) for the quality step"
    )
    served_model_name: str | None = Field(
        None, description="Name the APIs answer to (default: model folder or repo name)"
    )
    name: str = Field("llm", description="Image repository name; images are [REGISTRY/]NAME-BACKEND:TAG")
    tag: str = Field("latest", description="Image tag")
    registry: str | None = Field(None, description="Registry prefix, e.g. ghcr.io/acme or 127.0.0.1:5000")
    base_images: BaseImages = Field(
        default_factory=BaseImages,
        description="Base image of each stage: `build`, one per backend, `<backend>_cuda`, `<backend>_cpu`",
    )
    device: Device = Field(
        "auto",
        description="Which variant of each backend to build: auto (vLLM on CUDA, the others on CPU), cpu (every "
        "backend's CPU variant, vLLM's included), cuda (every backend's CUDA variant, where it has one)",
    )
    cuda: bool = Field(
        False, description="The older switch for device: cuda (build the CUDA variant of every backend that has one)"
    )
    cuda_architectures: str = Field("80;86;89;90", description="CMAKE_CUDA_ARCHITECTURES for the CUDA builds")
    ca_bundle: Path | None = Field(None, description="CA bundle for TLS-intercepting proxies (BuildKit secret)")
    wheelhouse: Path | None = Field(None, description="Folder of local wheels pip uses inside the build")
    hub_token_env: str = Field("HF_TOKEN", description="Environment variable holding the hub token (BuildKit secret)")
    api_key_env: str = Field("API_KEY", description="Compose variable holding the API key handed to every backend")
    trust_remote_code: bool = Field(False, description="Allow code from the model folder (vLLM, Xinference)")
    ports: Ports = Field(default_factory=Ports, description="Host port of each backend's service, on 127.0.0.1")

    @field_validator("model")
    @classmethod
    def _model(cls, v: str | None) -> str | None:
        if v is None or HUB_ID.fullmatch(v):
            return v
        return _check(SAFE_PATH, v, "model (a folder path without quotes or shell characters, or a hub id org/name)")

    @field_validator("adapter", "ca_bundle", "wheelhouse", "quality_eval")
    @classmethod
    def _path(cls, v: Path | None) -> Path | None:
        if v is not None:
            _check(SAFE_PATH, str(v), "path (no quotes, newlines or shell characters)")
        return v

    @field_validator("adapters", mode="before")
    @classmethod
    def _adapters(cls, v: Any) -> Any:
        """`name=path,name=path` (how ADAPTER passes several) or a mapping; names are served model names."""
        if isinstance(v, str):
            v = dict(_named_path(item) for item in v.split(",") if item.strip())
        if isinstance(v, dict):
            for name, path in v.items():
                _check(SERVED_NAME, str(name), "adapter name (letters, digits, . _ : -)")
                _check(SAFE_PATH, str(path), "adapter path (no quotes, newlines or shell characters)")
        return v

    @model_validator(mode="before")
    @classmethod
    def _adapter_list(cls, data: Any) -> Any:
        """ADAPTER holding `name=path[,...]` fills `adapters`; a plain path stays the one `adapter`."""
        if isinstance(data, dict) and isinstance(data.get("adapter"), str) and "=" in data["adapter"]:
            data = dict(data)
            if data.get("adapters"):
                raise ValueError("give named adapters once: ADAPTER=name=path,... or `adapters:` in the SPEC file")
            data["adapters"] = data.pop("adapter")
        return data

    @field_validator("revision")
    @classmethod
    def _revision(cls, v: str | None) -> str | None:
        return v if v is None else _check(REVISION, v, "revision (branch, tag or commit)")

    @field_validator("served_model_name")
    @classmethod
    def _served(cls, v: str | None) -> str | None:
        return v if v is None else _check(SERVED_NAME, v, "served model name (letters, digits, . _ : -)")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check(REPOSITORY, v, "image repository name (lowercase, OCI grammar)")

    @field_validator("tag")
    @classmethod
    def _tag(cls, v: str) -> str:
        return _check(TAG, v, "image tag")

    @field_validator("registry")
    @classmethod
    def _registry(cls, v: str | None) -> str | None:
        return v if v is None else _check(REGISTRY, v.rstrip("/"), "registry (host[:port][/namespace])")

    @field_validator("hub_token_env", "api_key_env")
    @classmethod
    def _env_name(cls, v: str) -> str:
        return _check(ENV_NAME, v, "environment variable name (A-Z, 0-9, _)")

    @field_validator("cuda_architectures")
    @classmethod
    def _cuda(cls, v: str) -> str:
        return _check(CUDA_ARCHS, v, "CUDA architecture list (e.g. 80;86;90)")

    @field_validator("backends", mode="before")
    @classmethod
    def _backends(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = None if v.strip() in ("", "auto") else [b.strip() for b in v.split(",") if b.strip()]
        if isinstance(v, list) and len(set(v)) != len(v):
            raise ValueError("lists a backend twice")
        return v

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        """A spec key a backend renamed (its record's `renamed_options`) still sets the field that replaced it."""
        if isinstance(data, dict):
            for b in backends.REGISTRY.values():
                for old, new in b.renamed_options.items():
                    if old in data:
                        data = dict(data)
                        data.setdefault(new, data.pop(old))
        return data

    @model_validator(mode="after")
    def _device(self) -> _BuildSpec:
        """`cuda: true` is `device: cuda`; `device: cuda` reads back as `cuda: true`."""
        if self.cuda and self.device == "cpu":
            raise ValueError("cuda: true asks for the CUDA variants, device: cpu for the CPU ones: give one")
        if self.cuda and self.device == "auto":
            object.__setattr__(self, "device", "cuda")
        object.__setattr__(self, "cuda", self.device == "cuda")
        return self

    @model_validator(mode="after")
    def _served_default(self) -> _BuildSpec:
        if self.served_model_name is None and self.model:
            stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(self.model.rstrip("/")).name).strip("-.") or "model"
            object.__setattr__(self, "served_model_name", stem[:128])
        if self.adapter is not None and self.adapters:
            raise ValueError("give either one ADAPTER path or named adapters (ADAPTER=name=path,...), not both")
        if self.served_model_name in self.adapters:
            raise ValueError(f"adapter name {self.served_model_name!r} is the base model's served name: rename it")
        return self

    # -- derived values ---------------------------------------------------------------------

    def image(self, backend: str) -> str:
        """`[REGISTRY/]NAME-BACKEND:TAG`, the reference `builder build` tags and compose runs."""
        return f"{self._prefix}{self.name}-{backend}:{self.tag}"

    @property
    def _prefix(self) -> str:
        return f"{self.registry.rstrip('/')}/" if self.registry else ""

    def engine_image(self, backend: str) -> str:
        """`[REGISTRY/]BACKEND-engine:PIN`: the backend's runtime without weights (serves what is mounted at
        /models); the same for every model, tagged by the engine's pin."""
        return f"{self._prefix}{backend}-engine:{backends.get(backend).engine_tag(self)}"

    def weights_image(self, backend: str | None = None) -> str:
        """`[REGISTRY/]NAME-weights[SUFFIX]:TAG`: FROM scratch, the runtime images' weights layer under /models
        (no backend, or llama.cpp's: /models/model.gguf; `-hf`, vLLM's: the Hugging Face folder /models/model)."""
        return f"{self._prefix}{self.name}-weights{self._format_suffix(backend)}:{self.tag}"

    def lora_image(self, adapter: str, backend: str | None = None) -> str:
        """`[REGISTRY/]NAME-lora[SUFFIX]:TAG-ADAPTER` (`:` in the name as `_`): one adapter's layer (a GGUF LoRA;
        `-hf`: the adapter's own folder)."""
        return f"{self._prefix}{self.name}-lora{self._format_suffix(backend)}:{self._suffixed_tag(adapter)}"

    @staticmethod
    def _format_suffix(backend: str | None) -> str:
        return backends.get(backend).weights_suffix if backend else ""

    def model_artifact(self, adapter: str | None = None, flavour: str = "") -> str:
        """`[REGISTRY/]NAME-model:TAG[-ADAPTER][-FLAVOUR]`: the GGUF as a model artifact (Docker's model
        format; `flavour` "modelpack": CNCF ModelPack), with one adapter's LoRA when `adapter` is named."""
        tag = self._suffixed_tag(adapter) if adapter else self.tag
        return f"{self._prefix}{self.name}-model:{tag}{'-' + flavour if flavour else ''}"

    def _suffixed_tag(self, adapter: str) -> str:
        tag = f"{self.tag}-{adapter.replace(':', '_')}"
        if not TAG.fullmatch(tag + "-modelpack"):  # the longest tag made of it
            raise BuilderError(f"tag {self.tag!r} and adapter name {adapter!r} make too long an image tag (128)")
        return tag

    @property
    def model_source(self) -> Literal["local", "huggingface", "modelscope"]:
        if self.model_hub != "auto":
            return self.model_hub
        if self.model and Path(self.model).is_dir():
            return "local"
        if self.model and HUB_ID.fullmatch(self.model):
            return "huggingface"
        raise BuilderError(
            f"model {self.model!r} is neither an existing folder nor a hub id (org/name); "
            "check the path, or pass --model-hub huggingface|modelscope"
        )

    @property
    def hub_revision(self) -> str:
        return self.revision or ("master" if self.model_source == "modelscope" else "main")

    def runtime_base(self, backend: str) -> str:
        """The runtime base image of `backend`'s variant for `device` (its CUDA or CPU variant's base where it
        has one of its own)."""
        b = backends.get(backend)
        variant = b.device_for(self)
        if variant == "cuda" and b.cuda_base:
            return getattr(self.base_images, f"{backend}_cuda")
        if variant == "cpu" and b.cpu_base:
            return getattr(self.base_images, f"{backend}_cpu")
        return getattr(self.base_images, backend)


def option_fields() -> dict[str, tuple[Any, Any]]:
    """Every backend's own options as spec fields `<backend>_<option>` (type, default and description)."""
    fields: dict[str, tuple[Any, Any]] = {}
    for b in backends.REGISTRY.values():
        for key, option in b.option_fields().items():
            info = b.options.model_fields[option]
            # The option's constraints (a pattern, bounds) travel with its type, so the spec checks them too.
            annotation = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
            fields[key] = (annotation, Field(info.default, description=info.description))
    return fields


BuildSpec = create_model("BuildSpec", __base__=_BuildSpec, __doc__=_BuildSpec.__doc__, **option_fields())


# -- loading ---------------------------------------------------------------------------------


def load_spec(flags: dict[str, Any] | None = None, *, resolve: bool = True) -> BuildSpec:
    """Defaults < YAML file (`spec_file`) < flags. `resolve=True` also checks local paths exist.

    `flags` maps field names to values (None: not given); nested fields use `__`
    (`base_images__build`)."""
    flags = dict(flags or {})
    data: dict[str, Any] = {}
    spec_file = flags.pop("spec_file", None)
    if spec_file is not None:
        data = _read_yaml(Path(spec_file))
    for key, value in flags.items():
        if value is None:
            continue
        *parents, leaf = key.split("__")
        target = data
        for p in parents:
            target = target.setdefault(p, {})
        target[leaf] = value
    try:
        spec = BuildSpec.model_validate(data)
    except ValidationError as e:
        raise BuilderError(_explain(e)) from None
    if resolve:
        check_paths(spec)
    return spec


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise BuilderError(f"spec file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise BuilderError(f"spec file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise BuilderError(f"spec file {path} must hold a mapping of fields, e.g. `model: ./my-model`")
    if isinstance(data.get("backend"), str) and "backends" not in data:
        data["backends"] = data.pop("backend")
    return data


def _explain(e: ValidationError) -> str:
    lines = ["invalid build spec:"]
    for err in e.errors():
        field = ".".join(str(p) for p in err["loc"]) or "spec"
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"  {field}: {msg}")
    return "\n".join(lines)


def check_paths(spec: BuildSpec) -> None:
    """Fail early, with what to do, when a local input is missing."""
    if not spec.model:
        raise BuilderError("no model given: pass MODEL=<folder or hub id> (or --model), or run `make demo`")
    if spec.model_source == "local" and not (Path(spec.model) / "config.json").is_file():
        raise BuilderError(
            f"model folder {spec.model} has no config.json: point MODEL at a Hugging Face-format model folder"
        )
    for field in ("adapter", "ca_bundle", "wheelhouse", "quality_eval"):
        path = getattr(spec, field)
        if path is not None and not path.exists():
            raise BuilderError(f"{field} {path} does not exist")
    if spec.adapter is not None and not spec.adapter.is_dir():
        raise BuilderError(f"adapter {spec.adapter} must be a folder (peft adapter or SWIFT checkpoint-N)")
    for name, path in spec.adapters.items():
        if not path.is_dir():
            raise BuilderError(f"adapter {name}={path} is not a folder (peft adapter or SWIFT checkpoint-N)")


def read_model_config(spec: BuildSpec) -> dict[str, Any] | None:
    """config.json of a local model, or None for hub models (not reachable before the build)."""
    if spec.model_source != "local":
        return None
    try:
        return json.loads((Path(spec.model) / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BuilderError(f"cannot read {spec.model}/config.json: {e}") from None
