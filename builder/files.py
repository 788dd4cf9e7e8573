"""Atomic writes: every output appears whole or not at all.

A file or folder is written under a hidden temporary name beside its target (same filesystem, so the
final rename is atomic) and renamed into place only when complete; on any error, interrupts included,
the temporary is removed and the target is left as it was.

Standard library only, and imported by every tier: the runtime images ship this file next to
builder/__init__.py, and the llama.cpp source stage runs beside a copy of it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_file(path: Path | str, mode: int = 0o644) -> Iterator[Path]:
    """Yield a temporary path beside `path`; write it fully inside the block, and it becomes `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, mode)  # before any byte is written: a 0600 secret is never readable by others
        yield tmp
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path | str, data: str | bytes, mode: int = 0o644) -> Path:
    """Write `data` (text as UTF-8) to `path` atomically; returns `path`."""
    path = Path(path)
    with atomic_file(path, mode) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


@contextmanager
def atomic_dir(path: Path | str, replace: bool = False, mode: int = 0o755) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; filled inside the block, it becomes `path`.

    An existing `path` is an error unless `replace` is true; then it is swapped out only once the new
    folder is complete (renamed aside, the new one renamed in, the old one deleted)."""
    path = Path(path)
    if path.exists() and not replace:
        raise FileExistsError(f"{path} already exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        os.chmod(tmp, mode)
        if not (path.exists() or path.is_symlink()):
            os.replace(tmp, path)
            return
        trash = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
        os.replace(path, trash / path.name)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(trash / path.name, path)  # put the old one back
            raise
        finally:
            shutil.rmtree(trash, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
