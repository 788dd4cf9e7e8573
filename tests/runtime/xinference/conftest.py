"""Shared by the builder.runtime.xinference tests: a tiny random GLM folder (HF format, chat template)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from builder.demo.tiny import make_random_glm

    return make_random_glm(tmp_path_factory.mktemp("xinf") / "model")
