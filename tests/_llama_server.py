"""A real llama-server for host tests: the host build of the pinned llama.cpp (`make llamacpp`, which
`make test` runs first), on a free loopback port, stopped when the block ends."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from builder.model.gguf.llamacpp import host_binary

SERVER = host_binary("llama-server", "LLAMA_SERVER")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict, timeout: float = 120, key: str | None = None) -> dict:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.load(r)


@contextmanager
def llama_server(gguf: Path, *args: str, log: Path | None = None, timeout: float = 120) -> Iterator[str]:
    """Serve `gguf`; yields the base URL once /health answers 200."""
    assert SERVER.is_file(), f"{SERVER} missing: run `make llamacpp` (make test does) or set LLAMA_SERVER"
    port = free_port()
    log = log or Path(str(gguf) + f".server-{port}.log")
    # One thread: the tests' models are tiny, and two threads spin-waiting for each other stall for
    # seconds per token whenever another process holds one of a 2-core machine's cores.
    cmd = [str(SERVER), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", "1", "--no-webui", *args]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except (OSError, urllib.error.URLError):
                pass
            if proc.poll() is not None:
                raise AssertionError(f"llama-server exited {proc.returncode}:\n{log.read_text()[-3000:]}")
            assert time.monotonic() < deadline, f"llama-server not healthy in {timeout}s:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
