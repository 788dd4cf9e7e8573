"""`python -m builder.runtime.chatglmcpp serve|chat`: the chatglm.cpp image's entrypoint.

Standard library argparse: the runtime image carries no CLI framework. Settings come from flags,
then environment variables (what the image sets), then defaults (see settings.py).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from builder.runtime.chatglmcpp import settings as server_settings
from builder.runtime.chatglmcpp.engine import EngineLoadError
from builder.runtime.chatglmcpp.engine_process import EngineStartError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m builder.runtime.chatglmcpp", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server over chatglm_cpp.Pipeline")
    server_settings.add_arguments(serve)
    chat = sub.add_parser("chat", help="interactive terminal chat")
    chat.add_argument("--ggml", type=Path, default=None, help="GGML model file ($GGML_MODEL)")
    chat.add_argument("--system", default=None, help="system prompt")
    chat.add_argument("--max-tokens", type=int, default=None, help="new tokens per reply (default: up to the context)")
    chat.add_argument("--temperature", type=float, default=0.8, help="0: greedy (default 0.8)")
    chat.add_argument("--top-p", type=float, default=0.8, help="default 0.8")
    chat.add_argument("--top-k", type=int, default=0, help="0: off")
    chat.add_argument("--repetition-penalty", type=float, default=1.0)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "serve":
            from builder.runtime.chatglmcpp.app import serve

            serve(server_settings.load(vars(args)))
        else:
            from builder.runtime.chatglmcpp.chat import chat_repl

            ggml = args.ggml or server_settings.load().ggml
            chat_repl(ggml, system=args.system, max_tokens=args.max_tokens, temperature=args.temperature,
                      top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty)  # fmt: skip
    except (EngineLoadError, EngineStartError, server_settings.SettingsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
