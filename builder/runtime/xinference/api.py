"""Xinference's REST API over urllib (the runtime keeps to the standard library): the client, and the
calls every role makes (wait for /status, list the running models)."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from typing import Any

from builder.runtime.xinference.config import BootError


class Api:
    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 30.0):
        self.base = base_url.rstrip("/")
        self.key = api_key
        self.timeout = timeout

    def call(self, method: str, path: str, body: Any = None, timeout: float | None = None) -> tuple[int, Any]:
        """(HTTP status, the decoded JSON answer, else its text); an error status is returned, not raised."""
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as response:
                raw = response.read()
                status = response.status
        except urllib.error.HTTPError as e:
            raw, status = e.read(), e.code
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode(errors="replace")

    def ok(self, method: str, path: str, body: Any = None, timeout: float | None = None) -> Any:
        """The answer of a call that must succeed (200); BootError otherwise."""
        status, data = self.call(method, path, body, timeout)
        if status != 200:
            raise BootError(f"{method} {path} -> {status}: {str(data)[:2000]}")
        return data


def wait_status(api: Api, proc: subprocess.Popen | None, deadline: float) -> None:
    """Wait for the unauthenticated GET /status; BootError when `proc` exits first or time runs out."""
    while True:
        if proc is not None and proc.poll() is not None:
            raise BootError(f"xinference-local exited with {proc.returncode} before answering /status")
        try:
            if api.call("GET", "/status", timeout=5)[0] == 200:
                return
        except (OSError, urllib.error.URLError):
            pass
        if time.monotonic() > deadline:
            raise BootError(f"{api.base}/status did not answer in time")
        time.sleep(0.5)


def running_models(api: Api) -> dict[str, dict]:
    """The running models by uid (GET /v1/models)."""
    data = api.ok("GET", "/v1/models")
    items = data.get("data", []) if isinstance(data, dict) else data
    return {m.get("id"): m for m in items if isinstance(m, dict)}
