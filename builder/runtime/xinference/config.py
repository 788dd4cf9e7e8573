"""The boot's settings: flags, else environment variables, else defaults (docs/serving.md: "Xinference
runtime environment"), and the small pieces every module of this package shares (log, BootError, env_value)."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DESCRIPTION = (
    "Xinference container entry point: start `xinference-local`, register and launch the model, stay in front."
)
DEFAULT_PORT = 9997
DEFAULT_MODEL_PATH = "/models/model"
OFF_WORDS = {"0", "false", "no", "off", "none", "disabled", "disable"}
ON_WORDS = {"1", "true", "yes", "on"}
ENGINES = {"llama.cpp": "llama.cpp", "transformers": "Transformers", "vllm": "vLLM"}  # ours -> Xinference's name


def log(msg: str) -> None:
    print(f"[xinference-boot] {msg}", file=sys.stderr, flush=True)


class BootError(RuntimeError):
    """A setup step failed; the message says which and why."""


@dataclass
class BootConfig:
    model_path: Path = Path(DEFAULT_MODEL_PATH)
    model_name: str = ""
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    context_length: int | None = None
    engine: str = "transformers"
    quantization: str = "none"  # llama.cpp engine: the GGUF's type (the image's QUANT)
    n_gpu: Any = None  # None: leave Xinference's default ("auto")
    launch_args: dict = field(default_factory=dict)
    trust_remote_code: bool = False
    auth: bool = True
    api_key: str | None = None
    admin_user: str = "admin"
    admin_password: str | None = None
    home: Path | None = None
    xinference_local: str = "xinference-local"
    local_args: list[str] = field(default_factory=list)
    timeout: float = 1800.0

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host
        return f"http://{host}:{self.port}"

    @property
    def xinference_home(self) -> Path:
        return self.home or Path.home() / ".xinference"


def env_value(env: Mapping[str, str], *names: str) -> str | None:
    """The value of the first of `names` that is set and not empty."""
    for name in names:
        value = env.get(name)
        if value not in (None, ""):
            return value
    return None


def _flag(value: str | None, default: bool) -> bool:
    if value is None:
        return default
    word = value.strip().lower()
    if word in ON_WORDS:
        return True
    if word in OFF_WORDS:
        return False
    raise BootError(f"expected on/off, got {value!r}")


def _n_gpu(value: str | None) -> Any:
    if value is None:
        return None
    word = value.strip().lower()
    if word == "auto":
        return "auto"
    return int(word)


def _launch_args(env: Mapping[str, str]) -> dict:
    """XINFERENCE_LAUNCH_ARGS: a JSON object merged into the launch request."""
    if not env_value(env, "XINFERENCE_LAUNCH_ARGS"):
        return {}
    try:
        launch_args = json.loads(env["XINFERENCE_LAUNCH_ARGS"])
    except json.JSONDecodeError as e:
        raise BootError(f"XINFERENCE_LAUNCH_ARGS is not JSON: {e}") from e
    if not isinstance(launch_args, dict):
        raise BootError("XINFERENCE_LAUNCH_ARGS must be a JSON object")
    return launch_args


def _parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m builder.runtime.xinference", description=DESCRIPTION)
    parser.add_argument(
        "--health", action="store_true", help="Health check: exit 0 when the model is running and answers."
    )
    parser.add_argument(
        "--model-path", default=env_value(env, "MODEL_PATH", "XINFERENCE_MODEL_PATH") or DEFAULT_MODEL_PATH
    )
    parser.add_argument("--model-name", default=env_value(env, "SERVED_MODEL_NAME", "XINFERENCE_MODEL_NAME"))
    parser.add_argument("--host", default=env_value(env, "XINFERENCE_HOST") or "0.0.0.0")
    parser.add_argument("--port", type=int, default=int(env_value(env, "XINFERENCE_PORT") or DEFAULT_PORT))
    parser.add_argument("--context-length", type=int, default=env_value(env, "XINFERENCE_CONTEXT_LENGTH"))
    parser.add_argument("--engine", default=env_value(env, "XINFERENCE_ENGINE") or "transformers")
    parser.add_argument("--timeout", type=float, default=float(env_value(env, "XINFERENCE_BOOT_TIMEOUT") or 1800))
    parser.add_argument("--health-timeout", type=float, default=60.0, help="Seconds the --health chat may take.")
    return parser


def parse_args(
    argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> tuple[BootConfig, argparse.Namespace]:
    """The boot's settings from `argv` and `env` (default: sys.argv, os.environ), and the parsed flags."""
    env = os.environ if env is None else env
    args = _parser(env).parse_args(argv)
    engine = args.engine.strip().lower()
    if engine not in ENGINES:
        raise BootError(f"XINFERENCE_ENGINE must be one of {sorted(ENGINES)}, got {args.engine!r}")
    model_path = Path(args.model_path)
    launch_args = _launch_args(env)
    home = env_value(env, "XINFERENCE_HOME")
    cfg = BootConfig(
        model_path=model_path,
        model_name=args.model_name or model_path.name,
        host=args.host,
        port=args.port,
        context_length=int(args.context_length) if args.context_length else None,
        engine=engine,
        quantization=env_value(env, "XINFERENCE_QUANTIZATION") or "none",
        n_gpu=_n_gpu(env_value(env, "XINFERENCE_N_GPU")),
        launch_args=launch_args,
        trust_remote_code=_flag(env_value(env, "XINFERENCE_TRUST_REMOTE_CODE", "TRUST_REMOTE_CODE"), False),
        auth=_flag(env_value(env, "XINFERENCE_AUTH"), True),
        api_key=env_value(env, "XINFERENCE_API_KEY", "API_KEY"),
        admin_user=env_value(env, "XINFERENCE_ADMIN_USER") or "admin",
        admin_password=env_value(env, "XINFERENCE_ADMIN_PASSWORD"),
        home=Path(home) if home else None,
        xinference_local=env_value(env, "XINFERENCE_LOCAL") or "xinference-local",
        local_args=shlex.split(env_value(env, "XINFERENCE_LOCAL_ARGS") or ""),
        timeout=args.timeout,
    )
    return cfg, args
