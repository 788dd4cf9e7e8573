"""The package works installed, not only from the checkout: the wheel carries every data file the code
reads (templates, requirements lists, llama.cpp's architecture list), and `builder convert --format gguf`
runs from a clean venv where `builder` is that wheel."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "builder"

pytestmark = pytest.mark.slow


def _run(cmd: list, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kw)
    assert res.returncode == 0, f"{cmd}:\n{res.stdout}\n{res.stderr}"
    return res


def _data_files() -> set[str]:
    """Every file under builder/ the code may read at run time: all but Python sources and caches."""
    return {
        str(p.relative_to(REPO))
        for p in PACKAGE.rglob("*")
        if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts
    }


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the checkout (so that the build leaves nothing in the checkout)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    shutil.copytree(PACKAGE, src / "builder", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
          "--disable-pip-version-check", "-q", "-w", root / "dist", src])  # fmt: skip
    (whl,) = (root / "dist").glob("llm_image_builder-*.whl")
    return whl


def test_wheel_carries_every_data_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(_data_files() - names)
    assert not missing, f"pyproject.toml's package-data leaves out {missing}"


def test_gguf_conversion_from_a_clean_venv(wheel, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from builder.demo.tiny import make_random_llama
    from builder.model.gguf.convert import read_gguf, source_dir

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
          "--disable-pip-version-check", "-q", wheel])  # fmt: skip
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    # The dependencies (torch, transformers, gguf...) from this venv's site-packages, added to sys.path as a
    # plain folder: its .pth files (the checkout's editable finder among them) do not run.
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    model = make_random_llama(tmp_path / "llama")
    work = tmp_path / "work"  # outside the checkout: nothing can resolve `builder` from the current folder
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "LLAMA_"))}
    env["LLAMA_CPP_SRC"] = str(source_dir())  # the pinned source (the installed package's host cache is elsewhere)
    where = _run([python, "-c", "import builder; print(builder.__file__)"], cwd=work, env=env).stdout.strip()
    assert Path(where).is_relative_to(venv) and not Path(where).is_relative_to(REPO), where
    cmd = [python, "-m", "builder", "convert", "--format", "gguf", "--model", model, "--quant", "f16"]
    _run([*cmd, "--out", "x.gguf", "--quiet"], cwd=work, env=env)
    info = read_gguf(work / "x.gguf")
    assert info.architecture == "llama" and info.file_type == "MOSTLY_F16"
