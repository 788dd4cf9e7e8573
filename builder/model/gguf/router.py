"""llama-server's router mode over one base GGUF and its LoRA GGUFs: the preset INI, one section per served name.

The router (llama-server started with --models-preset and no model) starts one child llama-server per
section and sends each request to the child named by the request's `model`: the base under the model's
served name, each adapter under its own name (`lora = FILE`: applied at scale 1). An unknown name is
answered 400 "model 'x' not found"; /v1/models lists the sections. Every child maps the same base file,
so the base is in memory once; `no-repack` keeps it so (CPU weight repacking copies the whole base into
each child: 830 MB instead of 251 MB for a 76M f16 model with three adapters on an AMX host, see
docs/adapters.md). `load-on-startup` starts every child with the router (else the first request per name
waits for a load); the router must be allowed that many children (`--models-max`, models_max()).
"""

from __future__ import annotations

import re

from builder.errors import BuilderError

MODELS = "/models"  # the image's weights folder (what a weights image holds, and an engine mounts)
BASE_GGUF = f"{MODELS}/model.gguf"
MMPROJ_GGUF = f"{MODELS}/mmproj.gguf"  # a vision-language model's vision tower + projector
LORA_DIR = f"{MODELS}/lora"
PRESET = f"{MODELS}/preset.ini"
# A section name is a served model name: what spec.SERVED_NAME accepts, and nothing an INI line could misread.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
SHARED = {"no-repack": "true"}  # the [*] section: every child


def lora_path(name: str) -> str:
    """Where the image keeps adapter `name`'s GGUF LoRA."""
    return f"{LORA_DIR}/{name}.gguf"


def base_name(served_name: str, adapters: list[str] | tuple[str, ...]) -> str:
    """The base's section: the served name, unless the one adapter is served under it (ADAPTER=path: the
    fine-tune is the model), then `<served name>-base`."""
    return f"{served_name}-base" if served_name in adapters else served_name


def models_max(adapters: list[str] | tuple[str, ...]) -> int:
    """How many children the router may run at once: the base and every adapter (its default, 4, would
    evict the least recently used one, and load-on-startup refuses to start more than it allows)."""
    return len(adapters) + 1


def router_preset(served_name: str, adapters: list[str] | tuple[str, ...], base: str = BASE_GGUF,
                  lora: dict[str, str] | None = None, mmproj: str | None = None) -> str:  # fmt: skip
    """The preset INI: [*] shared settings, [base_name()] the base alone, [NAME] the base + adapter NAME's
    LoRA (`lora` maps names to files; default lora_path(NAME)); `mmproj`: a vision-language base's mmproj GGUF,
    in every section (the adapters change the language model only, so they share the base's)."""
    served_name = base_name(served_name, adapters)
    names = [served_name, *adapters]
    for name in names:
        if not NAME.fullmatch(name):
            raise BuilderError(f"{name!r} cannot be a served model name (letters, digits, . _ : -)")
    if len(set(names)) != len(names):
        raise BuilderError(f"served names must differ: {', '.join(names)}")
    lora = lora or {}
    lines = ["; Written by builder (builder/model/gguf/router.py): one section per served model name.",
             "version = 1", "", "[*]", *(f"{k} = {v}" for k, v in SHARED.items())]  # fmt: skip
    for name in names:
        lines += [
            "",
            f"[{name}]",
            f"model = {base}",
            *([f"mmproj = {mmproj}"] if mmproj else []),
            "load-on-startup = true",
        ]
        if name != served_name:
            lines.append(f"lora = {lora.get(name, lora_path(name))}")
    return "\n".join(lines) + "\n"
