"""The pinned llama.cpp tools the quality step runs, and how: output kept, wall time and peak RSS measured.

Each binary is found as its environment variable says (the image's build stage sets them), else in
the host build (`make llamacpp`, and `python -m builder.model.gguf.llamacpp quality-tools`).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from builder.errors import BuilderError
from builder.model.gguf import llamacpp
from builder.model.gguf.convert import peak_rss_mb

ENV = {
    "llama-perplexity": "LLAMA_PERPLEXITY",
    "llama-imatrix": "LLAMA_IMATRIX",
    "llama-quantize": "LLAMA_QUANTIZE",
    "llama-server": "LLAMA_SERVER",
}


def binary(name: str) -> Path:
    """The path of one tool; BuilderError saying how to build it when it is missing."""
    path = llamacpp.host_binary(name, ENV[name])
    if not path.is_file():
        how = (
            "make llamacpp` (or `python -m builder.model.gguf.llamacpp quality-tools"
            if name in llamacpp.QUALITY_TARGETS
            else "make llamacpp"
        )
        raise BuilderError(
            f"{name} not found at {path}: run `{how}` (compiles it from the pinned source) or set {ENV[name]}"
        )
    return path


def threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


@dataclass
class Cost:
    """Wall time and the largest peak RSS of the tool processes a measurement ran."""

    wall_s: float = 0.0
    peak_rss_mb: float = 0.0

    def add(self, other: Cost) -> Cost:
        self.wall_s += other.wall_s
        self.peak_rss_mb = max(self.peak_rss_mb, other.peak_rss_mb)
        return self


@dataclass
class ToolRun:
    output: str
    cost: Cost = field(default_factory=Cost)


def run_tool(cmd: list[str], what: str, timeout: float | None = None) -> ToolRun:
    """Run a tool to the end, its stdout and stderr kept together; BuilderError with the log's tail on failure."""
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as log:
        start = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        peak = 0.0
        while proc.poll() is None:
            peak = max(peak, peak_rss_mb(proc.pid))
            if timeout is not None and time.monotonic() - start > timeout:
                proc.kill()
                proc.wait()
                raise BuilderError(f"{what} ran past {timeout:.0f} s: {' '.join(cmd)}")
            time.sleep(0.05)
        wall = time.monotonic() - start
        log.seek(0)
        output = log.read()
    if proc.returncode != 0:
        raise BuilderError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{output[-3000:]}")
    return ToolRun(output, Cost(wall, peak))


def tool_version(name: str = "llama-perplexity") -> str:
    """'llama.cpp <commit> (<version>, build <n>)' from the tool's own --version (the pin's commit if it says none)."""
    try:
        out = subprocess.run([str(binary(name)), "--version"], capture_output=True, text=True, timeout=30)
        text = out.stdout + out.stderr
    except (OSError, subprocess.TimeoutExpired):
        text = ""
    m = re.search(r"version:\s*(\S+)\s*\(build (\d+), commit ([0-9a-f]+)\)", text)
    if m:
        return f"llama.cpp {m.group(3)} ({m.group(1)}, build {m.group(2)})"
    m = re.search(r"version:\s*(\d+)\s*\(([0-9a-f]+)\)", text)  # older builds: "version: 1234 (abcdef0)"
    if m:
        return f"llama.cpp {m.group(2)} (build {m.group(1)})"
    return f"llama.cpp {llamacpp.COMMIT}"


@dataclass(frozen=True)
class Served:
    """A model as llama.cpp loads it: a GGUF, and LoRA GGUFs applied on top of it unmerged (`--lora`)."""

    gguf: Path
    loras: tuple[Path, ...] = ()
    mmproj: Path | None = None  # a vision-language model's vision tower + projector (llama-server only)

    def args(self) -> list[str]:
        """The model's arguments for every tool (the text GGUF and its LoRAs)."""
        out = ["-m", str(self.gguf)]
        for lora in self.loras:
            out += ["--lora", str(lora)]
        return out

    def server_args(self) -> list[str]:
        """llama-server's arguments: the model's, and the mmproj when there is one."""
        return self.args() + (["--mmproj", str(self.mmproj)] if self.mmproj else [])

    def describe(self) -> str:
        extra = [f"mmproj {Path(self.mmproj).name}"] if self.mmproj else []
        return " + ".join([Path(self.gguf).name, *(f"LoRA {Path(lora).name}" for lora in self.loras), *extra])

    def size_bytes(self) -> int:
        return sum(Path(f).stat().st_size for f in (self.gguf, *self.loras, *([self.mmproj] if self.mmproj else [])))
