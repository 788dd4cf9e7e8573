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


# vLLM's generic Transformers-backend entries: with trust_remote_code, vLLM can run a remote-code
# architecture it has no native implementation for through one of these (if that code is compatible).
TRANSFORMERS_FALLBACKS = ("TransformersForCausalLM", "TransformersModel")


def supported_architectures() -> set[str]:
    from vllm.model_executor.models import ModelRegistry

    return set(ModelRegistry.get_supported_archs())


def truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def transformers_fallback(config: dict, supported: set[str], trust_remote_code: bool) -> str | None:
    """The Transformers-backend arch vLLM would try for a remote-code model it has no native class for."""
    if not (trust_remote_code and config.get("auto_map")):
        return None
    return next((a for a in TRANSFORMERS_FALLBACKS if a in supported), None)


def check_config(
    config: dict, supported: set[str], vllm_version: str = "", trust_remote_code: bool = False
) -> str | None:
    """None when vLLM can serve this config, else the message to fail the build with."""
    archs = config.get("architectures") or []
    if any(a in supported for a in archs):
        return None
    if archs and transformers_fallback(config, supported, trust_remote_code):
        return None
    what = ", ".join(archs) or f"model_type {config.get('model_type', '?')} (no `architectures` in config.json)"
    near = sorted(a for a in supported if archs and a.lower().startswith(archs[0][:4].lower()))[:8]
    hint = f" Similar names vLLM knows: {', '.join(near)}." if near else ""
    version = f"vLLM {vllm_version}".strip() if vllm_version else "vLLM"
    return (
        f"{version} cannot serve {what}: not among its {len(supported)} supported architectures.{hint} {ALTERNATIVES}"
    )


def load_config(source: str, local: Path, model_id: str, revision: str) -> dict:
    if source == "local":
        return json.loads((local / "config.json").read_text())
    if source == "huggingface":
        from huggingface_hub import hf_hub_download

        token_file = Path("/run/secrets/hub_token")
        token = token_file.read_text().strip() if token_file.is_file() else None
        return json.loads(
            Path(hf_hub_download(model_id, "config.json", revision=revision or "main", token=token or None)).read_text()
        )
    if source == "modelscope":
        try:
            from modelscope.hub.file_download import model_file_download
        except ImportError:  # not in the vLLM image: ModelScope's plain file API
            import urllib.parse
            import urllib.request

            query = urllib.parse.urlencode({"Revision": revision or "master", "FilePath": "config.json"})
            with urllib.request.urlopen(
                f"https://modelscope.cn/api/v1/models/{model_id}/repo?{query}", timeout=60
            ) as r:
                return json.loads(r.read())
        return json.loads(Path(model_file_download(model_id, "config.json", revision=revision or "master")).read_text())
    raise SystemExit(f"unknown model source {source!r}")


def serve_argv(env: dict[str, str]) -> list[str]:
    """`vllm serve` with the served name, port, remote-code switch and $VLLM_EXTRA_ARGS."""
    argv = [
        "vllm",
        "serve",
        env.get("VLLM_MODEL_PATH", "/models/model"),
        "--served-model-name",
        env.get("SERVED_MODEL_NAME", "model"),
        "--host",
        "0.0.0.0",
        "--port",
        env.get("PORT", "8000"),
    ]
    if truthy(env.get("VLLM_TRUST_REMOTE_CODE")):
        argv.append("--trust-remote-code")
    # The API key reaches vLLM as $VLLM_API_KEY (compose hands it API_KEY), never on the command line.
    return argv + shlex.split(env.get("VLLM_EXTRA_ARGS", ""))


def serve_env(env: dict[str, str]) -> dict[str, str]:
    """The server's environment: $API_KEY (what the other images read) becomes $VLLM_API_KEY if unset."""
    out = dict(env)
    if not out.get("VLLM_API_KEY") and out.get("API_KEY"):
        out["VLLM_API_KEY"] = out["API_KEY"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vllm_boot")
    sub = parser.add_subparsers(dest="cmd", required=True)
    check = sub.add_parser("check", help="refuse architectures vLLM cannot serve")
    check.add_argument("--source", default="local")
    check.add_argument("--local", type=Path, default=Path("/ctx/model"))
    check.add_argument("--model-id", default="")
    check.add_argument("--revision", default="")
    check.add_argument("--trust-remote-code", default="0")
    serve = sub.add_parser("serve", help="exec vllm serve")
    serve.add_argument("--print", action="store_true", help="print the command (shell-quoted) instead of running it")
    args = parser.parse_args(argv)
    if args.cmd == "serve":
        env = serve_env(dict(os.environ))
        cmd = serve_argv(env)
        if args.print:
            print(shlex.join(cmd))
            return 0
        os.execvpe(cmd[0], cmd, env)
    config = load_config(args.source, args.local, args.model_id, args.revision)
    import vllm

    supported = supported_architectures()
    trust = truthy(args.trust_remote_code)
    error = check_config(config, supported, vllm.__version__, trust)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    archs = ", ".join(config.get("architectures", []))
    fallback = (
        None
        if any(a in supported for a in config.get("architectures", []))
        else transformers_fallback(config, supported, trust)
    )
    if fallback:
        print(
            f"warning: vLLM {vllm.__version__} has no native {archs}; with trust_remote_code it will try its "
            f"Transformers backend ({fallback}), which needs the remote code to support it",
            file=sys.stderr,
        )
    else:
        print(f"vLLM {vllm.__version__} supports {archs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
