"""Registering the model folder with Xinference as a custom LLM (spec version 2) and the launch request
that goes with it.

The registration is persisted under $XINFERENCE_HOME, so it survives restarts; re-registering an
unchanged model is a no-op, a changed one is replaced.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from builder.runtime.xinference.api import Api
from builder.runtime.xinference.config import ENGINES, BootConfig, BootError, log
from builder.runtime.xinference.gguf_meta import registration_facts

# --------------------------------------------------------------------------- the model folder


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}


def chat_template(model_dir: Path) -> str | None:
    """The tokenizer's chat template: tokenizer_config.json's, else chat_template.jinja (transformers 5)."""
    tmpl = _read_json(model_dir / "tokenizer_config.json").get("chat_template")
    if isinstance(tmpl, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in tmpl if isinstance(t, dict)}
        tmpl = named.get("default") or next(iter(named.values()), None)
    if not tmpl and (model_dir / "chat_template.jinja").is_file():
        tmpl = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    if not tmpl and (model_dir / "chat_template.json").is_file():
        tmpl = _read_json(model_dir / "chat_template.json").get("chat_template")
    return tmpl or None


def _id_to_token(model_dir: Path) -> dict[int, str]:
    table: dict[int, str] = {}
    tokenizer = _read_json(model_dir / "tokenizer.json")
    for token in tokenizer.get("added_tokens", []):
        table[int(token["id"])] = token["content"]
    decoder = _read_json(model_dir / "tokenizer_config.json").get("added_tokens_decoder", {})
    for token_id, token in decoder.items():
        table.setdefault(int(token_id), token.get("content") if isinstance(token, dict) else str(token))
    return table


def stop_tokens(model_dir: Path) -> tuple[list[int], list[str]]:
    """Stop ids from generation_config.json (else config.json) eos_token_id, and their token strings."""
    eos = _read_json(model_dir / "generation_config.json").get("eos_token_id")
    if eos is None:
        eos = _read_json(model_dir / "config.json").get("eos_token_id")
    ids = [int(i) for i in (eos if isinstance(eos, list) else [eos]) if i is not None]
    table = _id_to_token(model_dir)
    strings = [table[i] for i in ids if i in table]
    if not strings:
        eos_token = _read_json(model_dir / "tokenizer_config.json").get("eos_token")
        if isinstance(eos_token, dict):
            eos_token = eos_token.get("content")
        if eos_token:
            strings = [eos_token]
    return ids, strings


def context_length(model_dir: Path) -> int:
    """config.json's context length (max_position_embeddings or its other names); 2048 when it has none."""
    config = _read_json(model_dir / "config.json")
    for key in ("max_position_embeddings", "seq_length", "max_sequence_length", "n_positions", "model_max_length"):
        if isinstance(config.get(key), int) and config[key] > 0:
            return config[key]
    text_config = config.get("text_config") or {}
    if isinstance(text_config.get("max_position_embeddings"), int):
        return text_config["max_position_embeddings"]
    return 2048


def parameter_count(model_dir: Path) -> int:
    """Parameters in the folder's *.safetensors files (headers only), else estimated from a GGUF's size."""
    if not any(model_dir.glob("*.safetensors")):
        return sum(f.stat().st_size for f in model_dir.glob("*.gguf")) // 2  # about 2 bytes a weight at 16 bits
    total = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        with open(path, "rb") as fh:
            (header_size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(header_size))
        for name, meta in header.items():
            if name != "__metadata__":
                count = 1
                for dim in meta["shape"]:
                    count *= dim
                total += count
    return total


def size_in_billions(model_dir: Path) -> int | str:
    """Xinference's size label: an int, or "0_5" style for fractions (at least 0.1 so tiny models register)."""
    billions = max(round(parameter_count(model_dir) / 1e9, 1), 0.1)
    return int(billions) if billions == int(billions) else str(billions).replace(".", "_")


def gguf_file(model_dir: Path) -> Path:
    """The one *.gguf file of a folder (the llama.cpp engine's model)."""
    found = sorted(model_dir.glob("*.gguf"))
    if len(found) != 1:
        raise BootError(f"the llama.cpp engine needs exactly one .gguf file in {model_dir}, found {len(found)}")
    return found[0]


# --------------------------------------------------------------------------- the registration and the launch


