"""scripts/vllm-gpu-check.sh (the GPU proof) without a GPU: shell-clean, and the Python it runs
against the served image compiles and finds every name it imports in this repository."""

from __future__ import annotations

import ast
import importlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "vllm-gpu-check.sh"


def embedded_python() -> str:
    text = SCRIPT.read_text()
    start = text.index("<<'EOF'\n") + len("<<'EOF'\n")
    return text[start : text.index("\nEOF\n", start)]


def test_script_is_executable_and_parses():
    assert os.access(SCRIPT, os.X_OK)
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_script_is_shellcheck_clean():
    res = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout


def test_embedded_python_imports_what_exists():
    tree = ast.parse(embedded_python())
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.split(".")[0] in ("builder", "_openai_features")
        ):
            module = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(module, alias.name):  # a submodule: `from builder.demo import model`
                    importlib.import_module(f"{node.module}.{alias.name}")


def test_it_proves_what_the_issue_asks():
    text = SCRIPT.read_text()
    assert 'make image MODEL="$DEMO/base" ADAPTER="$DEMO/adapter" BACKEND=vllm' in text
    assert "docker compose --profile vllm up -d --wait" in text
    code = embedded_python()
    assert "probe(url, served, key" in code  # chat, chat_stream, stop, max_tokens_length, completions, usage
    assert "demo.LORA_ANSWERS" in code and "demo.CHANGED_PROMPT" in code
    from _openai_features import FEATURES

    assert {"chat", "chat_stream", "stop", "completions"} <= set(FEATURES)
