"""vLLM image: the build-time architecture check and the server's start command.

Stdlib only (plus vLLM itself), because the check runs in an early stage FROM the vLLM base that
holds nothing of ours but this file: it reads config.json and nothing else, so it refuses an
unsupported model before any heavy step of the build.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

ALTERNATIVES = (
    "Alternatives: BACKEND=xinference (transformers engine: any architecture transformers loads, "
    "remote code with TRUST_REMOTE_CODE), BACKEND=chatglmcpp (ChatGLM2/3, GLM-4 and native GLM on CPU), "
    "or a newer vLLM base image (--vllm-base)."
)


def supported_architectures() -> set[str]:
    from vllm.model_executor.models import ModelRegistry

    return set(ModelRegistry.get_supported_archs())


def check_config(config: dict, supported: set[str], vllm_version: str = "") -> str | None:
    """None when vLLM can serve this config, else the message to fail the build with."""
    archs = config.get("architectures") or []
    if any(a in supported for a in archs):
        return None
    what = ", ".join(archs) or f"model_type {config.get('model_type', '?')} (no `architectures` in config.json)"
    near = sorted(a for a in supported if archs and a.lower().startswith(archs[0][:4].lower()))[:8]
    hint = f" Similar names vLLM knows: {', '.join(near)}." if near else ""
    return f"vLLM {vllm_version} cannot serve {what}: not among its {len(supported)} supported architectures.{hint} {ALTERNATIVES}"


def load_config(source: str, local: Path, model_id: str, revision: str) -> dict:
    if source == "local":
        return json.loads((local / "config.json").read_text())
    if source == "huggingface":
        from huggingface_hub import hf_hub_download

        token_file = Path("/run/secrets/hub_token")
        token = token_file.read_text().strip() if token_file.is_file() else None
        return json.loads(Path(hf_hub_download(model_id, "config.json", revision=revision or "main", token=token or None)).read_text())
    if source == "modelscope":
        from modelscope.hub.file_download import model_file_download

        return json.loads(Path(model_file_download(model_id, "config.json", revision=revision or "master")).read_text())
    raise SystemExit(f"unknown model source {source!r}")


def serve_argv(env: dict[str, str]) -> list[str]:
    """`vllm serve` with the served name, port, remote-code switch and $VLLM_EXTRA_ARGS."""
    argv = [
        "vllm", "serve", env.get("VLLM_MODEL_PATH", "/models/model"),
        "--served-model-name", env.get("SERVED_MODEL_NAME", "model"),
        "--host", "0.0.0.0", "--port", env.get("PORT", "8000"),
    ]
    if env.get("VLLM_TRUST_REMOTE_CODE", "0") in ("1", "true", "yes"):
        argv.append("--trust-remote-code")
    # The API key reaches vLLM as $VLLM_API_KEY (compose hands it API_KEY), never on the command line.
    return argv + shlex.split(env.get("VLLM_EXTRA_ARGS", ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vllm_boot")
    sub = parser.add_subparsers(dest="cmd", required=True)
    check = sub.add_parser("check", help="refuse architectures vLLM cannot serve")
    check.add_argument("--source", default="local")
    check.add_argument("--local", type=Path, default=Path("/ctx/model"))
    check.add_argument("--model-id", default="")
    check.add_argument("--revision", default="")
    check.add_argument("--trust-remote-code", default="0")
    sub.add_parser("serve", help="exec vllm serve")
    args = parser.parse_args(argv)
    if args.cmd == "serve":
        cmd = serve_argv(dict(os.environ))
        os.execvp(cmd[0], cmd)
    config = load_config(args.source, args.local, args.model_id, args.revision)
    import vllm

    error = check_config(config, supported_architectures(), vllm.__version__)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"vLLM {vllm.__version__} supports {', '.join(config.get('architectures', []))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
