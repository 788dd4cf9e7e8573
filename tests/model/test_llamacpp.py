"""builder/model/gguf/llamacpp.py runs alone in the image's llama.cpp source stage: from a folder holding
exactly what that stage COPYs (itself and builder/files.py), with no `builder` package importable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from builder.image.render import render_text
from builder.model.gguf import llamacpp
from builder.spec import BuildSpec

REPO = Path(__file__).resolve().parents[2]


def _source_stage_copies() -> list[tuple[list[str], str]]:
    """(sources, destination) of each `COPY src/...` in the rendered llamacpp-src stage."""
    text = render_text(BuildSpec())["Dockerfile.llamacpp"]
    stage = text[text.index(" AS llamacpp-src") :]
    stage = stage[: stage.index("\nFROM ")]
    copies = []
    for line in stage.splitlines():
        if line.startswith("COPY src/"):
            *sources, dest = line.split()[1:]
            copies.append((sources, dest))
    return copies


def test_llamacpp_runs_standalone_from_what_the_source_stage_copies(tmp_path):
    opt = tmp_path / "opt"
    opt.mkdir()
    for sources, dest in _source_stage_copies():
        for src in sources:
            src_path = REPO / src.removeprefix("src/")
            target = opt / src_path.name if dest.endswith("/") else opt / Path(dest).name
            target.write_bytes(src_path.read_bytes())
    assert sorted(p.name for p in opt.iterdir()) == ["files.py", "llamacpp.py"]
    # -S: no site-packages (so no `builder`, editable or installed), -E: no PYTHONPATH; the script's own
    # folder is first on sys.path, as for `python3 /opt/llamacpp.py` in the image.
    python = [sys.executable, "-S", "-E"]
    no_builder = subprocess.run([*python, "-c", "import builder"], cwd=opt, capture_output=True, text=True)
    assert no_builder.returncode != 0 and "No module named 'builder'" in no_builder.stderr
    res = subprocess.run(
        [*python, "opt/llamacpp.py", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    assert "source" in res.stdout and "build" in res.stdout
    (opt / "files.py").unlink()  # and it is files.py that makes it run: without it, the import fails
    res = subprocess.run([*python, "opt/llamacpp.py", "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode != 0 and "No module named 'files'" in res.stderr


def test_source_patches_apply_once_and_stamp_the_copy(tmp_path):
    texts: dict[str, list[str]] = {}
    replacements: dict[str, list[str]] = {}
    for name, text, replacement, _why in llamacpp.SOURCE_PATCHES:  # a file may take several patches
        texts.setdefault(name, []).append(text)
        replacements.setdefault(name, []).append(replacement)
    for name, parts in texts.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("before\n" + "\n--\n".join(parts) + "\nafter\n")
    llamacpp.apply_patches(tmp_path)
    for name, parts in replacements.items():
        assert (tmp_path / name).read_text() == "before\n" + "\n--\n".join(parts) + "\nafter\n"
    assert (tmp_path / llamacpp.PATCH_STAMP).read_text() == llamacpp.PATCHES_DIGEST
    with pytest.raises(RuntimeError, match="occurs 0 times, not once"):  # a pin whose source moved on says so
        llamacpp.apply_patches(tmp_path)


def test_the_host_source_and_build_carry_the_patches():
    """The host copy `make llamacpp` made (and the image's source stage runs the same fetch_source)."""
    src, host = llamacpp.HOST_HOME / "src", llamacpp.HOST_HOME / "host"
    if not (src / llamacpp.PATCH_STAMP).is_file():
        pytest.skip("no host llama.cpp source (make llamacpp)")
    assert llamacpp.fetch_source(src) == src  # stamped with today's patches: kept as it is
    for name, _text, replacement, _why in llamacpp.SOURCE_PATCHES:
        assert replacement in (src / name).read_text()
    if (host / ".built-with").is_file():
        assert llamacpp.PATCHES_DIGEST in (host / ".built-with").read_text().split()
