"""The product says what it does, not how it came to be: no tracker numbers, branch names or notes about
who worked on it in code, comments, tests, docs or file names. A reader cannot look those up; the code,
the test's name and the commit log say it better."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Each pattern, and what it catches.
PATTERNS = {
    "a tracker number": re.compile(r"\b(?:issue|ticket|bug)\s?#?\s?[0-9]+", re.IGNORECASE),
    "a numbered point of a task": re.compile(r"\bpoint [0-9]+ of\b", re.IGNORECASE),
    "a work-branch name": re.compile(r"\bi[0-9]{2}-[a-z]"),
    "a work-log word": re.compile(r"\b(?:sessions?|helpers?|tickets?)\b", re.IGNORECASE),
}

# Fixed phrases where a caught word is an API's own name, never a note about the work.
ALLOWED = (
    'scope="session"',  # pytest's fixture scope
    "mtmd-helper.cpp",  # a source file of llama.cpp that the pinned build patches
)

SKIP = {Path(__file__).relative_to(ROOT)}


def tracked_files() -> list[Path]:
    """Every file of the checkout that git tracks or would track (ignored build outputs left out)."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return [Path(p) for p in out.split("\0") if p and (ROOT / p).is_file()]


def history_hits(path: Path, text: str) -> list[str]:
    """`path:line: what` for each pattern found in the file's name or its text (allowed phrases removed)."""
    hits = []
    for what, pattern in PATTERNS.items():
        if pattern.search(str(path)):
            hits.append(f"{path}: file name holds {what}")
    for lineno, line in enumerate(text.splitlines(), 1):
        for phrase in ALLOWED:
            line = line.replace(phrase, "")
        hits += [f"{path}:{lineno}: {what}: {line.strip()[:120]}" for what, p in PATTERNS.items() if p.search(line)]
    return hits


def test_the_scan_catches_what_it_is_for():
    for bad in ("(issue 19)", "Issue #21 point 6", "branch i19-lora", "the other helpers", "this session's"):
        assert history_hits(Path("x.py"), bad), bad
    assert history_hits(Path("bench/issue19/run.py"), "")
    for good in ('@pytest.fixture(scope="session")', "the issuer's key", "an i386 build", "helpful"):
        assert not history_hits(Path("x.py"), good), good


def test_no_development_history_in_the_tree():
    hits = []
    for path in tracked_files():
        if path in SKIP:
            continue
        try:
            text = (ROOT / path).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            text = ""  # a binary file: its name is still checked
        hits += history_hits(path, text)
    assert not hits, "say what the code does instead:\n" + "\n".join(hits)