def _weights_spec(cfg: BootConfig) -> dict:
    """model_specs[0]: the merged folder (pytorch format), or its GGUF (ggufv2, llama.cpp engine)."""
    model_dir = cfg.model_path
    spec = {
        "model_format": "pytorch",
        "model_size_in_billions": size_in_billions(model_dir),
        "quantization": "none",
        "model_id": None,
        "model_uri": f"file://{model_dir.resolve()}",
    }
    if cfg.engine == "llama.cpp":
        # Xinference links the folder into its cache and opens <folder>/<model_file_name_template>.
        spec.update(
            model_format="ggufv2", quantization=cfg.quantization, model_file_name_template=gguf_file(model_dir).name
        )
    return spec


def model_spec(cfg: BootConfig) -> dict:
    """The custom-LLM registration (Xinference LLM family spec version 2) for cfg.model_path.

    Abilities generate+chat (generate only without a chat template), the tokenizer's chat template,
    stop ids/strings from generation_config.json, the context length from config.json (a folder holding a
    GGUF alone: all three from the GGUF's metadata, for the llama.cpp engine), and a `file://` URI: `pytorch` format, or `ggufv2` with the folder's one *.gguf for the llama.cpp engine."""
    model_dir = cfg.model_path
    if (model_dir / "config.json").is_file():
        ids, strings = stop_tokens(model_dir)
        template, context = chat_template(model_dir), context_length(model_dir)
        architectures = _read_json(model_dir / "config.json").get("architectures") or None
    elif cfg.engine == "llama.cpp" and any(model_dir.glob("*.gguf")):
        # The GGUF alone (a weights image mounted on the engine image): what the converter wrote into it.
        facts = registration_facts(gguf_file(model_dir))
        ids, strings, template, context = (
            facts[k] for k in ("stop_token_ids", "stop", "chat_template", "context_length")
        )
        architectures = None
    else:
        raise BootError(f"{model_dir} is not a Hugging Face model folder (no config.json) nor holds a GGUF")
    abilities = ["generate", "chat"] if template else ["generate"]
    if not template:
        log(f"{model_dir} has no chat template: registering with the generate ability only")
    return {
        "version": 2,
        "context_length": cfg.context_length or context,
        "model_name": cfg.model_name,
        "model_lang": ["en", "zh"],
        "model_ability": abilities,
        "model_description": f"{cfg.model_name}, served from {model_dir} by builder",
        "model_family": cfg.model_name,
        "model_specs": [_weights_spec(cfg)],
        "chat_template": template,
        "stop_token_ids": ids,
        "stop": strings,
        "architectures": architectures,
    }


def launch_request(cfg: BootConfig, spec: dict) -> dict:
    """The launch payload stored as the autostart entry (so a restart launches the same thing)."""
    launch = {
        "model_uid": cfg.model_name,
        "model_name": cfg.model_name,
        "model_type": "LLM",
        "model_engine": ENGINES[cfg.engine],
        "model_format": spec["model_specs"][0]["model_format"],
        "model_size_in_billions": spec["model_specs"][0]["model_size_in_billions"],
        "quantization": spec["model_specs"][0]["quantization"],
    }
    if cfg.n_gpu is not None:
        launch["n_gpu"] = cfg.n_gpu
    if cfg.trust_remote_code:
        launch["trust_remote_code"] = True
    launch.update(cfg.launch_args)
    return launch


_SPEC_KEYS = (
    "context_length",
    "model_ability",
    "model_family",
    "chat_template",
    "stop_token_ids",
    "stop",
    "architectures",
)


def _same_registration(existing: Any, spec: dict) -> bool:
    if not isinstance(existing, dict):
        return False
    if any(existing.get(k) != spec.get(k) for k in _SPEC_KEYS):
        return False
    mine, theirs = spec["model_specs"][0], (existing.get("model_specs") or [{}])[0]
    return all(
        str(theirs.get(k)) == str(mine.get(k))
        for k in ("model_format", "model_uri", "model_size_in_billions", "quantization")
    )


def register(api: Api, spec: dict) -> str:
    """Register (persisted). Returns "registered", "unchanged" or "replaced"."""
    name = spec["model_name"]
    status, existing = api.call("GET", f"/v1/model_registrations/LLM/{name}")
    outcome = "registered"
    if status == 200 and existing:
        if _same_registration(existing, spec):
            return "unchanged"
        log(f"registration {name!r} differs from the model folder: replacing it")
        api.call("DELETE", f"/v1/models/{name}")  # a running copy of the old spec, if any
        api.ok("DELETE", f"/v1/model_registrations/LLM/{name}")
        outcome = "replaced"
    status, data = api.call("POST", "/v1/model_registrations/LLM", {"model": json.dumps(spec), "persist": True})
    if status != 200:
        if "already registered" in str(data):  # a concurrent boot won the race: fine
            return "unchanged"
        raise BootError(f"registering {name!r} failed ({status}): {str(data)[:2000]}")
    return outcome
