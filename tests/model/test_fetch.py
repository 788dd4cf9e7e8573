"""The build stage's model step: hub download (real huggingface_hub, offline cache) and merge."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from builder.errors import BuilderError
from builder.model.fetch import prepare_model, read_token

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _prefill_hf_cache(cache: Path, repo: str, files: dict[str, bytes]) -> Path:
    """The layout huggingface_hub writes: refs/main -> snapshots/<commit>/<files>."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(COMMIT)
    snap = root / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    for name, data in files.items():
        (snap / name).write_bytes(data)
    return snap


def test_download_from_prefilled_cache_offline(tmp_path: Path):
    cache = tmp_path / "hub"
    snap = _prefill_hf_cache(cache, "org/tiny", {"config.json": b"{}", "model.safetensors": b"x"})
    code = (
        "from builder.model.fetch import download; print(download('huggingface', 'org/tiny', None, token='hf_unused'))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert Path(res.stdout.strip()) == snap
    # a model absent from the cache: a clear error, not a traceback
    res = subprocess.run(
        [sys.executable, "-c", code.replace("org/tiny", "org/absent")], capture_output=True, text=True, env=env
    )
    assert res.returncode != 0 and "cannot download org/absent@main" in res.stderr


def test_token_comes_from_the_secret_file(tmp_path: Path):
    assert read_token(tmp_path / "missing") is None
    (tmp_path / "t").write_text("  hf_abc\n")
    assert read_token(tmp_path / "t") == "hf_abc"


def test_local_context_without_model_is_a_clear_error(tmp_path: Path):
    with pytest.raises(BuilderError, match="no config.json"):
        prepare_model("local", "", None, tmp_path, None, tmp_path / "out")


def test_prepare_merges_adapter_from_context(tmp_path: Path):
    from builder.demo.model import build_demo

    base, adapter = build_demo(tmp_path / "demo", quiet=True)
    out = prepare_model("local", "", None, base, adapter, tmp_path / "out")
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
    empty = tmp_path / "empty-adapter"
    empty.mkdir()
    passthrough = prepare_model("local", "", None, base, empty, tmp_path / "out2")
    assert json.loads((passthrough / "config.json").read_text())["architectures"] == ["GlmForCausalLM"]
