"""The server's settings: one object, from command-line flags over environment variables over defaults.

Every setting has an environment variable (what the image and compose set) and, except the API
key, a flag. The key is read from the environment only, so it never shows in a process listing.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional


class SettingsError(ValueError):
    """A setting has a value the server cannot use; the message names it."""


@dataclass(frozen=True)
class Settings:
    ggml: Path = Path("/models/model.ggml")
    served_model_name: str = ""  # "" = the GGML file's stem
    host: str = "0.0.0.0"
    port: int = 8001
    api_key: Optional[str] = None
    max_queue: int = 16
    max_length: Optional[int] = None  # context length; None = the model's (the KV cache is sized for it)
    max_body_bytes: int = 4 << 20  # larger request bodies get 413 before they are read
    header_timeout: float = 10.0  # a connection that has not sent its request headers by then is closed
    keepalive_timeout: float = 5.0  # an idle keep-alive connection is closed after this
    retry_after: int = 1  # seconds, the Retry-After of a 503 (queue full)
    log_level: str = "info"

    def __post_init__(self):
        if not self.served_model_name:
            object.__setattr__(self, "served_model_name", Path(self.ggml).stem)
        if self.max_queue < 0:
            raise SettingsError(f"max queue (--max-queue / MAX_QUEUE) must be 0 or more, got {self.max_queue}")
        if self.max_length is not None and self.max_length < 2:
            raise SettingsError(f"context length (--max-length / MAX_LENGTH) must be at least 2, got {self.max_length}")
        if not 0 < self.port < 65536:
            raise SettingsError(f"port (--port / PORT) must be 1..65535, got {self.port}")
        for name in ("max_body_bytes", "header_timeout", "keepalive_timeout", "retry_after"):
            if getattr(self, name) <= 0:
                raise SettingsError(f"{SOURCES[name][0]} must be more than 0, got {getattr(self, name)}")


# field -> (environment variable, flag or None, help)
SOURCES: dict[str, tuple[str, Optional[str], str]] = {
    "ggml": ("GGML_MODEL", "--ggml", "GGML model file"),
    "served_model_name": (
        "SERVED_MODEL_NAME",
        "--served-model-name",
        "model name the API answers to (default: file stem)",
    ),
    "host": ("HOST", "--host", "bind address"),
    "port": ("PORT", "--port", "port"),
    "api_key": ("API_KEY", None, "Bearer key every /v1 request must send (environment only)"),
    "max_queue": ("MAX_QUEUE", "--max-queue", "requests that may wait behind the running one; more get 503"),
    "max_length": ("MAX_LENGTH", "--max-length", "context length (default: the model's)"),
    "max_body_bytes": ("MAX_BODY_BYTES", "--max-body-bytes", "largest request body accepted (413 above)"),
    "header_timeout": ("HEADER_TIMEOUT", "--header-timeout", "seconds a client has to send its request headers"),
    "keepalive_timeout": (
        "KEEPALIVE_TIMEOUT",
        "--keepalive-timeout",
        "seconds an idle keep-alive connection stays open",
    ),
    "retry_after": ("RETRY_AFTER", "--retry-after", "Retry-After seconds sent with a 503 when the queue is full"),
    "log_level": ("LOG_LEVEL", "--log-level", "uvicorn log level"),
}
_TYPES = {
    "ggml": Path,
    "port": int,
    "max_queue": int,
    "max_length": int,
    "max_body_bytes": int,
    "header_timeout": float,
    "keepalive_timeout": float,
    "retry_after": int,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for every setting that has one; unset flags stay None so the environment can fill in."""
    defaults = {f.name: f.default for f in fields(Settings)}
    for name, (env, flag, text) in SOURCES.items():
        if flag:
            parser.add_argument(flag, dest=name, default=None, help=f"{text} (${env}; default: {defaults[name]})")


def load(flags: Optional[Mapping[str, Any]] = None, env: Optional[Mapping[str, str]] = None) -> Settings:
    """Flags (None = not given) > environment > defaults; a bad value raises SettingsError."""
    flags = flags or {}
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for name, (var, flag, _) in SOURCES.items():
        raw = flags.get(name)
        if raw is None:
            raw = env.get(var, "").strip() or None
        if raw is None:
            continue
        try:
            values[name] = _TYPES.get(name, str)(raw)
        except ValueError:
            raise SettingsError(f"{flag or var} must be {_TYPES[name].__name__}, got {raw!r}") from None
    return Settings(**values)
