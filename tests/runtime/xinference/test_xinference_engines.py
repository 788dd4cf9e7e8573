"""Which OpenAI features Xinference 4.1.0 serves, per engine, measured with the official `openai` client on
the demo model + LoRA: the merged folder on the transformers engine, and its q8_0 GGUF (llama.cpp's own
converter) on the llama.cpp engine (xllamacpp). This is why the image defaults to the llama.cpp engine
on CPU; the docs' feature table states what it measures (the backend record's openai_gaps).

Needs the Xinference venv (`make xinference-venv`) and xllamacpp beside it (`make xllamacpp`, found
through $XLLAMACPP_DIR): `make test` makes both.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _openai_features import FEATURES, probe

from builder import backends
from builder.spec import BuildSpec

REPO = Path(__file__).resolve().parents[3]
XINFERENCE_VENV = Path(os.environ.get("XINFERENCE_VENV") or REPO / ".venv-xinference")
XINFERENCE_LOCAL = XINFERENCE_VENV / "bin" / "xinference-local"
XLLAMACPP_DIR = Path(os.environ.get("XLLAMACPP_DIR") or "")
KEY = "sk-engines-test-0123456789"
BOOT_TIMEOUT = 600

# Measured gaps of each engine (Xinference 4.1.0), as the backend record states them for the docs' feature
# table: a fixed gap makes this test fail, so update the record then.
GAPS = {
    engine: backends.get("xinference").openai_gaps(BuildSpec(xinference_engine=engine))
    for engine in ("llama.cpp", "transformers")
}

needs_xinference = pytest.mark.skipif(not XINFERENCE_LOCAL.exists(), reason=f"no Xinference venv at {XINFERENCE_VENV}")


def test_gguf_registration_and_launch(tmp_path):
    """The llama.cpp engine's registration: ggufv2, the image's QUANT, the folder's one .gguf file."""
    import json

    from builder.runtime.xinference import config, registration

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GlmForCausalLM"], "seq_length": 4096}))
    (tmp_path / "model.gguf").write_bytes(b"GGUF" + bytes(2_000_000))
    env = {"MODEL_PATH": str(tmp_path), "XINFERENCE_ENGINE": "llama.cpp", "XINFERENCE_QUANTIZATION": "q4_k_m"}
    cfg, _ = config.parse_args([], env)
    spec = registration.model_spec(cfg)
    (weights,) = spec["model_specs"]
    assert weights["model_format"] == "ggufv2" and weights["quantization"] == "q4_k_m"
    assert weights["model_file_name_template"] == "model.gguf"
    assert weights["model_uri"] == f"file://{tmp_path.resolve()}" and spec["context_length"] == 4096
    launch = registration.launch_request(cfg, spec)
    assert (launch["model_engine"], launch["model_format"], launch["quantization"]) == ("llama.cpp", "ggufv2", "q4_k_m")
    (tmp_path / "other.gguf").write_bytes(b"GGUF")
    with pytest.raises(config.BootError, match="exactly one .gguf"):
        registration.model_spec(cfg)


@pytest.fixture(scope="module")
def demo_merged(tmp_path_factory) -> Path:
    from builder.demo.model import build_demo
    from builder.model.merge import merge_model

    root = tmp_path_factory.mktemp("engines")
    base, adapter = build_demo(root / "demo")
    return Path(merge_model(base=base, adapter=adapter, out=root / "merged", dtype="auto", device="cpu", quiet=True))


def _gguf_folder(merged: Path, out: Path) -> Path:
    """What the Xinference image ships for the llama.cpp engine: the GGUF beside the small json/jinja files."""
    from builder.model.gguf.convert import convert_gguf

    out.mkdir()
    convert_gguf(merged, "q8_0", out / "model.gguf", quiet=True)
    for f in merged.iterdir():
        if f.suffix in (".json", ".jinja"):
            shutil.copy(f, out / f.name)
    return out


def _boot(model: Path, engine: str, home: Path) -> tuple[subprocess.Popen, str]:
    from _llama_server import free_port

    port = free_port()
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("XINFERENCE_") and k != "API_KEY"}
    env.update(
        XINFERENCE_HOME=str(home), XINFERENCE_HOST="127.0.0.1", XINFERENCE_PORT=str(port),
        XINFERENCE_LOCAL=str(XINFERENCE_LOCAL), XINFERENCE_API_KEY=KEY, XINFERENCE_BOOT_TIMEOUT=str(BOOT_TIMEOUT),
        XINFERENCE_MODEL_PATH=str(model), SERVED_MODEL_NAME="demo", XINFERENCE_ENGINE=engine,
        XINFERENCE_QUANTIZATION="q8_0", PYTHONPATH=os.pathsep.join(p for p in (str(REPO), str(XLLAMACPP_DIR)) if p),
    )  # fmt: skip
    log = open(home / "boot.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "builder.runtime.xinference"], env=env, stdout=log, stderr=log)
    deadline = time.monotonic() + BOOT_TIMEOUT
    while "model 'demo' running" not in (home / "boot.log").read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"Xinference ({engine}) did not start:\n{(home / 'boot.log').read_text()[-4000:]}")
        time.sleep(1)
    return proc, f"http://127.0.0.1:{port}"


@needs_xinference
@pytest.mark.slow
@pytest.mark.parametrize("engine", ["llama.cpp", "transformers"])
def test_openai_features_per_engine(demo_merged, engine, tmp_path):
    if engine == "llama.cpp":
        assert (XLLAMACPP_DIR / "xllamacpp").is_dir(), "run `make xllamacpp` (or set XLLAMACPP_DIR)"
        model = _gguf_folder(demo_merged, tmp_path / "gguf")
    else:
        model = demo_merged
    proc, url = _boot(model, engine, tmp_path / "home")
    try:
        results = probe(url, "demo", KEY)
    finally:
        proc.terminate()
        proc.wait(120)
    print(f"\nXinference 4.1.0, {engine} engine:", {k: v for k, v in results.items()})
    assert "LoRA-tuned" in results["chat"][1]
    assert {f for f in FEATURES if not results[f][0]} == GAPS[engine], results
