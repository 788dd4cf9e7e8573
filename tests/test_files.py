"""builder/files.py: an output appears whole or not at all, and a failed write leaves the target as it was."""

from __future__ import annotations

import os
import stat

import pytest

from builder.files import atomic_dir, atomic_file, write_atomic


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_write_atomic_text_bytes_and_mode(tmp_path):
    path = write_atomic(tmp_path / "a" / "f.txt", "héllo")
    assert path.read_text() == "héllo" and stat.S_IMODE(path.stat().st_mode) == 0o644
    secret = write_atomic(tmp_path / ".env", b"KEY=1\n", mode=0o600)
    assert secret.read_bytes() == b"KEY=1\n" and stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert _leftovers(tmp_path) == [".env"]


def test_failed_file_write_keeps_the_old_file(tmp_path):
    path = write_atomic(tmp_path / "f", "old")
    with pytest.raises(KeyboardInterrupt), atomic_file(path) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert path.read_text() == "old" and _leftovers(tmp_path) == []


def test_secret_is_never_world_readable_while_written(tmp_path):
    with atomic_file(tmp_path / "s", mode=0o600) as tmp:
        assert stat.S_IMODE(os.stat(tmp).st_mode) == 0o600


def test_atomic_dir_creates_replaces_and_rolls_back(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "one").write_text("1")
    assert sorted(p.name for p in out.iterdir()) == ["one"]
    with pytest.raises(FileExistsError):
        with atomic_dir(out):
            pass
    with pytest.raises(RuntimeError), atomic_dir(out, replace=True) as tmp:
        (tmp / "two").write_text("2")
        raise RuntimeError("boom")
    assert sorted(p.name for p in out.iterdir()) == ["one"]
    with atomic_dir(out, replace=True) as tmp:
        (tmp / "two").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["two"]
    assert _leftovers(tmp_path) == []
